"""Train 3 steps with/without AutoEP; print per-rank losses as JSON.
Usage: deepspeed --num_gpus 2 benchmarks/autoep_probe/train.py --model hf --ep 2 --zero 1
       (ep 0 = AutoEP disabled). Extra EP keys: --ep_json '{"preset_model":"qwen3_moe"}'
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import deepspeed
import deepspeed.comm as dist
from autoep_common import batch_for, build_hf, build_plain, ds_config, patch_can_record_registry  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--model", default="hf", choices=["hf", "plain", "plaincfg"])
p.add_argument("--ep", type=int, default=2)
p.add_argument("--zero", type=int, default=0)
p.add_argument("--dtype", default="fp32")
p.add_argument("--steps", type=int, default=3)
p.add_argument("--ep_json", default="{}")
p.add_argument("--cfg_json", default="{}")
p.add_argument("--router_logits", action="store_true")
p.add_argument("--client_opt", action="store_true")
p.add_argument("--print_sd", action="store_true")
p.add_argument("--save", default="")
p.add_argument("--no_patch", action="store_true")
p.add_argument("--opt", default="adamw")
p.add_argument("--load", default="")
p.add_argument("--load_tag", default=None)
p.add_argument("--start_step", type=int, default=0)
p.add_argument("--gc", action="store_true")
p.add_argument("--compile", default="")
p.add_argument("--backend", default="aot_eager")
p.add_argument("--tag", default="run")
p.add_argument("--local_rank", type=int, default=-1)
a = p.parse_args()

deepspeed.init_distributed(dist_backend="gloo")
rank = dist.get_rank()
if not a.no_patch:
    patch_can_record_registry()
if a.model == "hf":
    model = build_hf(output_router_logits=a.router_logits)
else:
    model = build_plain(with_config=(a.model == "plaincfg"))
if a.gc and a.model == "hf":
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
cfg = ds_config(ep=a.ep or None, zero=a.zero, dtype=a.dtype, extra_ep=json.loads(a.ep_json))
if a.opt == "sgd":
    cfg["optimizer"] = {"type": "SGD", "params": {"lr": 0.5}}
    cfg.pop("gradient_clipping")
cfg.update(json.loads(a.cfg_json))
kw = {}
if a.client_opt:
    cfg.pop("optimizer")
    kw["optimizer"] = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
else:
    kw["model_parameters"] = model.parameters()
engine, opt, _, _ = deepspeed.initialize(model=model, config=cfg, **kw)
if a.compile:
    engine.compile(backend=a.backend)
if a.print_sd and rank == 0:
    print("MODULE mlp0:", engine.module.model.layers[0].mlp)
for r in range(dist.get_world_size()):
    if a.print_sd and rank == r:
        for k, v in engine.module.state_dict().items():
            if "layers.0" in k:
                print(f"SD rank{rank} {k} {tuple(v.shape)} {v.dtype}")
    dist.barrier()
if a.load:
    lp, cs = engine.load_checkpoint(a.load, tag=a.load_tag)
    print("LOADED", lp, flush=True)
losses, auxes = [], []
for step in range(a.start_step, a.start_step + a.steps):
    ids = batch_for(rank, step)
    if a.model == "hf":
        out = engine(input_ids=ids, labels=ids)
        loss = out.loss
        if out.aux_loss is not None:
            auxes.append(float(out.aux_loss))
    else:
        loss = engine(ids, labels=ids)
    engine.backward(loss)
    engine.step()
    losses.append(float(loss))
if a.save:
    engine.save_checkpoint(a.save, tag="s3")
res = {"rank": rank, "losses": [f"{x:.10f}" for x in losses], "aux": [f"{x:.8f}" for x in auxes]}
print("RESULT", json.dumps(res), flush=True)
OUT = os.environ.get("AUTOEP_OUT", "/tmp/autoep_out")
os.makedirs(OUT, exist_ok=True)
open(f"{OUT}/{a.tag}.r{rank}.json","w").write(json.dumps(res))
