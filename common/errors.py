"""Errors and exit codes: one convention for every lmforge command.

====  =========================================================================================
code  meaning
====  =========================================================================================
0     success
1     a check failed (``verify`` found damaged shards, an export did not verify) or an internal
      error (a bug: the traceback is printed)
2     bad input or configuration: a missing or malformed file, an unknown config key, a value out
      of range, inputs that changed under a resumable job (also argparse's usage errors)
3     training aborted (too many consecutive non-finite steps); the last good checkpoint is intact
130   interrupted (Ctrl-C before the command could stop cleanly)
====  =========================================================================================

Every error a user can act on is an ``LmforgeError`` whose message names the file, line or config key
and the reason; ``run_cli`` prints it as one ``error: ...`` line, without a traceback. A dependency missing
from the Python that runs the command is one such line too (exit 2), saying which environment to use.

In a job of several ranks (``RANK`` set by the launcher) the same error is usually raised by every rank:
under ``python -m lmforge.trainer.launch`` (what the launch scripts use; it sets ``LMFORGE_ERROR_FILE``)
each rank appends its line to that file instead of printing it, and the launch command prints each distinct
line once, after the launcher's own output, as the last thing it says (ranks on other nodes cannot reach
that file and print theirs). Without it (``deepspeed ...`` run directly), only the first rank of each
node prints it.
"""

from __future__ import annotations

import os
import socket
import sys
import traceback
from collections.abc import Callable

ERROR_FILE_ENV = "LMFORGE_ERROR_FILE"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_ABORTED = 3
EXIT_INTERRUPTED = 130


class LmforgeError(Exception):
    """Base of the errors lmforge reports to users. ``exit_code`` says which kind it is."""

    exit_code = EXIT_BAD_INPUT


class InputError(LmforgeError, ValueError):
    """Bad input or configuration (exit 2). Subclassed per stage (ConfigError, ManifestError, ...)."""


class CheckFailed(LmforgeError):
    """A verification found problems (exit 1)."""

    exit_code = EXIT_FAILED


class TrainingAborted(LmforgeError, RuntimeError):
    """Training stopped itself to protect the run (exit 3)."""

    exit_code = EXIT_ABORTED


def _report(message: str) -> None:
    """Print ``message`` (one line) as this process's error: once per job, not once per rank (module
    docstring)."""
    rank = os.environ.get("RANK")
    if rank is None:
        print(message, file=sys.stderr, flush=True)
        return
    host, _, path = os.environ.get(ERROR_FILE_ENV, "").partition(":")
    if path and host == socket.gethostname():  # a rank on another node cannot append to the launcher's file
        try:
            # One short append per rank: O_APPEND writes of a line do not interleave.
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, f"{rank}\t{message}\n".encode())
            finally:
                os.close(fd)
            return
        except OSError:
            pass
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)


def _missing_dependency(e: ModuleNotFoundError) -> str | None:
    """The one-line message for a third-party package this Python lacks; None for anything else."""
    top = (e.name or "").split(".")[0]
    if not top or top == "lmforge":
        return None
    return (f"error: the Python running this command ({sys.executable}) has no {top!r} module, which lmforge "
            "needs: use the project's environment (`source .venv/bin/activate` in the clone, after `make setup`) "
            "or install lmforge into this one (`pip install -e CLONE`)")


def install_missing_dependency_hook() -> None:
    """Make an uncaught ModuleNotFoundError of a third-party package (an import at the top of a command's
    module, before ``run_cli`` runs) the same one line as in ``run_cli``, exit 2; anything else goes to the
    hook that was there. Installed once, when ``lmforge.common`` is first imported."""
    previous = sys.excepthook
    if getattr(previous, "_lmforge", False):
        return

    def hook(kind, value, tb):
        message = _missing_dependency(value) if isinstance(value, ModuleNotFoundError) else None
        if message is None:
            previous(kind, value, tb)
            return
        print(message, file=sys.stderr, flush=True)
        sys.stderr.flush()
        os._exit(EXIT_BAD_INPUT)

    hook._lmforge = True
    sys.excepthook = hook


def run_cli(main: Callable[[], int | None], prog: str = "lmforge") -> int:
    """Run a command's body under the exit-code convention: LmforgeError -> its code with one
    ``error:`` line; an unreadable or unwritable file (OSError) or a missing dependency -> 2; anything
    else -> 1 with the traceback (a bug)."""
    try:
        return int(main() or 0)
    except LmforgeError as e:
        _report(f"error: {e}")
        return e.exit_code
    except OSError as e:  # a path the user gave that cannot be read or written, a full disk
        _report(f"error: {e}")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        message = _missing_dependency(e) if isinstance(e, ModuleNotFoundError) else None
        if message is not None:
            _report(message)
            return EXIT_BAD_INPUT
        traceback.print_exc()
        print(f"{prog}: internal error (a bug in lmforge; the traceback above says where)", file=sys.stderr)
        rank = os.environ.get("RANK")
        if rank is not None and os.environ.get(ERROR_FILE_ENV):
            _report(f"error: internal error on rank {rank} (a bug in lmforge; its traceback is above)")
        return EXIT_FAILED
