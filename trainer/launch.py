"""``python -m lmforge.trainer.launch -- LAUNCHER ...``: run a launcher command (``deepspeed ...``, ``mpirun ...``)
so that a stop reaches the ranks as a stop, however it is sent, and the command ends only when they do.

The plain launchers get stops wrong (README, "Stopping a run"): SIGTERM to ``deepspeed``'s process group
returns at once with -15 while the ranks are still saving, and its per-node launcher SIGKILLs them 30 s
later; SIGTERM to the ``deepspeed`` process alone leaves the ranks training. Here the launcher runs in a
session of its own, so a signal to this command's process group reaches this process only, which:

* forwards the first SIGTERM / SIGINT / SIGUSR1 (SIGHUP too, as SIGTERM) to the rank processes on this
  machine (``trainer.train`` below the launcher) — or, with none here (ranks started over ssh/pdsh on
  other nodes), writes the run's stop file ``RUN_DIR/STOP`` — and waits, without a deadline of its own,
  while every rank stops after the same step, saves and exits;
* when the same signal comes again (SIGHUP counting as SIGTERM), or after ``--grace SECONDS`` if given,
  kills the launcher and everything under it; a different stop signal after the first is reported in one
  line and otherwise ignored: a scheduler's warning (Slurm's SIGUSR1 ahead of the time limit) followed by
  its SIGTERM must not kill the ranks in the middle of the stop's save;
* exits with the launcher's status (after a clean stop, train.stopped_exit_status: 0 by default; a rank's
  failure is non-zero), then kills whatever the launcher left behind in its session: no process outlives
  the command;
* prints a failed run's error once, as its last line: the ranks on this machine append their error lines
  to a file named by ``LMFORGE_ERROR_FILE`` instead of each printing the same line
  (``lmforge.common.errors``), and each distinct line is printed after the launcher's own output.

``python -m lmforge.trainer.launch --stop RUN_DIR`` writes the stop file: every rank on every node saves and
exits (train.stopped_exit_status) at its next step boundary (the file is renamed ``STOP.consumed`` afterwards).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lmforge.common.errors import ERROR_FILE_ENV

from .signals import is_rank

FORWARDED = {signal.SIGTERM: signal.SIGTERM, signal.SIGINT: signal.SIGINT, signal.SIGUSR1: signal.SIGUSR1,
             signal.SIGHUP: signal.SIGTERM}


def _say(msg: str) -> None:
    print(f"[trainer.launch] {msg}", file=sys.stderr, flush=True)


def rank_processes(root_pid: int) -> list:
    """The training ranks (``lmforge.trainer.train``) below ``root_pid`` on this machine."""
    import psutil

    out = []
    try:
        children = psutil.Process(root_pid).children(recursive=True)
    except psutil.Error:
        return out
    for p in children:
        try:
            cmd = p.cmdline()
        except psutil.Error:
            continue
        if is_rank(cmd):
            out.append(p)
    return out


def run_dir_of(command: list[str]) -> Path | None:
    """The run directory of the trainer command inside ``command`` (its --config and overrides)."""
    if "--config" not in command:
        return None
    from .config import load_config

    i = command.index("--config")
    overrides = [a for a in command[i + 2:] if "=" in a and not a.startswith("-")]
    try:
        return Path(load_config(command[i + 1], overrides).run_dir)
    except Exception:  # noqa: BLE001 - the trainer reports config errors itself
        return None


def write_stop_file(run_dir: str | Path) -> Path:
    from .signals import STOP_FILE

    path = Path(run_dir) / STOP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{STOP_FILE}.tmp.{os.getpid()}")
    tmp.write_text(f"stop requested at {time.strftime('%Y-%m-%d %H:%M:%S')} by pid {os.getpid()}\n")
    os.replace(tmp, path)
    return path


class Launch:
    def __init__(self, command: list[str], grace: float | None):
        self.command, self.grace = command, grace
        self.proc: subprocess.Popen | None = None
        self.received: list[signal.Signals] = []  # the stop signals seen, as forwarded (SIGHUP as SIGTERM)
        self.first_name = ""  # the first one's own name
        self.deadline: float | None = None

    def _kill_all(self) -> None:
        """SIGKILL the launcher's process group and, while the launcher has not been reaped (its pid is
        still its own), every process below it: MPICH's hydra starts its proxy and each rank in a session
        of their own, out of reach of the group."""
        import psutil

        below = []
        if self.proc.returncode is None:
            try:
                below = psutil.Process(self.proc.pid).children(recursive=True)
            except psutil.Error:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for p in below:
            try:
                p.kill()  # psutil checks that the pid is still that process's
            except psutil.Error:
                pass

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        fwd = FORWARDED[signum]
        if self.received:
            if fwd in self.received:
                again = f"{name} again" if name == fwd.name else f"{name} (as {fwd.name}) again"
                _say(f"{again}: killing the launcher and every rank now (no checkpoint)")
                self._kill_all()
            else:
                # A scheduler's warning (Slurm's SIGUSR1 before the time limit) and then its SIGTERM, or
                # SIGTERM and then Ctrl-C: the save under way goes on.
                _say(f"already stopping after {self.first_name}; {name} ignored (send {name} again to kill "
                     "at once)")
                self.received.append(fwd)
            return
        self.received.append(fwd)
        self.first_name = name
        ranks = rank_processes(self.proc.pid)
        for p in ranks:
            try:
                p.send_signal(fwd)
            except Exception:  # noqa: BLE001 - a rank that is already gone
                pass
        if ranks:
            _say(f"{name}: forwarded {fwd.name} to {len(ranks)} rank(s) on this machine; they stop after the same "
                 "step and save. Waiting (send it again to kill at once).")
        else:
            run_dir = run_dir_of(self.command)
            if run_dir is not None:
                _say(f"{name}: no rank on this machine; wrote {write_stop_file(run_dir)}: every rank stops at "
                     "its next step boundary and saves. Waiting (send it again to kill at once).")
            else:
                _say(f"{name}: no rank found; forwarding {fwd.name} to the launcher")
                self.proc.send_signal(fwd)
        if self.grace is not None:
            self.deadline = time.monotonic() + self.grace

    def run(self) -> int:
        fd, errors = tempfile.mkstemp(prefix="lmforge-errors-", suffix=".txt")
        os.close(fd)
        env = {**os.environ, ERROR_FILE_ENV: f"{socket.gethostname()}:{errors}"}
        try:
            rc = self._run(env)
        finally:
            lines = Path(errors).read_text(errors="replace").splitlines() if os.path.exists(errors) else []
            os.unlink(errors)
        print_rank_errors(lines)
        return rc

    def _run(self, env: dict) -> int:
        # A session of its own: the launcher and its ranks get no signal sent to this command's group.
        # (A signal before the handlers below are in place ends this process; the ranks then see their
        # launcher ancestor gone and stop with a checkpoint.)
        self.proc = subprocess.Popen(self.command, start_new_session=True, env=env)
        for sig in FORWARDED:
            signal.signal(sig, self._on_signal)
        while True:
            try:
                rc = self.proc.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                if self.deadline is not None and time.monotonic() > self.deadline:
                    _say(f"--grace {self.grace:g}s passed: killing the launcher and every rank")
                    self._kill_all()
                    self.deadline = None
        self._kill_all()  # whatever the launcher left behind in its session
        if rc < 0:
            rc = 128 - rc
        if self.received:
            _say(f"launcher exited with status {rc}" + (" (clean stop)" if rc == 0 else ""))
        return rc


def print_rank_errors(lines: list[str]) -> None:
    """The ranks' error lines ("RANK<tab>error: ...") once each, in the order first reported; the ranks are
    named when they did not all say the same."""
    by_message: dict[str, list[str]] = {}
    for line in lines:
        rank, _, message = line.partition("\t")
        by_message.setdefault(message or rank, []).append(rank)
    for message, ranks in by_message.items():
        where = f" (rank {', '.join(sorted(set(ranks), key=lambda r: int(r) if r.isdigit() else 0))})"
        print(message + (where if len(by_message) > 1 else ""), file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lmforge.trainer.launch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grace", type=float, default=None,
                    help="after a stop signal, kill everything if the ranks have not exited within this many "
                         "seconds (default: wait as long as the save takes)")
    ap.add_argument("--stop", metavar="RUN_DIR", default=None,
                    help="write RUN_DIR/STOP (every rank saves and exits at its next step) and exit")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- LAUNCHER ARGS... (deepspeed, mpirun, ...)")
    a = ap.parse_args(argv)
    if a.stop is not None:
        if a.command:
            ap.error("--stop takes no command")
        _say(f"wrote {write_stop_file(a.stop)}")
        return 0
    command = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not command:
        ap.error("give the launcher command after --, e.g. "
                 "-- deepspeed --num_gpus 8 --module lmforge.trainer.train ...")
    return Launch(command, a.grace).run()


if __name__ == "__main__":
    sys.exit(main())
