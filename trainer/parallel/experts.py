"""Expert parallelism for Mixture-of-Experts families through DeepSpeed AutoEP (``parallel.expert_parallel``).

The model stays the plain module with transformers' names (``model/qwen3_moe``). With
``parallel.expert_parallel`` = E >= 1, ``deepspeed.initialize`` finds every sparse block by its path and
shapes (AutoEP's ``qwen3_moe`` preset: ``model.layers.N.mlp`` with ``gate.weight`` (E, d) and
``experts.gate_up_proj`` / ``down_proj``) and replaces it with an ``AutoEPMoELayer``: the same softmax
top-k router (``router.gate``), each rank of a group of E ranks holding num_experts / E experts as grouped-GEMM
weights (``experts.w1`` gate, ``w3`` up, ``w2`` down), tokens sent to their experts' ranks and back by
all-to-all. The replacement copies the reference weights, so an AutoEP run starts from exactly the
reference's weights. What this module adds around it:

* ``ds_section`` — the ``expert_parallel`` JSON: the preset, top-k and renormalisation stated from the
  model's config rather than left to AutoEP's detection.
* ``check`` — the combinations refused at start-up, naming the keys.
* ``capture_router_logits`` — AutoEP's layer returns only the hidden states and computes no auxiliary
  loss; a forward hook on each layer's ``router.gate`` keeps its logits as ``router_logits``, the
  attribute the model's load-balancing loss, z-loss and load statistics read from its own blocks.
* ``to_reference`` — AutoEP's parameter names and per-rank expert slices mapped back to the model's
  (``mlp.gate.weight``; ``gate_up_proj`` = [w1; w3] along the rows, ``down_proj`` = w2) for export.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from lmforge.model import ModelConfig
from lmforge.model.qwen3_moe.model import keep_router_logits

from ..config import ConfigError, ParallelSection

PRESET = "qwen3_moe"  # AutoEP's preset for transformers' Qwen3-MoE layout (our model's names)


def is_moe(mcfg: ModelConfig) -> bool:
    return bool(getattr(mcfg, "num_experts", 0))


def ds_section(mcfg: ModelConfig, ep: int) -> dict:
    """DeepSpeed's ``expert_parallel`` section for ``parallel.expert_parallel`` = ep >= 1."""
    return {"enabled": True, "autoep_size": ep, "preset_model": PRESET, "top_k": mcfg.num_experts_per_tok,
            "route_norm": bool(mcfg.norm_topk_prob)}


def check(mcfg: ModelConfig, p: ParallelSection, world: int, compile: bool, precision: str) -> None:
    """Refuse, before anything is built, what AutoEP (DeepSpeed 0.19.8) or lmforge cannot do with
    ``parallel.expert_parallel``."""
    ep = p.expert_parallel
    if not ep:
        return
    if not is_moe(mcfg):
        raise ConfigError(f"parallel.expert_parallel={ep}: the {mcfg.family} model has no experts (it applies to "
                          "Mixture-of-Experts families such as qwen3_moe); set parallel.expert_parallel=0")
    if world % ep:
        raise ConfigError(f"parallel.expert_parallel={ep} must divide the world size {world}: the ranks form "
                          "groups of E that share the experts")
    if mcfg.num_experts % ep:
        raise ConfigError(f"parallel.expert_parallel={ep} must divide the model's num_experts={mcfg.num_experts}: "
                          "each rank of a group holds num_experts / E whole experts")
    if p.offload != "none":
        raise ConfigError(f"parallel.expert_parallel={ep} with parallel.offload={p.offload}: not supported (AutoEP's "
                          "expert parameters are not validated with ZeRO offload in DeepSpeed 0.19.8); set "
                          "parallel.offload=none or parallel.expert_parallel=0")
    if compile and precision not in ("bf16", "fp8"):
        raise ConfigError(f"parallel.expert_parallel={ep} with train.compile=true needs train.precision=bf16: "
                          f"torch.compile fails on AutoEP's grouped-GEMM experts in {precision} (torch's "
                          "_grouped_mm takes only bf16 when traced; tests/test_expert_parallel.py keeps the "
                          "reproduction); set train.compile=false or train.precision=bf16")


def capture_router_logits(module: torch.nn.Module, sparse_layers: int) -> int:
    """Hook every AutoEP layer's router so its logits land in ``router_logits`` (module docstring);
    checks that AutoEP replaced exactly the model's ``sparse_layers`` sparse blocks. Returns how many."""
    from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer

    layers = [m for m in module.modules() if isinstance(m, AutoEPMoELayer)]
    if len(layers) != sparse_layers:
        raise RuntimeError(f"DeepSpeed AutoEP replaced {len(layers)} MoE blocks, the model has {sparse_layers} "
                           f"sparse layers (preset {PRESET!r} did not match the model's names)")
    for layer in layers:
        layer.router_logits = None

        def keep(_gate, _inputs, logits, layer=layer):
            keep_router_logits(layer, logits)  # not during checkpointing's recomputation (model.py)

        layer.router.gate.register_forward_hook(keep)
    return len(layers)


_AUTOEP = re.compile(r"^(?P<block>.*\.mlp)\.(?P<what>router\.gate\.weight|experts\.w[123])$")


def autoep_names(names) -> bool:
    """Whether a state dict's names are AutoEP's (a checkpoint saved with expert parallelism)."""
    return any(_AUTOEP.match(n) for n in names)


def autoep_shapes(shapes: dict[str, torch.Size]) -> dict[str, torch.Size]:
    """The model's parameter shapes under AutoEP's names (whole tensors, all experts)."""
    out = {}
    for name, shape in shapes.items():
        if name.endswith(".experts.gate_up_proj"):
            E, two_i, d = shape
            block = name[:-len(".experts.gate_up_proj")]
            out[f"{block}.experts.w1"] = out[f"{block}.experts.w3"] = torch.Size((E, two_i // 2, d))
        elif name.endswith(".experts.down_proj"):
            out[name.replace(".experts.down_proj", ".experts.w2")] = shape
        elif name.endswith(".mlp.gate.weight") and len(shape) == 2 and \
                f"{name[:-len('.gate.weight')]}.experts.gate_up_proj" in shapes:
            out[name.replace(".mlp.gate.weight", ".mlp.router.gate.weight")] = shape
        else:
            out[name] = shape
    return out


Getter = Callable[[], torch.Tensor]


def to_reference(getters: dict[str, Getter]) -> dict[str, Getter]:
    """Whole (all experts) AutoEP tensors, as functions returning them, -> the model's names:
    ``router.gate.weight`` -> ``gate.weight``; ``experts.w1`` (E, I, d) gate and ``w3`` (E, I, d) up ->
    ``gate_up_proj`` (E, 2I, d), gate rows first; ``w2`` (E, d, I) -> ``down_proj``. AutoEP's own state
    (``tokens_per_expert``, ``expert_bias``) and its alias of the router (``mlp.gate.gate.weight``) are
    dropped; everything else passes unchanged."""
    out, blocks = {}, {}
    for name, get in getters.items():
        m = _AUTOEP.match(name)
        if m is None:
            if not re.search(r"\.mlp\.(tokens_per_expert|expert_bias|gate\.gate\.weight)$", name):
                out[name] = get
        elif m["what"] == "router.gate.weight":
            out[f"{m['block']}.gate.weight"] = get
        else:
            blocks.setdefault(m["block"], {})[m["what"][-2:]] = get
    for block, w in blocks.items():
        if set(w) != {"w1", "w2", "w3"}:
            raise ValueError(f"{block}: AutoEP expert weights {sorted(w)}, expected w1, w2 and w3")
        out[f"{block}.experts.gate_up_proj"] = lambda w=w: torch.cat([w["w1"](), w["w3"]()], dim=1)
        out[f"{block}.experts.down_proj"] = w["w2"]
    return out
