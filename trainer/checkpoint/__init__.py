"""Run checkpoints: atomic step directories, the ``latest`` pointer, exact resume, weights for fine-tuning.

:class:`CheckpointManager` writes and reads ``<run dir>/checkpoints/step_XXXXXXXX/`` (model in the released
HF layout, optimizer state by parameter name — or, for sharded engines, every rank's pieces through
torch.distributed.checkpoint (:mod:`.sharded`) — RNG per rank, trainer state); :mod:`.optimizer_state` keeps
the gathered optimizer state independent of the parallel layout; :mod:`.hf_writer` writes the HF layout
from shards without gathering; :mod:`.export` is ``tandem export``. The model's own checkpoint codecs (HF/NemotronH,
NVFP4) live in :mod:`tandem.model.checkpoint`.
"""

from .manager import CheckpointManager, load_weights, resolve_checkpoint, weights_dir

__all__ = ["CheckpointManager", "load_weights", "resolve_checkpoint", "weights_dir"]
