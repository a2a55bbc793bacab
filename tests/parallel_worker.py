"""Parity worker: several real DeepSpeed engines, one after another, in one multi-process launch.

    deepspeed --num_gpus 2 tests/parallel_worker.py SPEC.json

Each launch costs 20-40 s of start-up here, so tests/test_parallel_parity.py batches its comparisons:
every case in the spec builds its engine with the trainer's own code (``trainer.engine`` layout, model
build incl. ``zero.Init`` for ZeRO-3, param groups; ``trainer.ds_config``; the trainer's LR schedule),
trains ``steps`` optimizer steps on a fixed random-token global batch per step, and records the loss
(mean over the global batch), DeepSpeed's global grad norm and the parameter shapes this rank holds.
Every case sees the same global batch at each step, however it is split into ranks and micro-batches.
Rank 0 writes ``{case name: {...}}`` to ``spec["out"]``.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import get_preset  # noqa: E402
from trainer import distributed  # noqa: E402
from trainer.config import RunConfig  # noqa: E402
from trainer.ds_config import build_ds_config  # noqa: E402
from trainer.engine import (  # noqa: E402
    build_model,
    check_tensor_parallel,
    init_layout,
    keep_zero0_grad_norm,
    param_groups,
)
from trainer.train import lr_lambda  # noqa: E402


def learnable_batch(n: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    """Each sample repeats a random 2..8-token pattern: a 2-layer model learns to copy within a few
    steps, so the loss moves (~0.1 nat per step early on) and any difference in the updates shows in it."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        period = int(torch.randint(2, 9, (1,), generator=gen))
        pattern = torch.randint(0, vocab, (period,), generator=gen)
        rows.append(pattern.repeat(length // period + 1)[:length])
    return torch.stack(rows)


def run_case(case: dict, spec: dict) -> dict:
    import deepspeed

    cfg = RunConfig()
    cfg.train.micro_batch_size, cfg.train.grad_accum = case["micro"], case["grad_accum"]
    cfg.train.max_steps, cfg.train.precision = spec["steps"], "fp32"
    cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_steps = 1e-2, 1e-3, 2
    cfg.parallel.zero_stage, cfg.parallel.tensor_parallel = case["zero_stage"], spec["tp"]
    cfg.parallel.activation_checkpointing = case.get("ac", 0)
    cfg.parallel.offload = case.get("offload", "none")
    layout = init_layout(spec["tp"])
    mcfg = get_preset("debug", vocab_size=spec["vocab"])
    check_tensor_parallel(mcfg, layout.tp)
    ds_config = build_ds_config(cfg, layout.dp, "fp32")
    model = build_model(mcfg, ds_config, cfg.parallel.zero_stage, case.get("seed", spec["seed"]), layout,
                        activation_checkpointing=cfg.parallel.activation_checkpointing)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.optim.weight_decay), config=ds_config,
        mpu=layout.mpu, lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)))
    keep_zero0_grad_norm(engine)  # as the trainer does
    shapes = {n: list(p.shape if not hasattr(p, "ds_shape") else p.ds_shape)
              for n, p in engine.module.named_parameters()}
    per_rank = case["micro"] * case["grad_accum"]
    global_batch = per_rank * layout.dp
    losses, norms = [], []
    for step in range(spec["steps"]):
        ids = learnable_batch(global_batch, spec["seq_len"] + 1, spec["vocab"], spec["data_seed"] * 1000 + step)
        mine = ids[layout.dp_rank * per_rank:(layout.dp_rank + 1) * per_rank]
        total = 0.0
        for j in range(case["grad_accum"]):
            mb = mine[j * case["micro"]:(j + 1) * case["micro"]]
            loss = engine(mb[:, :-1].contiguous(), labels=mb[:, 1:].contiguous())
            engine.backward(loss)
            engine.step()
            total += loss.item()
        t = torch.tensor([total / case["grad_accum"]], dtype=torch.float64)
        dist.all_reduce(t)  # TP ranks hold equal losses: the world mean is the data-parallel mean
        losses.append(t.item() / layout.world)
        g = engine.get_global_grad_norm()
        norms.append(float(g.item() if torch.is_tensor(g) else g))
    engine.destroy()
    del engine, model
    gc.collect()
    return {"losses": losses, "grad_norms": norms, "shapes": shapes, "dp": layout.dp, "dp_rank": layout.dp_rank,
            "tp_rank": layout.tp_rank}


def main() -> None:
    # The deepspeed launcher adds --local_rank=N; the spec path is the one other argument.
    spec = json.loads(Path([a for a in sys.argv[1:] if not a.startswith("--")][0]).read_text())
    distributed.init()
    results = {}
    for case in spec["cases"]:
        out = run_case(case, spec)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, {k: out[k] for k in ("shapes", "dp_rank", "tp_rank")})
        out["ranks"] = gathered
        del out["shapes"]
        results[case["name"]] = out
        if dist.get_rank() == 0:
            print(f"case {case['name']}: losses {out['losses']}", flush=True)
    if dist.get_rank() == 0:
        tmp = Path(spec["out"] + ".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(spec["out"])
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
