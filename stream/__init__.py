"""The outside world: sources, capture threads, sessions, recording, the Gradio page and the CLI.

Which model a command loads is decided here, not in ``detector``: ``--model`` when given, else
the ``HEMATOVISION_MODEL`` variable, else the model shipped with the package.
"""

from __future__ import annotations

import os
from pathlib import Path


def default_model_path() -> Path:
    """The model to load when none is given: ``$HEMATOVISION_MODEL``, else the shipped one."""
    env = os.environ.get("HEMATOVISION_MODEL")
    if env:
        return Path(env).expanduser()
    from hematovision_models import shipped_model

    return shipped_model()


def resolve_model(model: str | Path | None) -> str:
    """``model`` as given, or :func:`default_model_path` when it is None or empty."""
    return str(Path(model).expanduser()) if model else str(default_model_path())
