"""User-facing errors: bad input is reported as one line naming the problem, never a traceback."""
from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
from typing import Callable, NoReturn

# An OSError with one of these errnos is a lack of room for an output, not a bug: a full disk, the file size
# limit (ulimit -f), a quota, a file system mounted read-only.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS})

# What a script run under run_main says when Ctrl-C stops it (each script may say what is true for it).
INTERRUPTED = "no file was left half-written"

# How long a process of a launch other than rank 0 waits before it reports an error (see report_and_exit).
LAUNCH_GRACE_SECONDS = 5.0


class UserError(Exception):
    """A problem with what the user asked for (a config key, a file, a shape)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors (unknown flag, a value outside its type's rule) are one-line :class:`UserError` s,
    exit status 2 under :func:`run_main`, instead of a usage block. A module run with ``python -m`` is named
    so in its usage and messages."""

    def __init__(self, *args, **kwargs):
        main = sys.modules.get("__main__")
        spec = getattr(main, "__spec__", None)
        if "prog" not in kwargs and spec is not None and spec.name != "__main__":
            kwargs["prog"] = f"python -m {spec.name}"
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")


def first_line(error: BaseException) -> str:
    """The first line of any exception's message, or its type's name when the message is empty."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def run_main(main: Callable[[], int | None], interrupted: str = INTERRUPTED) -> None:
    """Run a script's ``main``, ending every way it can fail on its user's side in one line:

    * a :class:`UserError` (bad input, a busy output): ``error: <message>``, exit status 2;
    * an ``OSError`` for want of room (:data:`WRITE_ERRNOS`): ``error: writing <file>: <reason>``, status 1;
    * Ctrl-C: ``interrupted; <interrupted>`` (what a rerun does for this script), status 130.

    Under a launcher (``torchrun``, ``accelerate launch``) the line is printed once: see :func:`report_and_exit`.
    """
    try:
        status = main()
    except UserError as error:
        report_and_exit(f"error: {one_line(error)}", 2)
    except KeyboardInterrupt:
        report_and_exit(f"interrupted; {interrupted}", 130)
    except OSError as error:
        if error.errno not in WRITE_ERRNOS:
            raise
        report_and_exit(f"error: writing {error.filename or 'an output'}: {error.strerror}", 1)
    sys.exit(status or 0)


def report_and_exit(line: str, status: int) -> NoReturn:
    """Print ``line`` on stderr and exit with ``status``; printed once per launch, not once per process.

    Under a launcher (``WORLD_SIZE`` > 1) the processes share their inputs, so they usually fail alike: rank
    0 reports at once, and every other rank first waits :data:`LAUNCH_GRACE_SECONDS`, in which the launcher,
    seeing rank 0 fail, stops it. A rank that outlives the wait failed alone, and reports. The one that
    reports also writes the line where torchrun reads a failure (``TORCHELASTIC_ERROR_FILE``), so torchrun's
    own failure report, which it prints in any case, names it as the root cause.
    """
    if int(os.environ.get("WORLD_SIZE") or 1) > 1 and int(os.environ.get("RANK") or 0) != 0:
        try:
            time.sleep(LAUNCH_GRACE_SECONDS)
        except KeyboardInterrupt:  # Ctrl-C reaches every process: rank 0 reports it
            os._exit(status)
    _write_launcher_error_file(line)
    print(line, file=sys.stderr, flush=True)
    sys.exit(status)


def _write_launcher_error_file(line: str) -> None:
    """``line`` in the error file torchrun gives each process, in the JSON its failure report reads (the one
    ``torch.distributed.elastic.multiprocessing.errors.ErrorHandler`` writes, the line in place of a
    traceback)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w") as f:
            json.dump({"message": {"message": line, "extraInfo": {"timestamp": str(int(time.time()))}}}, f)
    except OSError:  # the launcher then reports the exit status alone
        pass


def one_line(error: UserError) -> str:
    """The message itself, also when a DataLoader worker re-raised it wrapped in its traceback text."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if len(lines) > 1 and "DataLoader worker" in lines[0]:
        return lines[-1].split(": ", 1)[-1]
    return " ".join(lines)
