"""Compare gradients (step 0) and weights after N SGD/AdamW steps: AutoEP vs plain DP.
  deepspeed --num_gpus 2 grad_check.py --ep 0 --dump /tmp/autoep_out/ref.pt     (baseline)
  deepspeed --num_gpus 2 grad_check.py --ep 2 --ref  /tmp/autoep_out/ref.pt     (compare)
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
from export_util import gather_autoep_to_hf

p = argparse.ArgumentParser()
p.add_argument("--model", default="hf")
p.add_argument("--ep", type=int, default=2)
p.add_argument("--zero", type=int, default=0)
p.add_argument("--opt", default="sgd")
p.add_argument("--steps", type=int, default=3)
p.add_argument("--dump", default="")
p.add_argument("--ref", default="")
p.add_argument("--ep_json", default="{}")
p.add_argument("--local_rank", type=int, default=-1)
a = p.parse_args()
patch_can_record_registry()
deepspeed.init_distributed(dist_backend="gloo")
rank = dist.get_rank()
model = build_hf() if a.model == "hf" else build_plain(with_config=(a.model == "plaincfg"))
cfg = ds_config(ep=a.ep or None, zero=a.zero, extra_ep=json.loads(a.ep_json))
if a.opt == "sgd":
    cfg["optimizer"] = {"type": "SGD", "params": {"lr": 0.5}}
    cfg.pop("gradient_clipping")
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)

def full_grads():
    # grads keyed by HF names, for zero 0 only (param.grad present)
    g = {}
    for n, prm in engine.module.named_parameters():
        if prm.grad is not None:
            g[n] = prm.grad.detach().clone()
    return g

def convert_grads(grads0):
    # convert expert grads to HF layout
    from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer
    for name, m in engine.module.named_modules():
        if isinstance(m, AutoEPMoELayer):
            gg = {}
            for wn in ("w1", "w2", "w3"):
                loc = getattr(m.experts, wn).grad.contiguous()
                parts = [torch.empty_like(loc) for _ in range(m.ep_size)]
                torch.distributed.all_gather(parts, loc, group=m.ep_group)
                gg[wn] = torch.cat(parts, 0)
                grads0.pop(f"{name}.experts.{wn}", None)
            grads0[f"{name}.experts.gate_up_proj"] = torch.cat([gg["w1"], gg["w3"]], 1)
            grads0[f"{name}.experts.down_proj"] = gg["w2"]
            grads0[f"{name}.gate.weight"] = grads0.pop(f"{name}.router.gate.weight")

losses = []
grads0 = None
for step in range(a.steps):
    ids = batch_for(rank, step)
    out = engine(input_ids=ids, labels=ids) if a.model == "hf" else engine(ids, labels=ids)
    loss = out.loss if a.model == "hf" else out
    engine.backward(loss)
    if step == 0 and a.zero == 0:
        grads0 = full_grads()
        if a.ep:
            convert_grads(grads0)
    engine.step()
    losses.append(float(loss))
sd = gather_autoep_to_hf(engine.module)
if rank == 0:
    print("LOSSES", [f"{x:.10f}" for x in losses])
    if a.dump:
        torch.save({"sd": sd, "grads": grads0, "losses": losses}, a.dump)
    if a.ref:
        ref = torch.load(a.ref)
        print("loss diffs:", [f"{x - y:+.3e}" for x, y in zip(losses, ref["losses"])])
        ks = set(ref["sd"]) ^ set(sd)
        print("state_dict key mismatch:", sorted(ks)[:10])
        worst = max(((k, (sd[k] - ref["sd"][k]).abs().max().item()) for k in ref["sd"] if k in sd), key=lambda t: t[1])
        print("max |w_ep - w_ref| after steps:", worst)
        if grads0 is not None and ref["grads"] is not None:
            gk = set(ref["grads"]) ^ set(grads0)
            print("grad key mismatch:", sorted(gk)[:10])
            rel = {k: ((grads0[k] - ref["grads"][k]).norm() / ref["grads"][k].norm().clamp_min(1e-30)).item()
                   for k in ref["grads"] if k in grads0}
            for k in sorted(rel, key=rel.get, reverse=True)[:6]:
                print(f"  grad rel err {k}: {rel[k]:.3e}  (ref norm {ref['grads'][k].norm():.3e})")
