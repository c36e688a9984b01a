"""Output files: atomic writes (a reader sees the old file or the complete new one, never half of it), made
with the umask's permissions like ``open()``, and output paths checked before any work."""
from __future__ import annotations

import fcntl
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import UserError


def umask() -> int:
    """The process's umask (reading it means setting it; it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_TEMPORARY_EXTRA = len(".") + len(".") + 8 + len(".tmp")  # atomic_path's ".<name>.XXXXXXXX.tmp"


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s directory; rename it onto ``path`` if the block succeeds.

    The file gets the permissions ``open()`` would give it (0666 less the umask), and temporaries that a
    killed earlier write of the same file left behind (``.<name>.*.tmp``) are removed first.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{_glob_escape(target.name)}.*.tmp"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.fchmod(fd, 0o666 & ~umask())
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _named(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a Path, refused (one line) when empty or when a part of it is longer than the file system
    allows (before any ``exists()``, which raises on such names)."""
    if not os.fspath(path):
        raise UserError(f"{what} is empty; give a path")
    path = Path(path)
    prefix = existing = Path(path.absolute().anchor)  # existing: the deepest folder of the path that exists
    for part in path.absolute().parts[1:]:
        size, longest = len(os.fsencode(part)), os.pathconf(existing, "PC_NAME_MAX")
        if size > longest:
            raise UserError(f"{what} {path}: a name in it is {size} bytes, the file system allows {longest}")
        prefix = prefix / part
        if prefix.is_dir():
            existing = prefix
    return path


def check_output_dir(path: str | os.PathLike, what: str) -> Path:
    """``path`` is, or can be created as, a writable folder; else one :class:`UserError` line naming ``what``
    (the flag or config key). Creates nothing."""
    path = _named(path, what)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == path else f" ({existing} is a file)"
        raise UserError(f"{what} {path} must be a folder, but it is a file{where}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path}: {existing} is not writable")
    return path


def check_output_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` can be written as a file by :func:`atomic_path` (it is not a folder, its folder can be made,
    its name and its temporary's fit the file system); else one line."""
    path = _named(path, what)
    if path.is_dir():
        raise UserError(f"{what} {path} must be a file, but it is a folder")
    check_output_dir(path.parent, f"the folder of {what}")
    existing = path.parent
    while not existing.exists():
        existing = existing.parent
    longest = os.pathconf(existing, "PC_NAME_MAX") - _TEMPORARY_EXTRA
    if len(os.fsencode(path.name)) > longest:
        raise UserError(f"{what} {path}: its name is {len(os.fsencode(path.name))} bytes, the file system allows "
                        f"{longest} here (shorten the input's name)")
    return path


_HELD: dict[str, int] = {}  # folder -> descriptor of the locks this process holds


def lock_folder(folder: str | os.PathLike, what: str, shared: bool = False) -> int:
    """Take an advisory lock on ``folder`` for the rest of this process's life: exclusive, or ``shared`` for
    the helpers of a run whose main process holds it (see :class:`dpar.sampling.SampleChunks`). A folder that
    another live process has locked is one :class:`UserError` line: two runs never write the same output.
    Runs one after another in one process (a script's ``main`` called twice) take the lock over. Returns the
    descriptor the lock lives on. Linux/macOS (flock)."""
    key = os.path.realpath(folder)
    if key in _HELD:  # this process's earlier run of the same output has ended
        os.close(_HELD.pop(key))
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"another run is writing {folder} ({what}); wait for it or stop all of its processes "
                        "first") from None
    _HELD[key] = fd
    return fd


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)
