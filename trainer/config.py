"""The one typed run configuration: YAML file + ``section.key=value`` overrides.

Every field is documented here (the docstring of its dataclass). Unknown keys are errors naming the
key; values are type-checked. The DeepSpeed JSON is *derived* from this config
(``trainer.parallel.ds_config.build_ds_config``): no value lives in two places.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from lmforge.common.errors import InputError
from lmforge.model import resolve_family


class ConfigError(InputError):
    """A run config that cannot be used (exit 2); the message names the key."""


@dataclass
class ModelSection:
    """The model: a family, a size preset, and overrides of the family's config fields. The family's config
    class (``model/<family>/config.py``) owns the shape; this section only names it.

    family: llama | qwen3 (``lmforge.model.families()``); default: the preset's family, else llama.
    preset: a size preset of any family (names are unique across families, so a preset says its family):
        llama: debug, tiny, 125m, 350m, 760m, 1b, 3b, 7b, 13b, 70b; qwen3: qwen3-debug, qwen3-tiny,
        qwen3-0.6b, qwen3-1.7b, qwen3-4b, qwen3-8b. Without a preset, the shape fields are given here.
    init_from_hf: a local Hugging Face directory of a supported architecture (LlamaForCausalLM,
        MistralForCausalLM, Qwen3ForCausalLM) or an ``import_hf`` output, whose weights initialise the model
        for continued pretraining; the family and shape then come from it (no other keys).
    Any other key is a field of the family's config class, overriding the preset: hidden_size,
        intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads,
        max_position_embeddings, rope_theta, rms_norm_eps, tie_word_embeddings, initializer_range,
        vocab_size (default: the tokenizer's), and the family's own (qwen3: head_dim). An unknown key is an
        error naming it and the family's fields.
    """

    family: str | None = None
    preset: str | None = None
    init_from_hf: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # family config fields (written flat in YAML)

    SECTION_KEYS: ClassVar[tuple[str, ...]] = ("family", "preset", "init_from_hf")

    def to_dict(self) -> dict:
        return {"family": self.family, "preset": self.preset, "init_from_hf": self.init_from_hf, **self.overrides}


@dataclass
class DataSource:
    """path: a ``preprocess`` output directory (with manifest.json) or a Megatron prefix.
    weight: relative sampling weight when several sources are blended."""

    path: str = ""
    weight: float = 1.0


@dataclass
class DataSection:
    """Training data.

    train: list of {path, weight}; blended by weight.
    valid: a path like ``train``'s (null = the ``valid`` split of the first train source if present).
    seq_len: tokens per sample (the model sees seq_len inputs, predicts seq_len targets).
    mask_eod_loss: do not train on the token that follows an end-of-document.
    reset_position_ids: restart rotary positions at each document start.
    intra_doc_attention: forbid attention across packed documents (causal attention per document span;
        on by default: on CPU it ran 2-14% faster than plain causal attention,
        benchmarks/intra_doc_attention.py).
    cache_dir: where sample-index arrays are cached (null = RUN_DIR/data_cache).
    prefetch: read the next step's samples in a background thread.
    """

    train: list[DataSource] = field(default_factory=list)
    valid: str | None = None
    seq_len: int = 1024
    mask_eod_loss: bool = False
    reset_position_ids: bool = False
    intra_doc_attention: bool = True
    cache_dir: str | None = None
    prefetch: bool = True


@dataclass
class TrainSection:
    """Step loop.

    micro_batch_size: samples per data-parallel rank per forward.
    grad_accum: micro-batches accumulated per optimizer step.
    global_batch_size: optional; if set it must equal micro_batch_size × grad_accum × data-parallel size.
    max_steps: optimizer steps to train in total (resumed runs continue up to it).
    seed: seeds the model init, data order and dropout-free RNG streams.
    precision: auto (bf16 where the accelerator has native bf16, i.e. CUDA; fp32 on CPU) | bf16 | fp16 | fp32 |
        fp8 (a bf16 run whose large decoder matmuls run in float8 through torchao: parallel.fp8_recipe,
        parallel.fp8_layers; GPUs of compute capability >= 8.9, emulated on CPU; trainer/parallel/fp8.py).
    exit_after_minutes: save and exit cleanly after this long (0 = never).
    stopped_exit_status: the exit status (0-255) of a run that stopped before max_steps — a signal, the
        stop file, its launcher gone, exit_after_minutes — once its checkpoint is saved. 0 (default): the
        status of a finished run, what the launch scripts and Slurm's requeue in slurm.sbatch expect;
        75 (EX_TEMPFAIL, "try again") for a retry loop or a Kubernetes Job that must start the run again
        (docs/configuration.md, "Exit status"). A run that reached max_steps exits 0 and writes
        RUN_DIR/DONE.
    max_nonfinite_steps: abort after this many consecutive optimizer steps with a non-finite loss or
    gradient (each one is skipped: no weight or optimizer-state change); 0 = never abort.
    compile: compile each decoder layer with torch.compile (per-block, after activation checkpointing;
        the first step's time, compilation included, is printed). Every ZeRO stage; under ZeRO-3 each
        layer compiles as several graphs split at DeepSpeed's parameter gathers. Unset (null, the default):
        on with precision fp8 (torchao's float8 casts need fusing to pay), off otherwise.
    """

    micro_batch_size: int = 4
    grad_accum: int = 1
    global_batch_size: int | None = None
    max_steps: int = 1000
    seed: int = 1234
    precision: str = "auto"
    exit_after_minutes: float = 0.0
    stopped_exit_status: int = 0
    max_nonfinite_steps: int = 5
    compile: bool | None = None


@dataclass
class OptimSection:
    """AdamW with warmup and a decay schedule (no weight decay on norms, biases and embeddings-free 1-D params).

    lr: peak learning rate. min_lr: floor at the end of decay. warmup_steps: linear warmup length.
    weight_decay: decoupled weight decay for matrices. betas: Adam betas. eps: Adam epsilon.
    grad_clip: global gradient-norm clip (0 = off).
    schedule: cosine | linear | wsd (warmup-stable-decay) | constant.
    decay_fraction: for wsd, the fraction of max_steps spent in the final linear decay.
    """

    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0
    schedule: str = "cosine"
    decay_fraction: float = 0.2


@dataclass
class ParallelSection:
    """Parallelism and memory.

    zero_stage: DeepSpeed ZeRO stage 0, 1, 2 or 3 (3 builds the model under deepspeed.zero.Init).
    tensor_parallel: tensor-parallel degree through DeepSpeed AutoTP (1 = off); must divide the world
        size, num_key_value_heads and intermediate_size. Combines with every zero_stage and offload
        (data-parallel size = world / tensor_parallel).
    sequence_parallel: S > 1 = DeepSpeed-Ulysses sequence parallelism: each rank of a group of S holds
        seq_len / S tokens of every sample through embeddings, norms, MLPs and the loss; attention
        exchanges to whole sequences for num_attention_heads / S heads (all-to-all) and back, document
        masking included. S must divide the world size, data.seq_len and num_attention_heads;
        data-parallel size = world / S; not combined with tensor_parallel. For long context
        (README "Long context").
    zero_hpz_partition_size: ZeRO++ hierarchical partitioning for ZeRO-3 across nodes (1 = off): set it to
        the ranks per node; each node then keeps a secondary copy of the weights partitioned over its own
        ranks, so the forward/backward all-gathers stay inside the node (one inter-node gather per step).
        Costs weights / ranks-per-node of memory per rank. Must divide the world size.
    zero_quantized_weights / zero_quantized_gradients: ZeRO++ qwZ (int8 weight all-gathers) and qgZ
        (int4 gradient reduce-scatter) for ZeRO-3; CUDA only (DeepSpeed's quantizer kernels).
    expert_parallel: Mixture-of-Experts models only. 0 (default) = the model's own experts, the reference
        implementation (a loop over experts; what runs on CPU and one device without DeepSpeed's kernels);
        E >= 1 = DeepSpeed AutoEP replaces every sparse block with grouped-GEMM experts
        (``torch._grouped_mm``) spread over groups of E ranks, tokens exchanged by all-to-all (E = 1: the
        grouped GEMM without exchange, the fast path on one GPU). E must divide the world size and
        num_experts; ZeRO 0-3; not with tensor or sequence parallelism or offload, nor with train.compile in
        fp32 (docs/mixture-of-experts.md says why). Results match the reference (tests/test_expert_parallel.py).
    fp8_recipe: with train.precision fp8: tensorwise (default: one float8 scale per tensor; torchtitan measured
        +25% tokens/s for Llama-3.1-8B on H100 against +10% for rowwise; the GPU check measures ours) |
        rowwise (a scale per row: closer to bf16, slower).
    fp8_layers: auto (default: the decoder linear layers large enough for float8 to pay, torchao's H100
        thresholds) | all (every decoder linear layer with dimensions multiples of 16: tests, small models).
    activation_checkpointing: 0 = off, N = recompute every N-th decoder layer (1 = every layer);
        torch non-reentrant checkpointing, bitwise-identical gradients.
    offload: none | optimizer | optimizer+params (ZeRO CPU offload; params needs stage 3).
    loss_chunk_tokens: N (default 2048) = the loss computed N tokens at a time, its gradients in the
        same pass (``model/common/loss.py`` ``LMHead``); 0 = from the whole (B, T, V) logits. The same loss within
        fp32 rounding; peak memory holds one (N, V) block of logits instead of all B·T rows, their fp32
        copy and the log-softmax: 125m, micro batch 4 × seq 4096, vocab 32k on CPU: 8.0 -> 0.9 GiB (fp32)
        and 7.0 -> 1.0 GiB (bf16), and faster (benchmarks/loss_memory.py).
    attention_kernel: how intra-document attention runs: auto (flex on CUDA; on CPU spans, or mask when
        train.compile is on) | spans (causal SDPA per document span) | mask (one dense (B, 1, T, T)
        mask) | flex (a flex-attention block mask built once per batch on the device; CUDA for
        training: flex attention has no CPU backward).
    collective_timeout_minutes: how long a collective may wait before the job fails (a dead or hung rank
        then ends the job instead of blocking every other rank; NCCL's asynchronous error handling is
        on, so the failure is raised, not hung on).
    ds_config: optional DeepSpeed JSON template supplying settings this config does not own
        (documented examples in ds_configs/). Communication settings the template leaves out are
        chosen from the model size (``trainer.parallel.ds_config.communication_defaults``).
    """

    zero_stage: int = 2
    tensor_parallel: int = 1
    sequence_parallel: int = 1
    zero_hpz_partition_size: int = 1
    zero_quantized_weights: bool = False
    zero_quantized_gradients: bool = False
    expert_parallel: int = 0
    fp8_recipe: str = "tensorwise"
    fp8_layers: str = "auto"
    activation_checkpointing: int = 0
    offload: str = "none"
    loss_chunk_tokens: int = 2048
    attention_kernel: str = "auto"
    collective_timeout_minutes: float = 30.0
    ds_config: str | None = None


@dataclass
class CheckpointSection:
    """interval: save every N steps (0 = only at the end/exit). keep_last: keep the newest K.
    keep_every: also keep every M-th step forever (0 = none). resume: auto-resume from RUN_DIR.
    allow_data_change: resume even if data or tokenizer fingerprints changed.
    allow_batch_change: resume with a different global batch size (the sample sequence continues, in
    steps of the new size); without it a changed global batch is refused, naming the grad_accum that
    keeps it (e.g. after halving the GPU count).
    async_save: write periodic checkpoints in the background: a save stalls training only while the
    state is copied to host memory (which must hold a second copy of each rank's checkpoint); the tag is
    marked complete at the first log step after every rank's files are written (at the latest at the
    next save or the end of the run). Final saves (end, stop) are synchronous.
    verify: what resume checks of the latest checkpoint's files against the sizes and CRC-32s recorded
    at save: checksums (default; reads every file once, spread over the ranks) | sizes (no reading). A
    damaged tag is set aside (renamed step_N.damaged) and the previous complete one is used."""

    interval: int = 100
    keep_last: int = 2
    keep_every: int = 0
    resume: bool = True
    allow_data_change: bool = False
    allow_batch_change: bool = False
    verify: str = "checksums"
    async_save: bool = False


@dataclass
class LogSection:
    """interval: log every N steps (console, metrics.jsonl, TensorBoard).
    peak_tflops: per-device peak for MFU (null = auto-detect known GPUs; CPU has none)."""

    interval: int = 10
    peak_tflops: float | None = None


@dataclass
class EvalSection:
    """interval: evaluate every N steps (0 = off). steps: validation micro-batches per evaluation."""

    interval: int = 0
    steps: int = 10


@dataclass
class RunConfig:
    """run_dir: everything the run writes goes here. tokenizer: a SentencePiece .model, a Hugging Face
    tokenizer.json, or a directory holding one (``data_pipeline.tokenizer.resolve_tokenizer``)."""

    run_dir: str = "runs/default"
    tokenizer: str = ""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimSection = field(default_factory=OptimSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()  # the family's fields flat, as they are written
        return d


_CHOICES = {
    "train.precision": ("auto", "bf16", "fp16", "fp32", "fp8"),
    "parallel.fp8_recipe": ("tensorwise", "rowwise"),
    "parallel.fp8_layers": ("auto", "all"),
    "optim.schedule": ("cosine", "linear", "wsd", "constant"),
    "parallel.offload": ("none", "optimizer", "optimizer+params"),
    "parallel.attention_kernel": ("auto", "spans", "mask", "flex"),
    "checkpoint.verify": ("checksums", "sizes"),
}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-3" (no dot) as a string; accept any Python float literal.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _build_model(d: dict, key: str = "model") -> ModelSection:
    """``model:``: family, preset and init_from_hf, and any field of the family's config class (coerced to its
    type there); the family is resolved here, so an unknown family, preset or field names its key."""
    section = {k: _coerce(d[k], str | None, f"{key}.{k}") for k in ModelSection.SECTION_KEYS if k in d}
    fields_ = {k: v for k, v in d.items() if k not in ModelSection.SECTION_KEYS and v is not None}
    if section.get("init_from_hf"):
        if fields_:
            raise ConfigError(f"{key}: init_from_hf takes the shape from the checkpoint; drop "
                              f"{', '.join(f'{key}.{k}' for k in sorted(fields_))}")
        if section.get("family") is None:  # known once the directory is read (trainer.build)
            return ModelSection(**section)
    try:
        fam = resolve_family(section.get("family"), section.get("preset"))
    except ValueError as e:
        which = "family" if str(e).startswith("unknown model family") else "preset"
        raise ConfigError(f"{key}.{which}: {e}") from None
    hints = typing.get_type_hints(fam.config_class)
    valid = fam.field_names()
    overrides = {}
    for k, v in fields_.items():
        if k not in valid:
            raise ConfigError(f"unknown config key {f'{key}.{k}'!r}; valid keys here: "
                              f"{', '.join(ModelSection.SECTION_KEYS)} and the {fam.name} family's fields "
                              f"{', '.join(valid)}")
        overrides[k] = _coerce(v, hints[k], f"{key}.{k}")
    return ModelSection(family=fam.name, preset=section.get("preset"), init_from_hf=section.get("init_from_hf"),
                        overrides=overrides)


def _build(cls: type, d: dict, prefix: str = ""):
    if cls is ModelSection:
        return _build_model(d, prefix)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in d:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else k
            raise ConfigError(
                f"unknown config key {where!r}; valid keys here: {', '.join(sorted(names))}"
            )
    kwargs = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        kwargs[k] = _coerce(v, hints[k], key)
        if key in _CHOICES and kwargs[k] not in _CHOICES[key]:
            raise ConfigError(f"{key}: {kwargs[k]!r} is not one of {', '.join(_CHOICES[key])}")
    return cls(**kwargs)


def _apply_override(d: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    dotted, raw = item.split("=", 1)
    parts = dotted.strip().split(".")
    value = yaml.safe_load(raw) if raw.strip() else ""
    node = d
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted!r}: {p!r} is not a section")
        node = nxt
    node[parts[-1]] = value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
    for item in overrides:
        _apply_override(raw, item)
    cfg = _build(RunConfig, raw)
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    t, p = cfg.train, cfg.parallel
    if t.compile is None:  # unset: on with fp8 (TrainSection)
        t.compile = t.precision == "fp8"
    if t.micro_batch_size < 1 or t.grad_accum < 1:
        raise ConfigError("train.micro_batch_size and train.grad_accum must be >= 1")
    if t.max_nonfinite_steps < 0:
        raise ConfigError("train.max_nonfinite_steps must be >= 0 (0 = never abort)")
    if not 0 <= t.stopped_exit_status <= 255:
        raise ConfigError(f"train.stopped_exit_status: {t.stopped_exit_status} is not an exit status 0-255 "
                          "(0 = like a finished run, 75 = EX_TEMPFAIL for retry loops)")
    if p.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.zero_stage: {p.zero_stage} is not 0, 1, 2 or 3")
    if p.tensor_parallel < 1:
        raise ConfigError("parallel.tensor_parallel must be >= 1")
    if p.sequence_parallel < 1:
        raise ConfigError("parallel.sequence_parallel must be >= 1")
    if p.zero_hpz_partition_size < 1:
        raise ConfigError("parallel.zero_hpz_partition_size must be >= 1 (1 = off)")
    if p.expert_parallel < 0:
        raise ConfigError("parallel.expert_parallel must be >= 0 (0 = the reference experts, E >= 1 = DeepSpeed "
                          "AutoEP over groups of E ranks)")
    if (p.zero_hpz_partition_size > 1 or p.zero_quantized_weights or p.zero_quantized_gradients) \
            and p.zero_stage != 3:
        raise ConfigError("parallel.zero_hpz_partition_size / zero_quantized_weights / zero_quantized_gradients "
                          "(ZeRO++) need parallel.zero_stage=3")
    if p.sequence_parallel > 1 and p.tensor_parallel > 1:
        raise ConfigError("parallel.sequence_parallel > 1 and parallel.tensor_parallel > 1 cannot be combined "
                          "(both split the attention heads); use one of them")
    if cfg.data.seq_len % p.sequence_parallel:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} is not divisible by parallel.sequence_parallel="
                          f"{p.sequence_parallel}: every sequence-parallel rank holds seq_len / S tokens")
    if p.offload != "none" and p.zero_stage == 0:
        raise ConfigError("parallel.offload needs parallel.zero_stage >= 1")
    if p.collective_timeout_minutes <= 0:
        raise ConfigError("parallel.collective_timeout_minutes must be > 0")
    if p.loss_chunk_tokens < 0:
        raise ConfigError("parallel.loss_chunk_tokens must be >= 0 (0 = off)")
    if p.offload == "optimizer+params" and p.zero_stage != 3:
        raise ConfigError("parallel.offload=optimizer+params needs parallel.zero_stage=3")
    if cfg.data.seq_len < 1:
        raise ConfigError("data.seq_len must be >= 1")
    if not cfg.data.train:
        raise ConfigError("data.train: at least one {path, weight} source is required")
    for i, s in enumerate(cfg.data.train):
        if not s.path:
            raise ConfigError(f"data.train[{i}].path is empty")
        if s.weight <= 0:
            raise ConfigError(f"data.train[{i}].weight must be > 0")
    if not cfg.tokenizer:
        raise ConfigError("tokenizer: path to the tokenizer (SentencePiece .model or Hugging Face tokenizer.json) "
                          "is required")
    if len(cfg.optim.betas) != 2:
        raise ConfigError("optim.betas must be a list of two numbers")
    if cfg.model.preset is None and cfg.model.init_from_hf is None and "hidden_size" not in cfg.model.overrides:
        raise ConfigError("model: give a preset, explicit shape fields, or init_from_hf")


def check_global_batch(cfg: RunConfig, dp_size: int) -> int:
    """global batch = micro batch × grad accumulation × data-parallel size (checked, returned)."""
    g = cfg.train.micro_batch_size * cfg.train.grad_accum * dp_size
    if cfg.train.global_batch_size is not None and cfg.train.global_batch_size != g:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} but micro_batch_size "
            f"{cfg.train.micro_batch_size} × grad_accum {cfg.train.grad_accum} × data-parallel size "
            f"{dp_size} = {g}"
        )
    return g


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
