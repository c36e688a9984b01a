"""Output files: checked before any work, claimed by one writer before it computes them, and written
atomically (a reader sees the old file or the complete new one, never half of it), with the umask's
permissions like ``open()``.

A command checks its output paths with its other inputs (:func:`check_output_dir`, :func:`check_output_file`),
then claims its output files (:func:`claim_output`) before its work, then writes them (:func:`atomic_path`,
which claims on its own a file that is not claimed yet). A claim is the temporary the file is written to,
``.<name>.XXXXXXXX.tmp`` next to it, locked (flock) by its writer for as long as it writes: a second writer
of the same file finds a locked temporary and is refused in one line (:class:`OutputBusy`), and a temporary
whose lock can be taken is what a writer that died left behind, removed by the next claim. A claim ends when
its file is renamed into place, when its ``with`` block ends, or when the process ends (its temporary is then
removed); a killed process's lock ends with it. Whole folders are locked only for runs (:func:`lock_folder`).
"""
from __future__ import annotations

import atexit
import errno
import fcntl
import os
import re
import stat
import tempfile
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import WRITE_ERRNOS, UserError


def umask() -> int:
    """The process's umask (reading it means setting it; it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_TEMPORARY_EXTRA = len(".") + len(".") + 8 + len(".tmp")  # a claim's ".<name>.XXXXXXXX.tmp"
_TEMPORARY_RANDOM = r"[a-z0-9_]+"  # what tempfile.mkstemp draws (8 characters), never a dot


class OutputBusy(UserError):
    """Another live process is writing this output (it holds the claim on it)."""


class OutputClaim:
    """This process's claim on one output file: ``tmp``, the locked temporary the file is written to.

    :meth:`commit` renames it onto ``path``; :meth:`release` (also the end of a ``with`` block, or of the
    process) removes it unwritten. A process started with ``fork`` never ends its parent's claims."""

    def __init__(self, path: Path, tmp: Path, fd: int):
        self.path, self.tmp, self._fd, self._pid = path, tmp, fd, os.getpid()

    @property
    def held(self) -> bool:
        return self._fd is not None and self._pid == os.getpid()

    def commit(self) -> Path:
        assert self.held, f"{self.path}: its claim has ended or belongs to another process"
        os.replace(self.tmp, self.path)
        self._end(remove=False)
        return self.path

    def release(self) -> None:
        if self.held:
            self._end(remove=True)

    def _end(self, remove: bool) -> None:
        if _CLAIMS.get(_key(self.path)) is self:
            del _CLAIMS[_key(self.path)]
        if remove and _same_file(self._fd, self.tmp):
            with suppress(OSError):
                os.unlink(self.tmp)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OutputClaim:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


_CLAIMS: dict[Path, OutputClaim] = {}  # the claims this process holds, by file


def _key(path: str | os.PathLike) -> Path:
    path = Path(path)
    return Path(os.path.realpath(path.parent)) / path.name


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (another claim may have removed it)."""
    try:
        named = os.lstat(path)
    except OSError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def claim_output(path: str | os.PathLike, what: str | None = None) -> OutputClaim:
    """Claim ``path`` for this process until it is written (:func:`atomic_path`), released, or the process
    ends; this process's existing claim of it is returned as it is. Creates the file's folder. Raises
    :class:`OutputBusy` (one line naming ``path`` and ``what``, e.g. the flag) while another live process
    claims it; the temporaries of dead writers are removed."""
    target = Path(path)
    held = _CLAIMS.get(_key(target))
    if held is not None and held.held:
        return held
    target.parent.mkdir(parents=True, exist_ok=True)
    claim = _locked_temporary(target)
    _CLAIMS[_key(target)] = claim
    try:
        _remove_stale(claim, what)
    except BaseException:
        claim.release()
        raise
    return claim


def claim_outputs(outputs: dict[Path, str]) -> list[OutputClaim]:
    """Claim every file of ``outputs`` (file -> what it is, named in a refusal) or none: when one is busy, the
    claims taken before it are released."""
    claims: list[OutputClaim] = []
    try:
        for path, what in outputs.items():
            held = _CLAIMS.get(_key(path))
            claim = claim_output(path, what)
            if claim is not held:
                claims.append(claim)
    except BaseException:
        for claim in claims:
            claim.release()
        raise
    return claims


def _locked_temporary(target: Path) -> OutputClaim:
    for _ in range(100):
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another claim, sweeping, took it as stale before we locked it
            os.close(fd)
            continue
        if _same_file(fd, Path(name)):  # else that sweep removed it before we locked it: draw another
            os.fchmod(fd, 0o666 & ~umask())
            return OutputClaim(target, Path(name), fd)
        os.close(fd)
    raise OutputBusy(f"cannot claim {target}: other processes keep removing its temporaries")


def _remove_stale(claim: OutputClaim, what: str | None) -> None:
    """Remove the temporaries of ``claim.path`` that dead writers left; :class:`OutputBusy` for a live one.
    Run after this claim is locked, so that of two writers starting at once neither goes on unseen."""
    pattern = re.compile(re.escape(f".{claim.path.name}.") + _TEMPORARY_RANDOM + r"\.tmp")
    for other in _temporaries(claim.path.parent, pattern):
        if other.name != claim.tmp.name and not _remove_if_stale(other):
            named = f" ({what})" if what else ""
            raise OutputBusy(f"another process is writing {claim.path}{named}; wait for it to finish or stop it "
                             "first")


def remove_stale_temporaries(folder: str | os.PathLike) -> None:
    """Remove the temporaries in ``folder`` that writers which died left (their lock can be taken); those of
    live writers stay."""
    for path in _temporaries(Path(folder), re.compile(r"\..+\." + _TEMPORARY_RANDOM + r"\.tmp")):
        _remove_if_stale(path)  # this process's own claims are locked too: they stay


def _temporaries(folder: Path, pattern: re.Pattern) -> list[Path]:
    if not folder.is_dir():
        return []
    with os.scandir(folder) as entries:
        return [Path(entry.path) for entry in entries if pattern.fullmatch(entry.name)]


def _remove_if_stale(path: Path) -> bool:
    """Remove ``path``, a claim's temporary, unless its writer lives (holds its lock): False then."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:  # gone meanwhile, a link, or another user's that we cannot read: not ours to judge
        return True
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        if _same_file(fd, path):
            with suppress(OSError):  # e.g. another user's in a sticky folder: left for its owner
                os.unlink(path)
        return True
    finally:
        os.close(fd)


@atexit.register
def _release_claims() -> None:
    for claim in list(_CLAIMS.values()):
        claim.release()


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield the temporary to write ``path`` to; rename it onto ``path`` if the block succeeds.

    Writes through this process's claim of ``path`` or, when it has none, claims ``path`` for the block
    (:func:`claim_output`: :class:`OutputBusy` while another process writes it). A write that finds no room
    raises ``OSError`` naming ``path`` (:func:`writing`).
    """
    held = _CLAIMS.get(_key(path))
    claim = held if held is not None and held.held else claim_output(path)
    try:
        with writing(claim.tmp, shown=path):
            yield claim.tmp
        claim.commit()
    finally:
        if claim is not held:
            claim.release()


@contextmanager
def writing(path: str | os.PathLike, shown: str | os.PathLike | None = None) -> Iterator[None]:
    """Around the code that writes the file ``path``: when it fails for want of room (a full disk, the file
    size limit, a quota, a read-only file system: :data:`dpar.errors.WRITE_ERRNOS`), whatever the writer
    raised, it raises ``OSError(errno, reason, shown or path)``, which ``dpar.errors.run_main`` prints as one
    line. Where the writer lost the errno (numpy's ``tofile``, ``torch.save``) it is found by writing one more
    byte to ``path`` and from the free space of its file system (safetensors names it in its text). The file is then
    half-written: write it to a temporary (:func:`atomic_path`) or into a staging folder."""
    try:
        yield
    except Exception as error:
        code = _room_errno(error, Path(path))
        if code is None:
            raise
        raise OSError(code, os.strerror(code), str(shown if shown is not None else path)) from error


def _room_errno(error: Exception, path: Path) -> int | None:
    if isinstance(error, OSError) and error.errno is not None:
        return error.errno if error.errno in WRITE_ERRNOS else None
    rust = re.search(r"\(os error (\d+)\)", str(error))  # a Rust io::Error (safetensors) as its text ends
    if rust:
        return int(rust.group(1)) if int(rust.group(1)) in WRITE_ERRNOS else None
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    except OSError:
        return None
    try:
        os.write(fd, b"\0")
        space = os.fstatvfs(fd)
        return errno.ENOSPC if (space.f_bfree if os.geteuid() == 0 else space.f_bavail) == 0 else None
    except OSError as probe:
        return probe.errno if probe.errno in WRITE_ERRNOS else None
    finally:
        os.close(fd)


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


def _no_broken_link(path: Path, what: str) -> None:
    """One line when ``path``, or a folder above it that does not exist, is a symbolic link that leads nowhere
    (to nothing, or round a loop of links): creating it would fail, after the work."""
    for part in (path, *path.parents):
        if os.path.exists(part):
            return
        if os.path.islink(part):
            try:
                os.stat(part)
                leads = "which does not exist"
            except OSError as error:
                leads = "a loop of links" if error.errno == errno.ELOOP else "which does not exist"
            raise UserError(f"{what} {path}: {part} is a symbolic link to {os.readlink(part)}, {leads}; create "
                            "its target, remove the link or give another path")


def may_replace(folder: os.stat_result, entry: os.stat_result, euid: int) -> bool:
    """Whether user ``euid`` may rename onto or remove ``entry`` (its ``lstat``) in ``folder`` (its ``stat``),
    as far as the sticky bit goes: in a sticky folder such as /tmp only the entry's owner, the folder's owner
    or root may (write access to the folder is checked on its own)."""
    return not folder.st_mode & stat.S_ISVTX or euid in (0, entry.st_uid, folder.st_uid)


def _replaceable(path: Path, what: str) -> None:
    """One line when ``path`` exists and the sticky bit of its folder keeps this user from replacing it."""
    if not os.path.lexists(path):
        return
    entry = os.lstat(path)
    if not may_replace(os.stat(path.parent), entry, os.geteuid()):
        raise UserError(f"{what} {path} exists and belongs to another user (uid {entry.st_uid}) in "
                        f"{path.parent}, a sticky folder (like /tmp) where only its owner may replace or remove "
                        "it; have them remove it, or write elsewhere")


def check_output_dir(path: str | os.PathLike, what: str, removed: bool = False) -> Path:
    """``path`` is, or can be created as, a writable folder; else one :class:`UserError` line naming ``what``
    (the flag or config key). ``removed``: the command removes the folder when done (or replaces it), so it
    must be a folder, not a link to one, that this user may remove. Creates nothing."""
    path = _named(path, what)
    _no_broken_link(path, what)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == path else f" ({existing} is a file)"
        raise UserError(f"{what} {path} must be a folder, but it is a file{where}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path}: {existing} is not writable")
    if removed and path.is_symlink():
        raise UserError(f"{what} {path} is a symbolic link (to {os.readlink(path)}); the command removes this "
                        "folder when done, which would remove the link and leave its files: give a folder")
    if removed:
        _replaceable(path, what)
    return path


def check_output_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` can be written as a file by :func:`atomic_path` (it is not a folder or a link that leads
    nowhere, its folder can be made, an existing file there may be replaced by this user, its name and its
    temporary's fit the file system); else one line."""
    path = _named(path, what)
    _no_broken_link(path, what)
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
    _replaceable(path, what)
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


def npy_header(stream) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) of the .npy at the start of ``stream`` (e.g. an ``.npz`` member), read
    without its data; leaves ``stream`` at the data."""
    version = np.lib.format.read_magic(stream)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(stream)
