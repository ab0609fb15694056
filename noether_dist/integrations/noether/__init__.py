"""noether_dist from Noether: switch a Noether run to noether_dist by configuration.

What a Noether user changes:

- ``trainer.kind``: a trainer class that puts :class:`NoetherDistTrainer` before their Noether
  trainer (``class MyTrainer(NoetherDistTrainer, MyNoetherTrainer): pass``);
  :class:`WeightedLossTrainer` is Noether's own WeightedLossTrainer, ready made;
- a ``trainer.checkpointer:`` block (output_dir, storage, timeout_s, thread_count, async_mode,
  retention, node_local; all optional).

Everything else stays Noether: the callbacks (CheckpointCallback, EmaCallback,
BestCheckpointCallback), the resume keys (``resume_run_id``, ``resume_stage_name``,
``resume_checkpoint``), ``model.initializers`` entries of Noether's PreviousRunInitializer.
Launch with ``python -m noether_dist.integrations.noether.train <config.yaml>`` (under torchrun
or srun): see ``train.py``.
"""

from noether.training.trainers import WeightedLossTrainer as _NoetherWeightedLossTrainer

from .gather import GatheringCheckpointWriter
from .initializer import PreviousRunBridge
from .resume import NoetherDistResumeInitializer
from .trainer import NoetherDistTrainer, config_class_with_checkpointer

__all__ = ["NoetherDistTrainer", "WeightedLossTrainer", "GatheringCheckpointWriter", "NoetherDistResumeInitializer",
           "PreviousRunBridge", "config_class_with_checkpointer"]


class WeightedLossTrainer(NoetherDistTrainer, _NoetherWeightedLossTrainer):
    """Noether's WeightedLossTrainer, checkpointing through noether_dist."""
