"""Qwen3-MoE's shape and size presets. Field names follow Hugging Face ``Qwen3MoeConfig``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..common.config import ModelConfig


@dataclass(frozen=True)
class Qwen3MoeConfig(ModelConfig):
    """A Qwen3 decoder (qk-norm attention, explicit ``head_dim``, Qwen3's defaults: families do not import
    each other, tests/test_layout.py) whose MLPs are sparse Mixtures of Experts.

    num_experts: experts per sparse layer (E); each a SwiGLU of width ``moe_intermediate_size``.
    num_experts_per_tok: experts each token is routed to (top-k of a softmax router).
    norm_topk_prob: renormalise the k routing weights to sum to 1 (Qwen3-MoE: true).
    decoder_sparse_step: every this-many-th layer is sparse (1: all); ``mlp_only_layers``: layer indices that
        are dense anyway (a SwiGLU of ``intermediate_size``).
    router_aux_loss_coef: weight of the Switch/GShard load-balancing loss added to the training loss
        (transformers' ``load_balancing_loss_func``, over all sparse layers at once, as Qwen3-MoE trains).
    router_z_loss_coef: weight of the router z-loss (ST-MoE: mean over tokens of logsumexp(logits)^2 per
        layer, averaged over the sparse layers); 0 = off, as in Qwen3-MoE.

    Routing is dropless: every token reaches its k experts, however unbalanced (no capacity factor).
    """

    family: ClassVar[str] = "qwen3_moe"

    vocab_size: int = 151936
    max_position_embeddings: int = 40960
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6
    head_dim: int = 128
    num_experts: int = 128
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    router_aux_loss_coef: float = 0.001
    router_z_loss_coef: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "mlp_only_layers", tuple(int(i) for i in self.mlp_only_layers))  # JSON lists
        super().__post_init__()
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok {self.num_experts_per_tok} must be in 1..num_experts "
                             f"({self.num_experts})")
        if self.moe_intermediate_size < 1 or self.decoder_sparse_step < 1:
            raise ValueError("moe_intermediate_size and decoder_sparse_step must be >= 1")
        bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"mlp_only_layers {bad} are not layer indices (0..{self.num_hidden_layers - 1})")

    def is_sparse(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` has a sparse MoE block (else a dense SwiGLU), as transformers says."""
        return layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0


# Shapes of released models (their config.json files) and CPU-sized ones. Counts at the vocab given (a run
# sets vocab_size from its tokenizer): total parameters / active per token.
PRESETS: dict[str, dict] = {
    # CPU tests: 8 experts, top 2 (vocab 151,936: 10.3M total, 9.9M active; most of it the embedding)
    "qwen3-moe-debug": dict(hidden_size=64, intermediate_size=176, moe_intermediate_size=32, num_experts=8,
                            num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=32, max_position_embeddings=4096, tie_word_embeddings=True),
    # CPU runs: 16 experts of width 256, top 4, one dense layer first (as DeepSeek-style models do)
    "qwen3-moe-tiny": dict(hidden_size=256, intermediate_size=768, moe_intermediate_size=256, num_experts=16,
                           num_experts_per_tok=4, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=64, max_position_embeddings=4096, tie_word_embeddings=True, mlp_only_layers=(0,)),
    # OLMoE-1B-7B's shape (16 layers, d 2048, 64 experts of 1024, top 8) with Qwen3's attention and vocab 50,304:
    # 6.9B total, 1.3B active
    "qwen3-moe-olmoe-1b-7b": dict(vocab_size=50304, hidden_size=2048, intermediate_size=8192,
                                  moe_intermediate_size=1024, num_experts=64, num_experts_per_tok=8,
                                  num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16, head_dim=128,
                                  max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=False,
                                  router_aux_loss_coef=0.01),
    # Qwen3-30B-A3B: 30.5B total, 3.3B active
    "qwen3-moe-30b-a3b": dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                              num_experts_per_tok=8, num_hidden_layers=48, num_attention_heads=32,
                              num_key_value_heads=4, head_dim=128, tie_word_embeddings=False),
}
