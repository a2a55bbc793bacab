"""Hugging Face formats: export of checkpoints (verified: weights, logits, tokenizer, generate), import
of Hugging Face models of a supported architecture for continued pretraining, tokenizer conversion and generation.

=================  ==============================================================================
module             owns
=================  ==============================================================================
``export.py``      checkpoint -> HF directory (``python -m lmforge.trainer.export_hf``)
``importer.py``    HF directory -> lmforge initial weights (``python -m lmforge.trainer.import_hf``)
``verify.py``      the export's checks against transformers (LOGIT_ATOL)
``tokenizer.py``   SentencePiece model -> ``tokenizer.json`` and the id-parity check
``safetensors.py`` the streaming safetensors writer (one tensor in memory at a time)
``generate.py``    ``python -m lmforge.trainer.generate``
=================  ==============================================================================

Checkpoints are read only through ``trainer.checkpoint`` (tags, state, weights of any layout).
"""
