"""The checkpoint format, owned here and nowhere else.

A checkpoint is a tag directory ``RUN_DIR/checkpoints/step_NNNNNNNN/`` holding DeepSpeed's engine files,
per-rank RNG states and ``lmforge.json`` (``CheckpointState``), written last; ``latest`` names the
newest complete tag. The trainer writes checkpoints with ``save`` and resumes with ``resume``; the tests'
checkpoint factory writes through the same ``save``; the Hugging Face export reads tags with
``find_checkpoint`` and ``weight_source``.

=================  ==============================================================================
module             owns
=================  ==============================================================================
``state.py``       ``CheckpointState`` (what ``lmforge.json`` holds), reading and writing it
``tags.py``        tag names, completeness, ``latest``, finding a tag, rotation (``prune``)
``integrity.py``   every file's size and CRC-32 recorded at save, checked at resume/export/verify
``save.py``        the collective save (synchronous, or completed by ``finish``) and the RNG states
``background.py``  the background writer of ``checkpoint.async_save``
``universal.py``   DeepSpeed's universal conversion of a tag (any layout -> one file per parameter)
``resume.py``      which tag to resume from, whether it fits this run, and loading it
``weights.py``     full weights (fp32 masters where they exist) from any ZeRO / tensor-parallel layout
``masters.py``     DeepSpeed's fp32-master layouts that zero_to_fp32 does not read
=================  ==============================================================================
"""

from .integrity import InconsistentViewError, check_shared_run_dir, check_tag, newest_intact
from .resume import ResumePlan
from .save import PendingSave, finish, load_rng, save
from .state import STATE_FILE, CheckpointError, CheckpointState, TokenizerRecord, read_state, tokenizer_path
from .tags import (
    LATEST,
    clear_tag,
    complete_tags,
    find_checkpoint,
    latest_tag,
    prune,
    step_of,
    tag_for,
    universal_tag,
)
from .universal import UNIVERSAL_MARKER, convert_to_universal, ds_to_universal, universal_complete
from .weights import weight_source

__all__ = [
    "CheckpointError", "CheckpointState", "LATEST", "PendingSave", "ResumePlan", "STATE_FILE", "TokenizerRecord",
    "UNIVERSAL_MARKER", "check_tag", "clear_tag", "complete_tags", "convert_to_universal", "ds_to_universal",
    "InconsistentViewError", "check_shared_run_dir", "find_checkpoint", "finish", "latest_tag", "load_rng",
    "newest_intact", "prune", "read_state", "save", "step_of",
    "tag_for", "tokenizer_path", "universal_complete", "universal_tag", "weight_source",
]
