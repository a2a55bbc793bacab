"""Training-time transformations of the plain model, applied from outside in one fixed order.

The model (a family's module, ``model/<family>/model.py``) executes the attention it is given and knows
nothing of recomputation or parallelism. ``parallelize`` applies, in this order (torchtitan's
``parallelize_llama`` idea), relying only on the layout every family shares (``model/common/causal_lm.py``:
``model.model.layers``, each with ``self_attn.attention``):

1. **Sequence parallelism** (``parallel.sequence_parallel`` = S, DeepSpeed-Ulysses): each layer's attention
   kernel (``self_attn.attention``) is wrapped in DeepSpeed's ``DistributedAttention``: an all-to-all turns
   (B, T/S, H) into (B, T, H/S) - the whole sequence for H/S heads, so document masking works unchanged -
   the kernel runs, and a second all-to-all turns the result back. Embeddings, norms, MLPs and the loss
   see only T/S tokens, which is what bounds activation memory. (The batch side, ``trainer/batching.py``,
   gives each rank of a group its slice of every sample, with global position ids and the whole batch's
   label count, ``loss_tokens``, so the slices' losses add up to the S = 1 mean; DeepSpeed sums gradients
   over the sequence-parallel ranks, averaging over data-parallel ones only.) When S does not divide the
   key/value heads, k/v are expanded to the query heads before the exchange. Applied first, so that
   recomputation and compilation (steps 2 and 3) cover the exchange.
2. **Activation checkpointing** (``parallel.activation_checkpointing`` = N): every N-th decoder layer's
   forward is recomputed in backward with PyTorch's non-reentrant ``torch.utils.checkpoint``. It re-runs
   the layer's submodules' hooks during recomputation, so ZeRO-3 re-gathers their weights and AutoTP's
   sharded linears work unchanged; inputs that need no gradient (rotary tables, spans) are fine; only
   the layer input is kept, and gradients are bitwise identical (tests). Parameter names are untouched
   (no wrapper module), so checkpoints, AutoTP's name rules and the export see the plain model.
   DeepSpeed's reentrant ``deepspeed.checkpointing`` would add partitioned/CPU activations, which pay off
   only when that one saved (B, T, d) input per layer is what limits memory.
3. **Compilation** (``train.compile``): each decoder layer is compiled on its own (torchtitan's
   per-block compile) after checkpointing is applied, so the recomputed region is compiled too; the
   layers share one compiled code (same shapes), and names are unchanged (``nn.Module.compile``).
4. **Loss chunking** (``parallel.loss_chunk_tokens`` = N): the loss is computed N tokens at a time, so
   the (B, T, V) logits and their fp32 copy never exist whole (``model/common/loss.py``).
5. **Tensor parallelism** (AutoTP) and 6. **ZeRO data-parallel sharding** are applied by
   ``deepspeed.initialize`` (``engine.py``), from the DeepSpeed config the run config derives: AutoTP
   shards by the family's ``tp_plan`` (checked afterwards: ``tp_plan.py``), then ZeRO partitions what each
   rank holds over the data-parallel group.

How a batch's packed documents reach the attention (spans, dense mask or flex block mask) is decided on
the data side, never here: ``trainer/batching.py``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

from lmforge.model import CausalLM


class _UlyssesAttention:
    """A layer's attention kernel inside DeepSpeed-Ulysses' ``DistributedAttention`` (step 1)."""

    def __init__(self, kernel: Callable, group, sp: int):
        from deepspeed.sequence.layer import DistributedAttention

        self.kernel, self.sp = kernel, sp
        # Layout (B, T, heads, D), batch first: scatter the heads (dim 2), gather the sequence (dim 1).
        self.exchange = DistributedAttention(self._local, group, scatter_idx=2, gather_idx=1)

    def _local(self, q, k, v, docs):  # (B, T, H/S, D) each: the whole sequence for this rank's heads
        return self.kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), docs).transpose(1, 2)

    def __call__(self, q, k, v, docs=None):  # (B, H, T/S, D), (B, K, T/S, D)
        if k.shape[1] % self.sp:  # whole kv heads per rank: expand them to the query heads
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = self.exchange(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0, None, docs)
        return y.transpose(1, 2)


def apply_sequence_parallel(model: CausalLM, group, sp: int) -> int:
    """Wrap every layer's attention kernel for sequence parallelism over ``group``; returns how many."""
    if sp <= 1:
        return 0
    heads = model.config.num_attention_heads
    if heads % sp:
        raise ValueError(f"parallel.sequence_parallel={sp} must divide num_attention_heads={heads}")
    for layer in model.model.layers:
        attn = layer.self_attn
        attn.attention = _UlyssesAttention(attn.attention, group, sp)
    return len(model.model.layers)


def _checkpointed(forward: Callable, module: torch.nn.Module) -> Callable:
    @functools.wraps(forward)
    def run(*args):
        if module.training and torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False)
        return forward(*args)

    return run


def apply_activation_checkpointing(model: CausalLM, every: int) -> int:
    """Recompute every ``every``-th decoder layer in backward (1 = all; 0 = none); returns how many."""
    if every < 0:
        raise ValueError("activation checkpointing interval must be >= 0")
    if not every:
        return 0
    layers = [layer for i, layer in enumerate(model.model.layers) if i % every == 0]
    for layer in layers:
        # An instance attribute shadows the class's forward: nn.Module.__call__ (and every hook it runs)
        # is unchanged, only the body runs under checkpoint. The original bound method is kept inside.
        layer.forward = _checkpointed(layer.forward, layer)
    return len(layers)


def compile_layers(model: CausalLM, backend: str = "inductor") -> int:
    """Compile each decoder layer in place (step 3); returns how many. Fixed shapes (``dynamic=False``):
    every step has the same (B, T), and the document structure arrives as tensors (mask or BlockMask).
    ``backend``: torch.compile's (the trainer uses inductor; Dynamo's guards, and so when a layer recompiles,
    do not depend on it)."""
    for layer in model.model.layers:
        layer.compile(dynamic=False, backend=backend)
    return len(model.model.layers)


def parallelize(model: CausalLM, *, activation_checkpointing: int, loss_chunk_tokens: int = 0,
                compile: bool = False, sequence_parallel: int = 1, sp_group=None) -> CausalLM:
    """Apply steps 1-4 to ``model`` in place (5-6 happen in ``deepspeed.initialize``) and return it."""
    apply_sequence_parallel(model, sp_group, sequence_parallel)
    apply_activation_checkpointing(model, activation_checkpointing)
    if compile:
        compile_layers(model)
    model.loss_chunk_tokens = loss_chunk_tokens
    return model
