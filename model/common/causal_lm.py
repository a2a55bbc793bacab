"""``CausalLM``: what every family's top-level module is, and the contract the trainer relies on.

A family's ``XForCausalLM(CausalLM)`` passes its decoder (``XModel``) to ``__init__``. The decoder must have
Hugging Face's layout and names: ``embed_tokens``, ``layers`` (an ``nn.ModuleList`` of decoder layers, each
with a ``self_attn`` whose ``attention(q, k, v, docs)`` method is the attention kernel alone), ``norm``, and
``forward(input_ids, position_ids, docs) -> hidden states``. What the trainer does from outside relies on
exactly that (``trainer/parallel/transforms.py``): activation checkpointing and compilation wrap each of
``model.layers``; sequence parallelism replaces each layer's ``self_attn.attention`` on the instance.

Here: the output projection ``lm_head`` (tied to the embedding when the config says so), the loss (chunked
when ``loss_chunk_tokens`` > 0: ``loss.LMHead``), and the initialisation, one module at a time
(``init_module_weights``) so that a trainer building the model with partitioned parameters (DeepSpeed
ZeRO-3 ``zero.Init``) can gather each module, call it in ``named_modules()`` order, and get the same values,
RNG draw for RNG draw, as an unpartitioned build.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .attention import Docs, DocSpans
from .config import ModelConfig
from .loss import LMHead, causal_lm_loss
from .norm import RMSNorm


class CausalLM(nn.Module):
    # Linear layers whose output is added to the residual stream: initialised with std / sqrt(2L) (GPT-2),
    # which keeps the residual stream's variance from growing with depth at init.
    residual_projections: tuple[str, ...] = ("o_proj", "down_proj")

    def __init__(self, cfg: ModelConfig, decoder: nn.Module):
        super().__init__()
        self.config = cfg
        self.model = decoder
        self.lm_head = LMHead(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.loss_chunk_tokens = 0  # 0: the loss from the whole (B, T, V) logits
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for name, module in self.named_modules():
            self.init_module_weights(name, module)

    @torch.no_grad()
    def init_module_weights(self, name: str, module: nn.Module) -> None:
        """Initialise the parameters ``module`` owns directly; ``name`` as in ``named_modules()``."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            s = std / math.sqrt(2 * self.config.num_hidden_layers) if name.endswith(self.residual_projections) else std
            nn.init.normal_(module.weight, mean=0.0, std=s)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        doc_spans: DocSpans | None = None,
        attn_mask: Docs = None,
        loss_tokens: int | None = None,
    ):
        """input_ids (B, T). With labels (B, T) (IGNORE_INDEX = masked) returns the mean token loss;
        otherwise the logits (B, T, V). ``doc_spans`` or ``attn_mask`` restrict attention to packed
        documents (``attention.py``); neither means plain causal attention. ``loss_tokens``: divide the
        summed token loss by this instead of by the number of unmasked labels here (a caller holding one
        slice of longer sequences passes the whole sequences' count, so the slices' losses add up to the
        mean)."""
        if doc_spans is not None and attn_mask is not None:
            raise ValueError("give doc_spans or attn_mask, not both")
        h = self.model(input_ids, position_ids=position_ids, docs=doc_spans if attn_mask is None else attn_mask)
        if labels is not None and self.loss_chunk_tokens:
            return self.lm_head(h, labels, self.loss_chunk_tokens, loss_tokens)
        logits = self.lm_head(h)
        if labels is None:
            return logits
        return causal_lm_loss(logits, labels, loss_tokens)
