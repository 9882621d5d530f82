"""Errors that carry a one-line message for the user (the CLI prints them without a traceback)."""


class HematoVisionError(Exception):
    """Base class: a problem with the user's input, files or settings, stated in one line."""


class ModelError(HematoVisionError):
    """A model file or its card is missing, corrupt, or the two disagree."""


class InputError(HematoVisionError):
    """An image, video, folder or other input cannot be used; the message names it and why."""
