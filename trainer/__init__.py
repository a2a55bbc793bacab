"""lmforge trainer: from a run config to a trained, checkpointed, exported model.

A batch travels forward only: data (``lmforge.data_pipeline.gpt_dataset``) -> ``batching.py`` (samples to
model inputs, the attention structure of packed documents) -> the DeepSpeed engine -> the model.

=====================  =====================================================================================
``config.py``          the one typed run config (YAML + overrides); ``model:`` names a family, preset, fields
``build.py``           the run built from its config in one place (layout, tokenizer, data, resume plan,
                       model, engine, batch transform)
``train.py``           the step loop (``python -m lmforge.trainer.train``)
``batching.py``        which samples each rank reads; samples -> model inputs; the attention policy
``parallel/``          parallelism in one place: layout and groups, the DeepSpeed config, the model
                       transforms in their fixed order, the engine, the tensor-parallel plan check, and
                       every DeepSpeed workaround (``deepspeed_compat.py``)
``checkpoint/``        the checkpoint format's only owner
``hf/``                Hugging Face export, import, verification, tokenizer conversion, generation
``schedule.py``        the LR schedule
``signals.py``         stop requests (signals, the stop file, a lost launcher)
``faults.py``          non-finite steps
``metrics.py``         metrics.jsonl, TensorBoard, console
``launch.py``          ``python -m lmforge.trainer.launch -- LAUNCHER ...``: stops forwarded and waited for
``cli.py``             the ``lmforge`` console command
=====================  =====================================================================================
"""

import lmforge.common  # noqa: F401  (first: a missing dependency below is reported in one line)
