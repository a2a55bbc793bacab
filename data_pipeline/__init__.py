"""lmforge offline data pipeline: streaming readers, SentencePiece training, Megatron MMIDIDX shards.

The flow, one owner per step:

    readers/          input files -> documents (one module per format), bad records counted by reason
    sampling.py       the bounded, seeded sample of lines both tokenizer trainers learn from
    tokenizer.py      SentencePiece training; what the pipeline records of either tokenizer kind
    hf_tokenizer.py   Hugging Face tokenizer.json: size, special tokens, loading, byte-level BPE training
    preprocess/       documents -> tokenized shards, parallel, multi-node, resumable, deterministic
    indexed_dataset.py  the MMIDIDX .idx/.bin format (docs/indexed_dataset_format.md)
    manifest.py       manifest.json: the contract between the pipeline and the trainer
    tools.py          inspect, verify, merge
    gpt_dataset.py    shards -> packed, shuffled, blended training samples
    cli.py            ``python -m lmforge.data_pipeline ...``

What every stage shares (files, errors and exit codes, the launcher environment, which tokenizer a path
is) is in ``lmforge.common`` (common/).

Run ``python -m lmforge.data_pipeline --help``. Light imports only here: the trainer imports
``data_pipeline.manifest`` and ``data_pipeline.indexed_dataset`` without pulling in the readers.
"""

import lmforge.common  # noqa: F401  (first: a missing dependency below is reported in one line)
