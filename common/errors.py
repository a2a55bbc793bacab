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
and the reason; ``run_cli`` prints it as one ``error: ...`` line, without a traceback.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable

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


def run_cli(main: Callable[[], int | None], prog: str = "lmforge") -> int:
    """Run a command's body under the exit-code convention: LmforgeError -> its code with one
    ``error:`` line; an unreadable or unwritable file (OSError) -> 2; anything else -> 1 with the
    traceback (a bug)."""
    try:
        return int(main() or 0)
    except LmforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # a path the user gave that cannot be read or written, a full disk
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception:
        traceback.print_exc()
        print(f"{prog}: internal error (a bug in lmforge; the traceback above says where)", file=sys.stderr)
        return EXIT_FAILED
