"""lmforge trainer: from a run config to a trained, checkpointed, exported model.

``build.py`` builds the run (layout, tokenizer, data, resume plan, model, DeepSpeed engine) and
``train.py`` runs the step loop; ``parallelize.py`` applies the training-time transformations to the
plain model in a fixed order; ``checkpoint/`` owns the checkpoint format; ``hf/`` the Hugging Face
formats. All DeepSpeed internals lmforge touches are in ``deepspeed_compat.py``. See the README's
"What is where" for one line per module.
"""
