"""Where the course writes: one ``outputs/`` folder that lessons use to hand work to each other.

Used by every lesson from 03 on.
"""

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


def atomic_write(path: str | os.PathLike, data: str | bytes, overwrite: bool = False) -> Path:
    """Write ``data`` to ``path`` all at once (temp file + rename).

    Refuses an existing file unless ``overwrite``.

    A crash mid-write leaves the old file (or nothing), never half a file.
    """
    import tempfile

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another name or pass overwrite=True")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
