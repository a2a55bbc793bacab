"""Stop requests: SIGTERM (schedulers, ``scancel``), SIGINT (Ctrl-C) and SIGUSR1 (Slurm's advance warning
before the time limit) set a flag that the step loop sends to every rank with the step's other values
(``distributed.StepSums``); all ranks then stop after the same step — at most two steps after the one
the signal arrived in, at once on log, eval and save steps — save and exit 0. A second Ctrl-C stops at
once."""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopFlag:
    def __init__(self):
        self.signal: str | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        if self.signal == "SIGINT" and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        self.signal = signal.Signals(signum).name
