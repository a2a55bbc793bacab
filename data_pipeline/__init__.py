"""lmforge offline data pipeline: streaming readers, SentencePiece training, Megatron MMIDIDX shards.

Run ``python -m data_pipeline --help``. Light imports only here: the trainer imports
``data_pipeline.manifest`` and ``data_pipeline.indexed_dataset`` without pulling in the readers.
"""
