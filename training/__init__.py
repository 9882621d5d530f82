"""Data sets, the smear simulator, Keras training, int8 export and evaluation reports.

TensorFlow is imported only inside the functions that need it (the [train] extra).
"""
