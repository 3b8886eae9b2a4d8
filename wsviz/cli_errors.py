"""How every wsviz command line ends: one line on stderr that names what to fix, and an exit status.

=====  ==================================================================================
0      success
2      the command line is wrong (an unknown option, a missing argument) or names
       something wsviz refuses (a WsvizError: unknown model or family, a checkpoint that
       cannot be used, a bad option value)
1      a failure at run time: a file that cannot be read or written, out of memory, a
       damaged or read-only run store, anything unexpected
130    interrupted (Ctrl-C, SIGINT)
143    terminated (SIGTERM)
=====  ==================================================================================

No traceback is printed unless ``--debug`` is on the command line or ``WSVIZ_DEBUG=1``.
Entry points use it in two lines: their parser is a :class:`CliParser`, and ``__main__`` runs
``sys.exit(run_cli(main))``.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence

from wsviz.errors import WsvizError

USAGE, FAILURE, INTERRUPTED, TERMINATED = 2, 1, 130, 143
_HINTS = {
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EEXIST: "a file is in the way: choose another path",
    errno.EISDIR: "give a file, not a folder",
    errno.EACCES: "check its permissions, or choose a path you can write",
    errno.EPERM: "check its permissions, or choose a path you can write",
    errno.EROFS: "the filesystem is read-only: choose a path you can write",
    errno.ENOSPC: "the disk is full: free some space",
}


class UsageError(WsvizError):
    """The command line itself is wrong (what argparse reports)."""

    exit_code = USAGE


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM, so ``finally`` blocks run (BaseException: not swallowed
    by ``except Exception``)."""


class CliParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block) and that accepts ``--debug``.

    Sub-parsers made with ``add_subparsers`` are CliParsers too.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="on an error, also print the Python traceback (or set WSVIZ_DEBUG=1)")

    def error(self, message: str):  # noqa: D102 - argparse's hook; must not return
        raise UsageError(f"{message} (see {self.prog} --help)")


def debug_requested(argv: Sequence[str] | None = None) -> bool:
    """Whether the user asked for tracebacks: ``--debug`` among the arguments or WSVIZ_DEBUG set (not 0)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--" in args:
        args = args[: args.index("--")]
    return "--debug" in args or os.environ.get("WSVIZ_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def one_line(text: object) -> str:
    return " ".join(str(text).split()) or "(no message)"


def describe(exc: BaseException) -> tuple[str, int]:
    """(one-line message, exit status) for an exception that ended a command."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", INTERRUPTED
    if isinstance(exc, Terminated):
        return "terminated", TERMINATED
    if isinstance(exc, WsvizError):
        return one_line(exc), int(getattr(exc, "exit_code", USAGE))
    if isinstance(exc, MemoryError):
        return "out of memory: use fewer images (--limit), a smaller batch or a smaller model", FAILURE
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename is not None else ""
        where += f" -> {exc.filename2}" if exc.filename2 is not None else ""
        hint = _HINTS.get(exc.errno)
        return one_line(f"{exc.strerror}{where}" + (f" ({hint})" if hint else "")), FAILURE
    text = one_line(exc)
    if len(text) > 500:
        text = text[:500] + "..."
    return f"{type(exc).__name__}: {text} (run again with --debug for the traceback)", FAILURE


def _raise_terminated(signum, frame):
    raise Terminated()


def run_cli(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)`` and turn whatever ends it into an exit status, errors into one line on stderr."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(args)
    previous = None
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # never replace a handler someone installed
        try:
            previous = signal.signal(signal.SIGTERM, _raise_terminated)
        except ValueError:  # not the main thread (run from a test thread): leave signals alone
            previous = None
    try:
        code = main(args)
        return 0 if code is None else int(code)
    except SystemExit as exc:  # --help, or a main that calls sys.exit itself
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else FAILURE)
    except BrokenPipeError:  # the reader went away (`... | head`): stop quietly, as SIGPIPE would
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - so the interpreter's final flush is silent
        except OSError:
            pass
        return 128 + signal.SIGPIPE
    except BaseException as exc:  # noqa: BLE001 - the point: every error ends as one line and a status
        message, code = describe(exc)
        if debug:
            traceback.print_exc()
        try:
            print(f"error: {message}" if code not in (INTERRUPTED, TERMINATED) else message, file=sys.stderr, flush=True)
        except OSError:
            pass
        return code
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
