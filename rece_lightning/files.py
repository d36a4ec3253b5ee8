"""File I/O in one place: atomic writes with the usual permissions, and the check that a folder can be written.

Every file the package writes (exports, manifests, image sets, attack outcomes, caches, reports) goes through
:func:`atomic_write`, so an interrupted run never leaves a truncated file that a rerun would trust.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _read_umask() -> int:
    """The process umask, read once at import: ``os.umask`` can only be read by setting it, which would race with
    other threads creating files."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


_UMASK = _read_umask()
FILE_MODE = 0o666 & ~_UMASK  # what open() gives a new file (0644 under the usual 022)
DIR_MODE = 0o777 & ~_UMASK  # what mkdir() gives a new folder (mkdtemp makes 0700 ones)


def atomic_write(path: Path, write: Callable[[str], Any]) -> None:
    """``write(temporary_path)``, then rename onto ``path``: a crash never leaves a half-written file behind.

    The file gets the usual permissions (``mkstemp`` creates 0600 files; others could not read an export).
    """
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        os.chmod(temporary, FILE_MODE)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_text(path: Path, text: str) -> None:
    """``text`` into ``path``, atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def check_writable_folder(option: str, folder: str | os.PathLike) -> None:
    """Refuse, before any work, a folder that is a file or that cannot be created or written to.

    The check makes the folder (and a file in it) for real, then removes what it made: permission bits say nothing
    for root or for special file systems (``/proc``), where only trying tells.
    """
    path = Path(folder).expanduser()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{option}={str(folder)!r} is a file, not a folder: give a folder to write into")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"{option}={str(folder)!r}: {str(existing)!r} is a file, so the folder cannot be made")
    made = [parent for parent in (path, *path.parents) if not parent.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=path, prefix=".rece-write-check-")
        os.close(handle)
        os.remove(probe)
    except OSError as error:
        raise PermissionError(
            f"{option}={str(folder)!r} cannot be written: {error.strerror or error} ({str(existing)!r} exists); give "
            "a folder you can write to"
        ) from None  # the message says it all: the command line shows this line alone
    finally:
        for parent in made:  # deepest first: leave the file system as it was
            try:
                parent.rmdir()
            except OSError:
                pass
