"""Activation memory from the code itself: the family's own modules run forward and backward on fake tensors
(``torch._subclasses.fake_tensor.FakeTensorMode``: shapes and dtypes, no storage) under torch's memory tracker
(``torch.distributed._tools.mem_tracker.MemTracker``), at the planned micro-batch × sequence. No memory formula.

What is run, per model config, dtype, micro-batch B and local sequence T (the sequence-parallel rank's slice):

* **One decoder layer of each kind** (layers whose modules and parameter shapes differ, e.g. a Mixture of
  Experts' dense and sparse layers; the rest are copies), taken from the model built under ``FakeTensorMode``,
  once plain and once with the trainer's own activation checkpointing applied to it
  (``trainer.parallel.transforms.apply_activation_checkpointing``). Read off it (``LayerFigures``): what it
  still holds after its forward once the caller's reference to its input is gone, less its output (``saved``:
  what one more layer keeps between its forward and its backward; its input counts when the layer keeps it,
  as a checkpointed one does); its peak in forward and over forward + backward above the memory before it
  (``fwd_peak``, ``peak``); what it still holds after its backward (``left``: a Mixture-of-Experts block
  keeps its router logits as an attribute, and under checkpointing those are the recomputed ones, whose
  autograd graph keeps the recomputed activations before them alive until the layer's next forward). Under
  tensor parallelism the layer's linear layers are cut as the family's ``tp_plan`` says (column: output
  features / tp, row: input features / tp): each rank's share is what is measured, and what stays whole
  (norms, the layer input, the row-parallel outputs) stays whole. Under Ulysses sequence parallelism the
  layer runs on T / S tokens with its attention kernel inside the trainer's own Ulysses wrapper
  (``transforms._UlyssesAttention``), whose all-to-alls are replaced by exchanges of the same shapes (new
  tensors: what the real all-to-all allocates).
* **The embedding, final norm and loss head**: the model with no decoder layers (``CausalLM.forward`` with
  labels, the chunked loss at ``parallel.loss_chunk_tokens`` as the trainer sets it), forward + backward on
  the rank's tokens (``HeadFigures``).

The plan scales by layers (``Activations.peak``; ``memory.breakdown`` adds the gradients and buffers of each
moment): during forward each layer adds ``saved``; the peak is the largest of every layer's forward (what the
layers before it saved + its ``fwd_peak``), the loss head at the end of forward (all layers' ``saved`` + the
head's peak) and every layer's backward (the layers before it + its ``peak`` + what the later layers left).
tests/test_plan.py checks the result against the whole model run on fake tensors (within 3%, a little above:
a layer's own peak counts the weight gradient backward makes, which the memory model also counts among the
gradients) and against a real CPU run (RSS).

A layer is measured at micro-batch 1 and 2 and read off the line through them (its activations grow with the
batch; the intercept holds what does not, a weight gradient while backward makes it), so a search over
micro-batches reuses two measurements; a Mixture of Experts with many experts is measured at two smaller
expert counts and extrapolated (``measure``); ``measure(..., exact=True)`` runs the planned micro-batch and
expert count themselves. The loss head is measured at the planned number of tokens (its chunk of logits grows
with them up to ``loss_chunk_tokens``, its fp32 weight gradient not at all). Everything is cached per process.

Counted: every tensor the tracker sees as activation or temporary (``ACT`` + ``TEMP``); parameters and their
gradients are the memory model's (``memory.py``). The attention kernel is what SDPA dispatches to on the fake
CPU device (the flash-style kernel: output and log-sum-exp saved, no T × T scores), the memory of CUDA's flash
and flex kernels; document masking (flex block masks, spans) is not part of the measured layer, nor is
DeepSpeed AutoEP's grouped-GEMM expert block (the reference experts are measured). Mixture-of-Experts routing
is data-dependent; fake tensors hold no data, so the measurement routes tokens evenly over the experts
(``_even_routing``: the load the balancing loss aims for).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import re
from dataclasses import dataclass

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

from lmforge.model import ModelConfig, family_of
from lmforge.model.registry import _meta_model, plan_regex

from ..parallel import transforms

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class LayerFigures:
    """Bytes one decoder layer (one kind, checkpointed or not) holds: ``saved`` between its forward and its
    backward (what one more layer adds), ``fwd_peak`` its peak during forward and ``peak`` over forward and
    backward, both above the memory held before it ran, and ``left`` what it still holds once its backward is
    done (until its next forward: a Mixture of Experts block keeps its router logits as an attribute, and
    under activation checkpointing those are the recomputed ones, whose autograd graph keeps the recomputed
    activations before them alive)."""

    saved: int
    fwd_peak: int
    peak: int
    left: int = 0


@dataclass(frozen=True)
class HeadFigures:
    """Bytes of the embedding, final norm and loss head (the model without decoder layers): ``fwd_peak`` the
    peak of its forward (the chunked loss computes its gradients there), ``peak`` over forward and backward,
    and ``bwd_hold`` what it still holds when the decoder layers' backward begins (beyond the gradient handed
    to the last layer, which the layer's own figures count)."""

    fwd_peak: int
    peak: int
    bwd_hold: int = 0


@dataclass(frozen=True)
class Activations:
    """Measured figures of one (model, dtype, micro-batch, local sequence, tp, sp, loss chunk) and the layer
    list they apply to; ``peak(every)`` scales them to the whole model with activation checkpointing of
    every ``every``-th layer (0 = none)."""

    kinds: tuple[int, ...]  # per decoder layer, the index of its kind in ``plain`` / ``ckpt``
    plain: tuple[LayerFigures, ...]
    ckpt: tuple[LayerFigures, ...]
    head: HeadFigures
    exact: bool  # layers run at the planned micro-batch and expert count (else scaled: ``measure``)

    def layer(self, i: int, every: int) -> LayerFigures:
        """Layer i's figures: checkpointed when ``every`` > 0 and i % every == 0 (``transforms``)."""
        return (self.ckpt if every and i % every == 0 else self.plain)[self.kinds[i]]

    def left_after(self, every: int) -> list[int]:
        """Per layer i, what the layers after it left at their last backward (held until their next forward)."""
        out, acc = [0] * len(self.kinds), 0
        for i in reversed(range(len(self.kinds))):
            out[i] = acc
            acc += self.layer(i, every).left
        return out

    def peak(self, every: int) -> dict:
        """{"total", "layers", "loss_head", "phase"}: the peak of activation memory (bytes) over the step, the
        part of it that is the decoder layers' and the loss head's (embedding, final norm, loss: what they hold
        at that moment), and where in the step it falls."""
        best, phase, layers_at = 0, "", 0
        held = 0
        L = len(self.kinds)
        later = self.left_after(every)
        for i in range(L):  # forward, layer by layer (later layers may still hold what they kept last time)
            f = self.layer(i, every)
            at = held + f.fwd_peak + later[i]
            if at > best:
                best, phase, layers_at = at, f"forward of layer {i}", at
            held += f.saved
        if held + self.head.peak > best:  # the loss head: forward (chunked loss, its gradients) and backward
            best, phase, layers_at = held + self.head.peak, "loss head (end of forward)", held
        hold = self.head.bwd_hold
        for i in reversed(range(len(self.kinds))):  # backward, last layer first
            f = self.layer(i, every)
            held -= f.saved
            if held + f.peak + hold > best:
                best, phase, layers_at = held + f.peak + hold, f"backward of layer {i}", held + f.peak
            held += f.left
        if held > best:  # after backward, until the next forward
            best, phase, layers_at = held, "after backward", held
        return {"total": best, "layers": layers_at, "loss_head": best - layers_at, "phase": phase}


class _ActivationTracker(MemTracker):
    """``MemTracker`` that also keeps the peak of activation + temporary memory (parameters and their
    gradients excluded), and can say the current one."""

    KINDS = (_MemRefType.ACT, _MemRefType.TEMP)

    def __init__(self) -> None:
        super().__init__()
        self.act_peak = 0

    def act_now(self) -> int:
        return sum(snap.get(k, 0) for snap in self._curr_mem_snap.values() for k in self.KINDS)

    def _update_peak_stats(self, peak_state) -> None:
        super()._update_peak_stats(peak_state)
        self.act_peak = max(self.act_peak, self.act_now())


@contextlib.contextmanager
def _even_routing():
    """Fake tensors have no values, so a Mixture of Experts' ``torch.bincount(...).tolist()`` (tokens per
    expert) cannot run: inside this context a bincount of a fake tensor returns a fake count vector whose
    ``tolist()`` is the even split of the assignments over the ``minlength`` experts."""
    counts: dict[int, tuple[torch.Tensor, list[int]]] = {}
    orig_bincount, orig_tolist = torch.bincount, FakeTensor.tolist

    def bincount(input, weights=None, minlength=0):
        if not isinstance(input, FakeTensor):
            return orig_bincount(input, weights, minlength)
        n, e = input.numel(), max(int(minlength), 1)
        out = torch.zeros(e, dtype=torch.int64, device=input.device)
        counts[id(out)] = (out, [n // e + (1 if i < n % e else 0) for i in range(e)])
        return out

    def tolist(self):
        hit = counts.get(id(self))
        if hit is not None and hit[0] is self:
            return list(hit[1])
        return orig_tolist(self)

    torch.bincount, FakeTensor.tolist = bincount, tolist
    try:
        yield
    finally:
        torch.bincount, FakeTensor.tolist = orig_bincount, orig_tolist


class _FakeAllToAll(torch.autograd.Function):
    """The shapes and allocations of Ulysses' all-to-all (a new tensor with ``scatter`` divided and
    ``gather`` multiplied by S; backward the reverse), without a process group."""

    @staticmethod
    def forward(ctx, x, scatter: int, gather: int, sp: int):
        ctx.in_shape = x.shape
        shape = list(x.shape)
        shape[scatter] //= sp
        shape[gather] *= sp
        return x.new_empty(shape)

    @staticmethod
    def backward(ctx, g):
        return g.new_empty(ctx.in_shape), None, None, None


class _FakeDistributedAttention:
    """DeepSpeed's ``DistributedAttention(local, group, scatter_idx=2, gather_idx=1)`` call, exchanges faked."""

    def __init__(self, local, sp: int):
        self.local, self.sp = local, sp

    def __call__(self, q, k, v, batch_dim_idx, rotary_pos_emb=None, *args):
        q, k, v = (_FakeAllToAll.apply(t, 2, 1, self.sp) for t in (q, k, v))
        out = self.local(q, k, v, *args)
        return _FakeAllToAll.apply(out, 1, 2, self.sp)


def _ulysses(kernel, sp: int):
    """The trainer's Ulysses wrapper (its k/v expansion and layout) around ``kernel``, exchange faked."""
    u = transforms._UlyssesAttention.__new__(transforms._UlyssesAttention)
    u.kernel, u.sp = kernel, sp
    u.exchange = _FakeDistributedAttention(u._local, sp)
    return u


@functools.lru_cache(maxsize=8)
def _fake_model(mcfg: ModelConfig, dtype: torch.dtype) -> tuple[FakeTensorMode, nn.Module]:
    """The whole model built under one ``FakeTensorMode`` and cast to ``dtype`` as DeepSpeed casts it (no
    memory: fake parameters; no global default dtype changed, so a trainer may call this at start-up)."""
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    with mode:
        model = _cast(family_of(mcfg).build(mcfg), dtype)
    return mode, model


def _cast(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Floating parameters and buffers to ``dtype`` (``Module.to`` cannot swap fake parameters), tied ones kept
    tied."""
    done: dict[int, torch.Tensor] = {}
    for m in model.modules():
        for group, param in ((m._parameters, True), (m._buffers, False)):
            for k, t in group.items():
                if t is None or not t.is_floating_point():
                    continue
                if id(t) not in done:
                    new = t.detach().to(dtype)
                    done[id(t)] = nn.Parameter(new, t.requires_grad) if param else new
                group[k] = done[id(t)]
    return model


def clear_cache() -> None:
    """Forget every measurement of this process (benchmarks time planning from scratch)."""
    for fn in (_fake_model, layer_kinds, _layer_figures, _head_figures):
        fn.cache_clear()


@functools.lru_cache(maxsize=64)
def layer_kinds(mcfg: ModelConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(kind of each decoder layer, the first layer of each kind): layers with the same module types and
    parameter shapes are one kind (read off the model on the meta device)."""
    sigs: dict[tuple, int] = {}
    kinds, firsts = [], []
    for i, layer in enumerate(_meta_model(mcfg).model.layers):
        sig = tuple((n, type(m).__name__, tuple(p.shape)) for n, m in layer.named_modules()
                    for p in m.parameters(recurse=False))
        if sig not in sigs:
            sigs[sig] = len(firsts)
            firsts.append(i)
        kinds.append(sigs[sig])
    return tuple(kinds), tuple(firsts)


@contextlib.contextmanager
def _prepared(layer: nn.Module, index: int, tp_plan: dict[str, str], tp: int, sp: int, ckpt: bool):
    """The cached fake layer as one rank runs it, for the duration of the context (everything undone after):
    its linear layers cut as AutoTP does from the family's plan ("column" keeps out_features / tp rows,
    "row" in_features / tp columns), its attention kernel inside the Ulysses wrapper, and the trainer's
    activation checkpointing applied."""
    saved: list[tuple[nn.Module, str, object]] = []
    try:
        if tp > 1:
            rules = [(re.compile("^" + plan_regex(p) + "$"), style) for p, style in tp_plan.items()]
            for name, mod in layer.named_modules():
                style = next((s for rx, s in rules if rx.match(f"model.layers.{index}.{name}")), None)
                if style not in ("column", "row") or not isinstance(mod, nn.Linear):
                    continue
                w = mod.weight
                shape = (w.shape[0] // tp, w.shape[1]) if style == "column" else (w.shape[0], w.shape[1] // tp)
                saved.append((mod, "weight", w))
                mod.weight = nn.Parameter(w.new_empty(shape))
                if mod.bias is not None and style == "column":
                    saved.append((mod, "bias", mod.bias))
                    mod.bias = nn.Parameter(mod.bias.new_empty(shape[0]))
        if sp > 1:
            attn = layer.self_attn
            attn.attention = _ulysses(attn.attention, sp)  # an instance attribute over the class's method
            saved.append((attn, "attention", None))
        if ckpt:
            holder = nn.Module()
            holder.model = nn.Module()
            holder.model.layers = [layer]
            transforms.apply_activation_checkpointing(holder, 1)
            saved.append((layer, "forward", None))
        yield layer
    finally:
        for mod, attr, old in reversed(saved):
            if old is None:
                mod.__dict__.pop(attr, None)
            else:
                setattr(mod, attr, old)


def _run_layer(mode, model, mcfg, index: int, B: int, T: int, ckpt: bool, tp_plan, tp: int, sp: int) -> LayerFigures:
    """Layer ``index`` (checkpointed or not) forward and backward on a (B, T, d) input; its figures in bytes.

    The input is a fresh tensor (not a leaf, which autograd would keep alive), and our reference to it is
    dropped after forward: what the layer then still holds, less its output (held by the next layer if that
    one keeps its input), is what it keeps between forward and backward (``saved``). Peaks are above the
    memory before the input was made."""
    with mode, _prepared(model.model.layers[index], index, tp_plan, tp, sp, ckpt) as layer:
        dtype = next(layer.parameters()).dtype
        x0 = torch.empty(B, T, mcfg.hidden_size, dtype=dtype, requires_grad=True)
        pos = torch.arange(T * sp).expand(B, T * sp)[:, :T]
        cos, sin = model.model.rotary_emb(x0, pos)
        mt = _ActivationTracker()
        mt.track_external(layer)
        with mt, _even_routing():
            base = mt.act_now()
            x = x0.clone()
            y = layer(x, cos, sin, None)
            del x
            for m in layer.modules():  # as the model's forward does once its losses have read them
                if getattr(m, "router_logits", None) is not None:
                    m.router_logits = None
            saved = mt.act_now() - base - y.numel() * y.element_size()
            fwd_peak = mt.act_peak - base
            y.backward(torch.empty_like(y))
            peak = mt.act_peak - base
            left = mt.act_now() - base - y.numel() * y.element_size() - x0.grad.numel() * x0.grad.element_size()
        for p in layer.parameters():
            p.grad = None
    return LayerFigures(saved, fwd_peak, peak, max(0, left))


def _run_head(mode, model, tokens: int, chunk: int) -> HeadFigures:
    """The model without decoder layers (embedding, rotary tables, final norm, loss head), forward with labels
    and backward on ``tokens`` tokens; its figures in bytes. Every part of it works token by token, so one row
    of ``tokens`` stands for any micro-batch × (local) sequence of as many tokens."""
    with mode:
        head = copy.copy(model)
        head._modules = dict(model._modules)
        dec = copy.copy(model.model)
        dec._modules = dict(model.model._modules)
        dec._modules["layers"] = nn.ModuleList()
        head._modules["model"] = dec
        head.loss_chunk_tokens = chunk
        ids = torch.zeros(1, tokens, dtype=torch.long)
        mt = _ActivationTracker()
        mt.track_external(head)
        at_layers: list[int] = []

        def watch(_norm, args):  # the final norm's input: the last decoder layer's output in the whole model
            x = args[0]
            if x.requires_grad:
                x.register_hook(lambda g: at_layers.append(mt.act_now() - g.numel() * g.element_size()))

        handle = dec.norm.register_forward_pre_hook(watch)
        try:
            with mt, _even_routing():
                base = mt.act_now()
                loss = head(ids, labels=ids)
                fwd_peak = mt.act_peak - base
                loss.backward()
                peak = mt.act_peak - base
        finally:
            handle.remove()
        for p in model.parameters():
            p.grad = None
    return HeadFigures(fwd_peak, peak, max(0, at_layers[0] - base) if at_layers else 0)


@functools.lru_cache(maxsize=4096)
def _layer_figures(mcfg: ModelConfig, dtype: torch.dtype, index: int, B: int, T: int, ckpt: bool, tp: int,
                   sp: int) -> LayerFigures:
    mode, model = _fake_model(mcfg, dtype)
    return _run_layer(mode, model, mcfg, index, B, T, ckpt, family_of(mcfg).tp_plan, tp, sp)


@functools.lru_cache(maxsize=1024)
def _head_figures(mcfg: ModelConfig, dtype: torch.dtype, tokens: int, chunk: int) -> HeadFigures:
    mode, model = _fake_model(mcfg, dtype)
    return _run_head(mode, model, tokens, chunk)


def _expert_counts(mcfg: ModelConfig) -> tuple[int, int] | None:
    """Two smaller expert counts to measure a Mixture of Experts at (a config with ``num_experts``, as the
    trainer recognises one), or None when the model has none or few."""
    E, k = getattr(mcfg, "num_experts", 0), getattr(mcfg, "num_experts_per_tok", 1)
    e1 = max(8, k)
    return (e1, 2 * e1) if E > 2 * e1 else None


def measure(mcfg: ModelConfig, precision: str, micro_batch: int, seq_len: int, *, tp: int = 1, sp: int = 1,
            loss_chunk_tokens: int = 2048, exact: bool = False) -> Activations:
    """The activation figures of ``mcfg`` at ``micro_batch`` × ``seq_len`` (the whole sequence; each of the
    ``sp`` sequence-parallel ranks holds seq_len / sp of it), tensor-parallel degree ``tp``, in the dtype of
    ``precision``. Each distinct measurement runs once per process (cached).

    Decoder layers are run at micro-batch 1 and 2 and read off the line through them at ``micro_batch``
    (every activation of a layer has a batch dimension; the intercept holds what does not, such as a
    weight gradient while backward makes it); a Mixture of Experts with many experts is run at two smaller
    expert counts and extrapolated along the line through them (even routing: the experts' share of the
    tokens is the same in total whatever their number; the router's (tokens, experts) tensors grow with it).
    ``exact``: run the planned micro-batch and the model's own expert count instead (slow for large expert
    counts)."""
    dtype = DTYPES[precision]
    T = seq_len // sp
    kinds, firsts = layer_kinds(mcfg)
    counts = None if exact else _expert_counts(mcfg)
    batches = (micro_batch,) if exact or micro_batch <= 2 else (1, 2)

    def at(m: ModelConfig, B: int) -> tuple[tuple[LayerFigures, ...], tuple[LayerFigures, ...]]:
        return (tuple(_layer_figures(m, dtype, i, B, T, False, tp, sp) for i in firsts),
                tuple(_layer_figures(m, dtype, i, B, T, True, tp, sp) for i in firsts))

    def blend(x, y, k: float):
        """x + k (y - x), element by element, for figures and tuples of them."""
        if isinstance(x, LayerFigures):
            return LayerFigures(*(round(a + k * (b - a)) for a, b in zip(dataclasses.astuple(x),
                                                                           dataclasses.astuple(y))))
        return tuple(blend(a, b, k) for a, b in zip(x, y))

    def at_batch(B: int):
        if counts is None:
            return at(mcfg, B)
        e1, e2 = counts
        lo = at(dataclasses.replace(mcfg, num_experts=e1), B)
        hi = at(dataclasses.replace(mcfg, num_experts=e2), B)
        return blend(lo, hi, (mcfg.num_experts - e1) / (e2 - e1))

    figs = [at_batch(B) for B in batches]
    plain, ckpt = figs[0] if len(figs) == 1 else blend(figs[0], figs[1], micro_batch - 1)
    head = _head_figures(mcfg, dtype, micro_batch * T, loss_chunk_tokens)
    return Activations(kinds, plain, ckpt, head, exact=len(batches) == 1 and counts is None)


def measure_whole_model(mcfg: ModelConfig, precision: str, micro_batch: int, seq_len: int, *, every: int = 0,
                        loss_chunk_tokens: int = 2048) -> int:
    """Peak activation memory (bytes) of the whole model's forward with labels and backward on fake tensors,
    activation checkpointing of every ``every``-th layer applied: what ``measure(...).peak(every)`` predicts
    from one layer, for checking it (tests; slower: every layer runs)."""
    dtype = DTYPES[precision]
    mode = FakeTensorMode()
    with mode:
        model = _cast(family_of(mcfg).build(mcfg), dtype)
        transforms.apply_activation_checkpointing(model, every)
        model.loss_chunk_tokens = loss_chunk_tokens
        ids = torch.zeros(micro_batch, seq_len, dtype=torch.long)
        mt = _ActivationTracker()
        mt.track_external(model)
        with mt, _even_routing():
            base = mt.act_now()
            model(ids, labels=ids).backward()
            return mt.act_peak - base
