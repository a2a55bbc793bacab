"""Convert an AutoEP-replaced model's (per-EP-rank) state_dict back to HF Qwen3-MoE names/shapes."""
import torch
import torch.distributed as tdist


def gather_autoep_to_hf(module):
    """Collective over the EP group(s). Returns a full HF-named state dict (every rank)."""
    from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer
    sd = {}
    autoep_prefixes = {}
    for name, m in module.named_modules():
        if isinstance(m, AutoEPMoELayer):
            autoep_prefixes[name] = m
    for k, v in module.state_dict().items():
        owner = next((p for p in autoep_prefixes if k.startswith(p + ".")), None)
        if owner is None:
            sd[k] = v.detach().clone()
            continue
        m = autoep_prefixes[owner]
        sub = k[len(owner) + 1:]
        if sub == "router.gate.weight":
            sd[f"{owner}.gate.weight"] = v.detach().clone()
        elif sub.startswith("experts."):
            pass  # handled below
        elif sub.startswith("gate.") :  # alias of router (setattr(self, 'gate', self.router))
            pass
        else:
            sd[k] = v.detach().clone()
    for owner, m in autoep_prefixes.items():
        full = {}
        for wn in ("w1", "w2", "w3"):
            local = getattr(m.experts, wn).detach().contiguous()
            if m.ep_size > 1:
                parts = [torch.empty_like(local) for _ in range(m.ep_size)]
                tdist.all_gather(parts, local, group=m.ep_group)
                local = torch.cat(parts, 0)
            full[wn] = local
        # AutoEP w1=gate [E,I,H], w3=up [E,I,H], w2=down [E,H,I];
        # HF gate_up_proj=[E,2I,H] (gate first), down_proj=[E,H,I]
        sd[f"{owner}.experts.gate_up_proj"] = torch.cat([full["w1"], full["w3"]], dim=1)
        sd[f"{owner}.experts.down_proj"] = full["w2"]
    return sd
