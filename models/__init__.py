"""The shipped default model (``hematovision.tflite``) and its card (``hematovision.json``).

Installed as the package ``hematovision_models`` (this folder is mapped to that name in
pyproject.toml), so every install, editable or from a wheel, carries the model as package data.
Not ``models``: a user's own ``models/`` folder in the working directory would shadow it.
Which model a command loads (``--model``, ``HEMATOVISION_MODEL``) is decided in ``stream``.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

#: File name of the shipped model; its card is the same name with ``.json``.
SHIPPED = "hematovision.tflite"


def shipped_model() -> Path:
    """Path of the shipped ``.tflite`` inside the installed package (its card beside it)."""
    return Path(str(files(__name__).joinpath(SHIPPED)))
