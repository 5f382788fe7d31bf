"""Where the course writes: one ``outputs/`` folder that lessons use to hand work to each other."""

from __future__ import annotations

import os
from pathlib import Path

OUTPUTS_ENV_VAR = "COURSE_OUTPUTS"


def course_root(start: str | os.PathLike | None = None) -> Path:
    """The checkout's root (the folder holding ``notebooks/`` and ``course_utils/``), else ``start``.

    Notebooks run with their own folder as working directory; this makes ``outputs/`` the same
    folder whether a lesson runs from Jupyter, ``python -m course_utils run`` or a test.
    """
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "notebooks").is_dir() and (folder / "course_utils").is_dir():
            return folder
    return here


def outputs_dir(*parts: str) -> Path:
    """``outputs/<parts…>`` under the course root (or ``$COURSE_OUTPUTS``), created on demand."""
    base = Path(os.environ[OUTPUTS_ENV_VAR]) if os.environ.get(OUTPUTS_ENV_VAR) else course_root() / "outputs"
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
