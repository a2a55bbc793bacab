"""Shared helpers: tiny Qwen3-MoE models (HF and plain-PyTorch mirror), data, DS config."""
import torch
import torch.nn as nn
import torch.nn.functional as F

H, I, E, K, V, L = 64, 32, 4, 2, 1000, 2  # noqa: E741 (hidden, expert width, experts, top-k, vocab, layers)

def hf_config(**kw):
    from transformers import Qwen3MoeConfig
    c = dict(vocab_size=V, hidden_size=H, intermediate_size=128, moe_intermediate_size=I,
             num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             num_experts=E, num_experts_per_tok=K, norm_topk_prob=True, decoder_sparse_step=1,
             mlp_only_layers=[], max_position_embeddings=128, output_router_logits=False,
             router_aux_loss_coef=0.01, tie_word_embeddings=False)
    c.update(kw)
    return Qwen3MoeConfig(**c)

def build_hf(seed=0, **kw):
    from transformers import Qwen3MoeForCausalLM
    torch.manual_seed(seed)
    cfg = hf_config(**kw)
    cfg._attn_implementation = "eager"
    m = Qwen3MoeForCausalLM(cfg)
    return m

# ---------------- plain PyTorch mirror with HF names -----------------
class PlainExperts(nn.Module):
    def __init__(self):
        super().__init__()
        self.num_experts = E
        self.gate_up_proj = nn.Parameter(torch.randn(E, 2 * I, H) * 0.02)
        self.down_proj = nn.Parameter(torch.randn(E, H, I) * 0.02)
        self.act_fn = nn.SiLU()
    def forward(self, x, idx, w):
        out = torch.zeros_like(x)
        for e in range(E):
            tok, pos = torch.where(idx == e)
            if tok.numel() == 0:
                continue
            g, u = F.linear(x[tok], self.gate_up_proj[e]).chunk(2, -1)
            h = F.linear(self.act_fn(g) * u, self.down_proj[e]) * w[tok, pos, None]
            out.index_add_(0, tok, h.to(out.dtype))
        return out

class PlainMoeBlock(nn.Module):  # deliberately NOT named Qwen3MoeSparseMoeBlock
    def __init__(self, gate_linear=True):
        super().__init__()
        self.top_k, self.num_experts, self.norm_topk_prob = K, E, True
        self.gate = nn.Linear(H, E, bias=False)
        self.experts = PlainExperts()
    def forward(self, h):
        b, s, d = h.shape
        x = h.reshape(-1, d)
        logits = self.gate(x)
        p = F.softmax(logits, dim=-1, dtype=torch.float)
        w, idx = torch.topk(p, self.top_k, dim=-1)
        if self.norm_topk_prob:
            w = w / w.sum(-1, keepdim=True)
        w = w.to(x.dtype)
        return self.experts(x, idx, w).reshape(b, s, d), logits

class PlainLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(H, eps=1e-6)
        self.self_attn = nn.Linear(H, H, bias=False)   # stand-in token mixer
        self.post_attention_layernorm = nn.RMSNorm(H, eps=1e-6)
        self.mlp = PlainMoeBlock()
    def forward(self, h):
        h = h + self.self_attn(self.input_layernorm(h))
        out = self.mlp(self.post_attention_layernorm(h))
        if isinstance(out, tuple):
            out = out[0]
        return h + out

class PlainInner(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(V, H)
        self.layers = nn.ModuleList([PlainLayer() for _ in range(L)])
        self.norm = nn.RMSNorm(H, eps=1e-6)

class PlainQwen3Moe(nn.Module):
    def __init__(self, with_config=False):
        super().__init__()
        self.model = PlainInner()
        self.lm_head = nn.Linear(H, V, bias=False)
        if with_config:
            from types import SimpleNamespace
            self.config = SimpleNamespace(num_experts=E, num_experts_per_tok=K, norm_topk_prob=True)
    def forward(self, input_ids, labels=None):
        h = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            h = layer(h)
        logits = self.lm_head(self.model.norm(h)).float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))
        return loss

def build_plain(seed=0, with_config=False):
    torch.manual_seed(seed)
    return PlainQwen3Moe(with_config=with_config)

def batch_for(rank, step, bsz=2, seq=16):
    g = torch.Generator().manual_seed(1000 * step + rank)
    ids = torch.randint(0, V, (bsz, seq), generator=g)
    return ids

def ds_config(ep=None, zero=0, dtype="fp32", extra_ep=None, mbs=2, gas=1, world=2):
    cfg = {
        "train_micro_batch_size_per_gpu": mbs,
        "gradient_accumulation_steps": gas,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True, "weight_decay": 0.0}},
        "zero_optimization": {"stage": zero},
        "gradient_clipping": 1.0,
        "steps_per_print": 1000,
        "wall_clock_breakdown": False,
    }
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    if ep is not None:
        e = {"enabled": True, "autoep_size": ep}
        if extra_ep:
            e.update(extra_ep)
        cfg["expert_parallel"] = e
    return cfg

def patch_can_record_registry():
    """Workaround for DS 0.19.8 AutoEP vs transformers 5.23 _CanRecordRegistry API mismatch.
    DS calls registry.get(str_key, default) and registry[str_key] = v (auto_ep_presets/base.py:326,308);
    transformers 5.23 overrides get(model) / __setitem__(model) keyed on str(model.__class__)."""
    from transformers.utils import output_capturing as oc
    cls = oc._CanRecordRegistry
    if getattr(cls, "_autoep_patched", False):
        return
    og, os_ = cls.get, cls.__setitem__
    def get(self, key, *default):
        if isinstance(key, str):
            return dict.get(self, key, *default)
        return og(self, key)
    def setitem(self, key, value):
        if isinstance(key, str):
            return dict.__setitem__(self, key, value)
        return os_(self, key, value)
    cls.get, cls.__setitem__, cls._autoep_patched = get, setitem, True
