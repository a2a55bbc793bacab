"""What ``lmforge.json`` holds: the typed state the trainer writes beside DeepSpeed's files.

Written last, by global rank 0, after every rank has written its files: a tag directory with a
readable ``lmforge.json`` is complete. The JSON keys (and their order) are those of format
``lmforge-checkpoint-v1`` since the first release; fields added later are optional, so checkpoints
written by earlier versions load (tests/test_legacy_outputs.py).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.common.errors import InputError
from lmforge.common.files import atomic_write_text, read_json, sha256_file
from lmforge.model import ModelConfig, config_from_dict

STATE_FILE = "lmforge.json"
FORMAT = "lmforge-checkpoint-v1"


class CheckpointError(InputError):
    """A checkpoint that cannot be used (exit 2); the message names the file and the reason."""


@dataclass
class TokenizerRecord:
    """The run's tokenizer: ``file`` (``tokenizer.model``, or a Hugging Face ``tokenizer.json`` with its
    tokenizer_config.json/special_tokens_map.json) lives in the checkpoints directory beside the tags;
    ``vocab_size`` is its largest id + 1, added tokens included."""

    file: str = "tokenizer.model"
    sha256: str = ""
    vocab_size: int = 0
    bos_id: int = -1
    eos_id: int = -1
    pad_id: int = -1
    unk_id: int = -1


@dataclass
class CheckpointState:
    step: int
    consumed_samples: int  # position in the global sample order: a resume continues here
    model_config: dict  # ModelConfig.to_dict(): the family and its fields (no family: Llama, as before families)
    config: dict  # the resolved RunConfig.to_dict()
    tokenizer: TokenizerRecord
    data_fingerprint: str  # order_fingerprint of the training data (gpt_dataset)
    precision: str  # fp32 | bf16 | fp16, as resolved
    zero_stage: int
    tensor_parallel: int
    data_parallel: int
    world_size: int
    global_batch_size: int | None = None  # absent in checkpoints of the first versions
    sequence_parallel: int = 1  # Ulysses degree (absent, i.e. 1, in checkpoints before it existed)
    # DeepSpeed AutoEP group size; 0 = the model's own experts or a dense model (absent before AutoEP)
    expert_parallel: int = 0
    train_loss: float | None = None
    eval_loss: float | None = None
    # Every other file of the tag: relative path -> {"size", "crc32"} (integrity.py); None in
    # checkpoints saved before it was recorded.
    files: dict | None = None
    time: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    format: str = FORMAT

    @property
    def model(self) -> ModelConfig:
        return config_from_dict(self.model_config)

    def saved_global_batch(self) -> int:
        if self.global_batch_size:
            return self.global_batch_size
        t = self.config["train"]
        return t["micro_batch_size"] * t["grad_accum"] * self.data_parallel

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        head = {"format": d.pop("format"), "step": d.pop("step"), "time": d.pop("time")}
        return json.dumps({**head, **d}, indent=1)

    @classmethod
    def from_dict(cls, d: dict, where: str | Path) -> CheckpointState:
        if d.get("format") != FORMAT:
            raise CheckpointError(f"{where}: format is {d.get('format')!r}, expected {FORMAT!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.name not in d and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise CheckpointError(f"{where}: missing {', '.join(missing)}")
        kw = {k: v for k, v in d.items() if k in names}
        try:
            kw["tokenizer"] = TokenizerRecord(**kw["tokenizer"])
            state = cls(**kw)
            state.model  # noqa: B018 - validates model_config
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: {e}") from None
        return state


def read_state(tag_dir: Path) -> CheckpointState:
    path = Path(tag_dir) / STATE_FILE
    d = read_json(path, CheckpointError, missing="missing (not a complete checkpoint)")
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return CheckpointState.from_dict(d, path)


def write_state(tag_dir: Path, state: CheckpointState) -> None:
    atomic_write_text(Path(tag_dir) / STATE_FILE, state.to_json())


def tokenizer_path(tag_dir: Path, state: CheckpointState) -> Path:
    """The run's tokenizer beside the checkpoint (in ``checkpoints/``, or in the tag directory of a
    copied tag), checked against the sha256 recorded at save time."""
    name = state.tokenizer.file or "tokenizer.model"
    path = Path(tag_dir).parent / name
    if not path.is_file():
        path = Path(tag_dir) / name
    if not path.is_file():
        raise CheckpointError(f"{Path(tag_dir) / STATE_FILE}: tokenizer file {name} not found beside the checkpoint")
    if state.tokenizer.sha256 and sha256_file(path) != state.tokenizer.sha256:
        raise CheckpointError(f"{path}: sha256 differs from the one recorded in {Path(tag_dir) / STATE_FILE}")
    return path
