"""Where the course writes: one ``outputs/`` folder that lessons use to hand work to each other.

Used by every lesson from 03 on.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

OUTPUTS_ENV_VAR = "COURSE_OUTPUTS"


PACKAGE_CHECKOUT = Path(__file__).resolve().parent.parent  # the clone, for an editable install


def _is_checkout(folder: Path) -> bool:
    return (folder / "notebooks").is_dir() and (folder / "course_utils").is_dir()


def course_root(start: str | os.PathLike | None = None) -> Path:
    """The checkout's root (the folder holding ``notebooks/`` and ``course_utils/``).

    Searched from ``start`` (default: the working directory) upwards, then the checkout the package was
    installed from — so a notebook opened anywhere (Colab's ``/content``, a copy in another folder) finds
    the course's ``data/`` and the same ``outputs/``. Falls back to ``start`` when neither is a checkout.
    """
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if _is_checkout(folder):
            return folder
    return PACKAGE_CHECKOUT if _is_checkout(PACKAGE_CHECKOUT) else here


def outputs_dir(*parts: str) -> Path:
    """``outputs/<parts…>`` under the course root (or ``$COURSE_OUTPUTS``), created on demand."""
    base = Path(os.environ[OUTPUTS_ENV_VAR]) if os.environ.get(OUTPUTS_ENV_VAR) else course_root() / "outputs"
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def staged(path: str | os.PathLike, overwrite: bool = False, folder: bool = False) -> Iterator[Path]:
    """``with staged(path) as tmp:`` write ``tmp`` (a file, or with ``folder=True`` a directory); it
    becomes ``path`` only if the block succeeds, otherwise it is removed. A crash leaves the old
    ``path`` (or nothing), never half of it. Refuses an existing ``path`` unless ``overwrite``
    (an existing non-empty folder counts as existing; an empty one does not)."""
    import shutil
    import tempfile

    path = Path(path)
    exists = path.is_file() or (path.is_dir() and any(path.iterdir()))
    if exists and not overwrite:
        raise FileExistsError(f"{path} exists; choose another name or pass overwrite=True")
    path.parent.mkdir(parents=True, exist_ok=True)
    if folder:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod((0o777 if folder else 0o666) & ~umask)  # mkstemp/mkdtemp make them private to you
        if path.is_dir() and not path.is_symlink():  # old folder aside, new in, then old gone
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, data: str | bytes, overwrite: bool = False) -> Path:
    """Write ``data`` to ``path`` all at once (:func:`staged`): never half a file, and an existing file
    is replaced only with ``overwrite``."""
    with staged(path, overwrite) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)
