"""How a built model is spread over processes: topology, data-parallel engines, expert parallelism.

Everything here is applied to a finished single-device model from outside (the model never sees a process
group): :func:`init_distributed` (process group, megatron-core expert groups), :func:`build_model` (build
on meta, keep this rank's experts, materialise and initialise only those), :func:`apply_expert_parallel`
(mark expert parameters, swap in the all-to-all dispatcher), :func:`build_engine` (the plain data-parallel
engine, PyTorch FSDP2 or DeepSpeed ZeRO, from the registry in :mod:`~tandem.trainer.parallel.engines`), the MoE
:class:`ExpertBalancer` and context parallelism (:func:`apply_context_parallel`: K/V gathers and Mamba-2
state passing over the CP group, :mod:`~tandem.trainer.parallel.context`).
"""

from .context import ContextParallel, apply_context_parallel
from .distributed import DistInfo, all_reduce_sum, init_distributed
from .engines import ENGINES, Engine, build_engine, engine_name, register_engine
from .expert import apply_expert_parallel, gather_full_state_dict, is_expert_param
from .expert_balance import ExpertBalancer
from .materialize import build_model, load_frozen

__all__ = [
    "ContextParallel", "DistInfo", "ENGINES", "Engine", "ExpertBalancer", "all_reduce_sum", "apply_context_parallel", "apply_expert_parallel", "build_engine", "build_model", "engine_name",
    "gather_full_state_dict", "init_distributed", "is_expert_param", "load_frozen", "register_engine",
]
