"""``lmforge plan``: before a cluster job starts, whether a run config fits each GPU and how fast it will run,
and the layouts that fit, best first — without allocating the model (docs/planning.md).

=================  ==========================================================================================
``layout.py``      what a plan is about: ``GpuSpec``, ``Cluster``, ``PlanLayout``
``gpus.py``        the GPUs ``--gpu`` knows, with their sources
``activations.py`` activation memory measured from the model's own code on fake tensors
``memory.py``      per-GPU memory of a layout: model states by ZeRO stage, DeepSpeed's buffers, reserve
``comms.py``       the collectives of a step, their bytes and seconds
``timing.py``      step time: compute at the efficiency measured on the H200, exposed communication, offload
``search.py``      the run's own layout judged, the layouts that fit, ``predict`` for the trainer
``__main__.py``    the command: ``python -m lmforge.trainer.plan CONFIG [overrides] --gpus N ...``
=================  ==========================================================================================
"""

from .gpus import GPUS, parse_gpu
from .layout import Cluster, GpuSpec, PlanLayout
from .search import plan, predict

__all__ = ["GPUS", "Cluster", "GpuSpec", "PlanLayout", "parse_gpu", "plan", "predict"]
