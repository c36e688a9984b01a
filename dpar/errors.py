"""User-facing errors: bad input is reported as one line naming the problem, never a traceback."""
from __future__ import annotations

import argparse
import sys
from typing import Callable


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


def run_main(main: Callable[[], int | None]) -> None:
    """Run a script's ``main``; a :class:`UserError` exits with status 2 and a one-line message."""
    try:
        status = main()
    except UserError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        sys.exit(2)
    sys.exit(status or 0)


def one_line(error: UserError) -> str:
    """The message itself, also when a DataLoader worker re-raised it wrapped in its traceback text."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if len(lines) > 1 and "DataLoader worker" in lines[0]:
        return lines[-1].split(": ", 1)[-1]
    return " ".join(lines)
