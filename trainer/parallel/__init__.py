"""Parallelism in one place: what is applied to the plain model and the batch, in which order, by whom.

===========================  ==============================================================================
``distributed.py``           joining the process group under any launcher; the step loop's few collectives
``layout.py``                this rank's place in the data × tensor × sequence-parallel grid, from
                             DeepSpeed's own groups; whether a model can be split that way
``ds_config.py``             the DeepSpeed JSON derived from the run config (ZeRO, precision, buckets,
                             AutoTP size); templates in ``ds_configs/`` may add what the run config does
                             not own
``transforms.py``            what is applied to the plain model from outside, in a fixed order: sequence
                             parallelism, activation checkpointing, per-layer compile, loss chunking
``engine.py``                the model built (under ``zero.Init`` for ZeRO-3) and ``deepspeed.initialize``,
                             which applies AutoTP and ZeRO
``tp_plan.py``               the family's tensor-parallel plan checked against what AutoTP did
``deepspeed_compat.py``      every DeepSpeed private API, monkeypatch and workaround, version-guarded
===========================  ==============================================================================

The batch side of sequence parallelism (each rank's slice of a sample) and of document masking is in
``trainer/batching.py``: a batch only moves forward, data -> batching -> engine -> model.
"""
