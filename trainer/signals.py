"""Stop requests. Each sets a reason that the step loop sends to every rank with the step's other values
(``distributed.StepSums``); all ranks then stop after the same step — at most two steps after the one
the request was seen in, at once on log, eval and save steps — save and exit with
train.stopped_exit_status (0 by default). One rank seeing a request is enough: the flag
is summed over all ranks. The requests:

* **signals**: SIGTERM (schedulers, ``scancel``), SIGINT (Ctrl-C) and SIGUSR1 (Slurm's advance warning
  before the time limit). The first one is the reason; Ctrl-C again (a second SIGINT) stops at once,
  without a checkpoint. Every other signal after the first changes nothing: neither a different one
  (Slurm's SIGUSR1 warning, then its SIGTERM at the time limit) nor a repeated SIGTERM or SIGUSR1 (one
  that reaches a rank both from the scheduler and forwarded by a launcher) ends the save under way.
* **the stop file** ``RUN_DIR/STOP`` (``touch RUN_DIR/STOP``, or ``python -m lmforge.trainer.launch --stop
  RUN_DIR``): for launchers that kill remote ranks outright (DeepSpeed's pdsh runner) and for people
  without a shell on the nodes. Looked for at most once per ``POLL_SECONDS``; a rank that saw it renames
  it to ``STOP.consumed`` when the run has stopped, so that the next start trains.
* **the launcher is gone**: a rank started by a launcher (``deepspeed``, its per-node
  ``deepspeed.launcher.launch``, ``torchrun``, ``mpirun``/``mpiexec`` and their per-node daemons,
  ``trainer.launch``) watches those ancestor processes and stops when one of them exits: under a plain
  ``deepspeed`` whose own process was killed (SIGTERM to it alone leaves its per-node launcher and the
  ranks running), no orphan trains on. Each launcher is identified once, at start-up, by its start time
  in clock ticks since boot (``Launcher``): a step of the wall clock (NTP, PTP) does not make a live
  launcher look gone.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
STOP_FILE = "STOP"
POLL_SECONDS = 1.0
# Command-line marks of the launcher processes a rank watches (python modules or executables).
LAUNCHER_MARKS = ("deepspeed.launcher.launch", "deepspeed.launcher.runner", "trainer.launch",
                  "torch.distributed.run", "torchrun")
# Launcher executables, by the basename of the program or of the script python runs: the DeepSpeed
# runner, MPICH's Hydra (mpiexec and its per-node proxy) and Open MPI's (mpirun, prterun, prted, orted).
LAUNCHER_PROGRAMS = frozenset({"deepspeed", "mpiexec", "mpirun", "mpiexec.hydra", "hydra_pmi_proxy",
                               "prterun", "prted", "orted", "torchrun"})


# What a training rank runs: ``python -m lmforge.trainer.train`` (or the file itself).
RANK_MODULE = "lmforge.trainer.train"


def is_rank(cmdline: list[str]) -> bool:
    """A training rank's command line (its module or file, and no launcher module)."""
    runs_training = RANK_MODULE in cmdline or any(a.endswith("trainer/train.py") for a in cmdline)
    return runs_training and not _is_launcher(cmdline)


def _is_launcher(cmdline: list[str]) -> bool:
    """A launcher's command line (never a rank's: ranks run `-m lmforge.trainer.train` with no launcher module)."""
    if any(mark in arg for arg in cmdline for mark in LAUNCHER_MARKS):
        return True
    # A launcher program, or its console script run by python (python /path/to/bin/deepspeed ...).
    return any(os.path.basename(arg) in LAUNCHER_PROGRAMS for arg in cmdline[:2])


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time) of a process from ``/proc/PID/stat``: field 3 and field 22, the start in clock
    ticks since boot, which no change of the wall clock moves. None when the process is gone (or when
    there is no procfs)."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()  # after "PID (comm) ": the comm may hold spaces or ")"
    return fields[0].decode(), int(fields[19])


class Launcher:
    """A launcher process a rank watches, identified at start-up for good. Liveness never looks at the
    wall clock: ``psutil.Process.create_time()`` is the boot time (``btime`` from ``/proc/stat``, read anew
    each time) plus the start in ticks, and moves whenever NTP/PTP steps the clock (psutil issues #1724,
    #2526) — compared with its start-up value, every live launcher would look gone and every rank stop.
    On Linux the start ticks themselves are compared (psutil's own identity check, ``is_running()``,
    uses them only from psutil 7.1, and DeepSpeed requires psutil without a version); elsewhere
    ``is_running()`` is the check. A zombie (exited, not yet reaped) counts as gone."""

    def __init__(self, proc):
        self.proc = proc  # the psutil.Process from start-up
        self.pid = proc.pid
        stat = _proc_stat(self.pid)
        self.start_ticks = stat[1] if stat is not None else None

    def alive(self) -> bool:
        if self.start_ticks is not None:
            stat = _proc_stat(self.pid)
            return stat is not None and stat[1] == self.start_ticks and stat[0] not in ("Z", "X", "x")
        import psutil

        try:
            return self.proc.is_running() and self.proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False


def launcher_ancestors() -> list[Launcher]:
    """This process's launcher ancestors, nearest first, up to the first ancestor that is not a launcher
    (a shell, srun's step daemon, the scheduler: never watched)."""
    import psutil  # a DeepSpeed dependency

    out = []
    try:
        p = psutil.Process().parent()
        while p is not None and p.pid > 1 and _is_launcher(p.cmdline()):
            out.append(Launcher(p))
            p = p.parent()
    except psutil.Error:
        pass
    return out


class StopFlag:
    """``reason`` is None until a stop is requested; ``poll()`` (once per step, cheap) looks for the stop
    file and the launchers, at most once per POLL_SECONDS."""

    def __init__(self, run_dir: str | Path | None = None):
        self.signal: str | None = None  # the reason (kept under its old name: a signal's name or other)
        self.stop_file = Path(run_dir) / STOP_FILE if run_dir is not None else None
        self.saw_stop_file = False
        self.received: set[int] = set()  # the stop signals seen
        self.launchers = launcher_ancestors()
        self._next_poll = 0.0
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        if signum == signal.SIGINT and signal.SIGINT in self.received:
            raise KeyboardInterrupt  # Ctrl-C again: stop now, without the checkpoint
        self.received.add(signum)
        if self.signal is None:  # the first request is the reason; a later, different signal changes nothing
            self.signal = signal.Signals(signum).name

    def poll(self) -> bool:
        """True once a stop has been requested by any means."""
        now = time.monotonic()
        if self.signal is None and now >= self._next_poll:
            self._next_poll = now + POLL_SECONDS
            if self.stop_file is not None and self.stop_file.exists():
                self.saw_stop_file = True
                self.signal = f"the stop file {self.stop_file}"
            else:
                for launcher in self.launchers:
                    if not launcher.alive():
                        self.signal = f"the launcher (pid {launcher.pid}) exiting"
                        break
        return self.signal is not None

    def consume_stop_file(self) -> None:
        """After the stop: rename the stop file so that the next start trains (every rank that saw it
        tries; one succeeds, the others find it gone)."""
        if self.saw_stop_file and self.stop_file is not None:
            try:
                os.replace(self.stop_file, self.stop_file.with_name(STOP_FILE + ".consumed"))
            except OSError:
                pass
