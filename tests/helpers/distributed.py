"""Run a function on N real ranks (OLMo-core's ``run_distributed_test`` idea).

``run_distributed(fn, world_size=2, args=(...))`` starts ``world_size`` processes the way a launcher
does (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT in the environment, one thread each), each
joins the process group through the trainer's own ``trainer.parallel.distributed.init`` (gloo on CPU, NCCL on
CUDA, DeepSpeed's communication layer initialised), calls ``fn(*args)`` and sends back what it returns.
The parent gets the per-rank results in rank order, or an AssertionError carrying every failing rank's
traceback. ``fn`` must be importable by module and name (a top-level function of a test module or
helper), and its arguments and result picklable.

Each start costs a few seconds of imports: batch several cases into one ``fn`` where a test can.
"""

from __future__ import annotations

import importlib
import os
import pickle
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from tests.helpers.paths import ROOT
from tests.helpers.process import child_env, free_port


def run_distributed(fn: Callable, world_size: int = 2, args: tuple = (), timeout: float = 600,
                    init: bool = True, **env) -> list:
    """``[fn(*args) on rank 0, ..., on rank world_size-1]``; raises if any rank fails or times out.
    ``init=False``: the ranks do not join a process group first (for tests of the start-up itself)."""
    with tempfile.TemporaryDirectory(prefix="lmforge-dist-") as tmp:
        spec = Path(tmp) / "spec.pkl"
        spec.write_bytes(pickle.dumps((fn.__module__, fn.__qualname__, args, init)))
        port = free_port()
        procs = []
        for rank in range(world_size):
            penv = child_env(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=world_size, LOCAL_WORLD_SIZE=world_size,
                             LOCAL_SIZE=world_size, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **env)
            log = open(Path(tmp) / f"rank{rank}.log", "w")
            procs.append((subprocess.Popen([sys.executable, "-m", "tests.helpers.distributed", str(spec),
                                            str(Path(tmp) / f"rank{rank}.pkl")],
                                           cwd=ROOT, env=penv, stdout=log, stderr=subprocess.STDOUT), log))
        failures = _wait_all([p for p, _ in procs], timeout)
        for _, log in procs:
            log.close()
        results = []
        for rank, (p, _) in enumerate(procs):
            out = Path(tmp) / f"rank{rank}.pkl"
            ok, value = pickle.loads(out.read_bytes()) if out.is_file() else (False, None)
            if p.returncode != 0 or not ok:
                text = (Path(tmp) / f"rank{rank}.log").read_text()[-6000:]
                failures.append(f"rank {rank} exited {p.returncode}:\n{value or ''}\n--- output\n{text}")
            results.append(value)
        if failures:
            raise AssertionError(f"run_distributed({fn.__module__}.{fn.__qualname__}, {world_size}) failed:\n"
                                 + "\n".join(failures))
        return results


def _wait_all(procs: list[subprocess.Popen], timeout: float) -> list[str]:
    """Wait for every rank; once one fails, the others (blocked in a collective with it) get 10 s to
    finish before they are killed, instead of hanging until the process-group timeout."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
        if any(p.returncode not in (None, 0) for p in procs):
            deadline = min(deadline, time.monotonic() + 10)
        if time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            return [f"killed after {timeout} s or after another rank failed"]
        time.sleep(0.05)
    return []


def _main(spec_path: str, out_path: str) -> int:
    module, qualname, args, init = pickle.loads(Path(spec_path).read_bytes())
    try:
        if init:
            from lmforge.trainer.parallel import distributed

            distributed.init(timeout_minutes=10)
        fn = importlib.import_module(module)
        for part in qualname.split("."):
            fn = getattr(fn, part)
        result = (True, fn(*args))
    except BaseException:
        result = (False, traceback.format_exc())
    Path(out_path).write_bytes(pickle.dumps(result))
    import torch.distributed as dist

    if result[0] and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    # os._exit: skip interpreter teardown of DeepSpeed/torch threads (the result is already written).
    os._exit(0 if result[0] else 1)


if __name__ == "__main__":
    _main(*sys.argv[1:3])
