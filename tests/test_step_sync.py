"""The step loop reads no tensor on the host between log, eval and save steps.

On a GPU every such read (``.item()``, ``.tolist()``, ``bool(t)``, ...) blocks the host until the device
drains, so the next step's kernels cannot be queued ahead. CUDA's ``set_sync_debug_mode`` catches them
on a GPU (tests/gpu); here, on CPU, the Tensor methods that read values on the host are wrapped and every
call made directly from lmforge's own code (trainer/ and model/; DeepSpeed's internal reads are listed
in the README) is recorded with the step and the phase it happened in. Inside ``train_step`` none is
allowed; between steps only at sync steps (log, eval, save, the last step) and in ``StepSums.ready``,
which reads records whose reduction has completed.

One read per optimizer step remains by design, and is excluded here: deciding to skip an update with
non-finite gradients needs the host to know, which DeepSpeed's own ZeRO 1-3 and fp16 optimizers do with
a host read of their overflow flag; at ZeRO-0, ``deepspeed_compat.install_nonfinite_guard`` does the same
(``guarded_step``). The README lists these reads.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.distributed import run_distributed
from tests.helpers.paths import ROOT
from tests.helpers.runs import write_config

OURS = (str(ROOT / "trainer"), str(ROOT / "model"))
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


def _track_phase(trainer) -> dict:
    """``state["phase"]`` is "train_step" while the trainer is inside ``train_step``, else "loop"."""
    state = {"phase": "loop"}
    step = trainer.train_step

    def train_step(*args):
        state["phase"] = "train_step"
        try:
            return step(*args)
        finally:
            state["phase"] = "loop"

    trainer.train_step = train_step
    return state



def run_and_record(cfg_path: str, inject_nan_at: int) -> tuple[list, list[int]]:
    """Build a Trainer in this rank, record host reads by our code while it runs; -> (reads, sync steps)."""
    import os

    from lmforge.trainer import train
    from lmforge.trainer.config import load_config

    os.environ[train.faults.INJECT_ENV] = str(inject_nan_at)  # a non-finite step must not force a read
    trainer = train.Trainer(load_config(cfg_path))
    state = _track_phase(trainer)
    reads = []
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def wrap(name, fn):
        def read(self, *args, **kwargs):
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(OURS):
                reads.append((trainer.run.step, state["phase"], f"{Path(caller.f_code.co_filename).name}:"
                              f"{caller.f_lineno} {caller.f_code.co_name} .{name}()"))
            return fn(self, *args, **kwargs)
        return read

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    try:
        trainer.run_loop()
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
    sync = [s for s in range(1, trainer.cfg.train.max_steps + 1) if trainer._is_sync_step(s)]
    return reads, sync


def test_no_host_reads_between_sync_steps(tmp_path, tiny_data):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_data, tmp_path / "run",
                       train={"max_steps": 12, "micro_batch_size": 2, "grad_accum": 2, "seed": 7,
                              "precision": "fp32"},
                       log={"interval": 5}, checkpoint={"interval": 0}, eval={"interval": 0},
                       parallel={"zero_stage": 0})
    (reads, sync), = run_distributed(run_and_record, 1, (str(cfg), 3), timeout=300)
    assert sync == [5, 10, 12]
    guard = [r for r in reads if "guarded_step" in r[2]]
    assert len(guard) == 12  # the ZeRO-0 overflow check: one per optimizer step (module docstring)
    in_step = [r for r in reads if r[1] == "train_step" and r not in guard]
    assert in_step == [], in_step
    between = [r for r in reads if r[1] == "loop" and r[0] not in sync and " ready " not in r[2]]
    assert between == [], between
    # The recorder sees reads when they happen: the log steps read the loss and the grad norm.
    assert any(r[0] == 5 and r[1] == "loop" for r in reads), reads


def run_with_cuda_sync_warnings(cfg_path: str) -> tuple[list, list[int]]:
    """On CUDA: the trainer under ``torch.cuda.set_sync_debug_mode("warn")``; every synchronizing call made
    from our code (the warning's location) with the step and phase (tests/gpu/test_gpu.py)."""
    import warnings

    from lmforge.trainer import train
    from lmforge.trainer.config import load_config

    trainer = train.Trainer(load_config(cfg_path))
    state = _track_phase(trainer)
    syncs = []

    def record(message, category, filename, lineno, file=None, line=None):
        if str(filename).startswith(OURS):
            syncs.append((trainer.run.step, state["phase"], f"{Path(filename).name}:{lineno} {message}"))

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():  # restores showwarning afterwards
            warnings.simplefilter("always")
            warnings.showwarning = record
            trainer.run_loop()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    sync = [s for s in range(1, trainer.cfg.train.max_steps + 1) if trainer._is_sync_step(s)]
    return syncs, sync


@pytest.mark.parametrize("kernel", ["causal", "spans", "mask"])
def test_model_step_has_no_data_dependent_shapes(kernel):
    """An op whose output shape depends on tensor values (``nonzero``, boolean indexing, ``unique``)
    makes the host wait for the GPU to learn the shape: a hidden sync the Tensor-method wrapping above
    cannot see. Fake tensors have no values, so such an op raises ``DynamicOutputShapeException`` there:
    forward and backward of the training loss (chunked, with masked labels, each document kernel the CPU
    can train with; flex's CPU backward does not exist, tests/gpu runs it under CUDA's sync check) run
    under ``FakeTensorMode`` here. It caught the chunked loss selecting its unmasked rows."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lmforge.model.llama import LlamaConfig, LlamaForCausalLM
    from lmforge.trainer.batching import document_attention

    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    model.loss_chunk_tokens = 32  # 128 tokens: 4 chunks
    x = torch.randint(3, 512, (2, 64))
    labels = x.clone()
    labels[:, :5] = -100
    seg = torch.zeros(2, 64, dtype=torch.long)
    seg[:, 30:] = 1
    batch = {"input_ids": x, "labels": labels}
    if kernel != "causal":
        batch = document_attention({**batch, "segment_ids": seg}, min_mean_tokens=0, kernel=kernel)
        assert ("doc_spans" if kernel == "spans" else "attn_mask") in batch
    with FakeTensorMode(allow_non_fake_inputs=True):
        loss = model(**batch)
        loss.backward()
    assert loss.shape == ()
