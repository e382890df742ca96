"""The peak-memory harness of the memory benches (``long_context_memory.py``, ``cp_memory.py``).

A measurement is one training forward+backward in a fresh process: read the RSS just before the step, reset
the process's peak-RSS counter (``/proc/self/clear_refs``, Linux ≥ 4.0), run the step, read ``VmHWM`` from
``/proc/self/status``. The peak is then the whole process (weights, gradients, activations, allocator slack)
and ``peak − before`` what the step itself added. Both benches also share the model: a hybrid MoE with all
four layer kinds (``MEM*EM-ME`` by default), sized to run at 16k+ tokens on a CPU.

The scripts import it as ``_memory`` (``python bench/<script>.py`` puts ``bench/`` first on ``sys.path``).
"""

from __future__ import annotations

import math
import time

PATTERN = "MEM*EM-ME"  # 4 Mamba, 3 MoE, 1 attention, 1 MLP


def model_config(pattern: str = PATTERN, hidden: int = 128, vocab: int = 8192):
    from tandem.model import HybridConfig

    h = hidden
    return HybridConfig.preset(
        "tiny", hybrid_override_pattern=pattern, vocab_size=vocab, hidden_size=h,
        num_attention_heads=max(h // 64, 2), num_key_value_heads=1, head_dim=64, intermediate_size=2 * h,
        mamba_num_heads=2 * h // 64, mamba_head_dim=64, ssm_state_size=32, n_groups=1, chunk_size=128,
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=h, moe_shared_expert_intermediate_size=2 * h,
        time_step_min=1e-5, time_step_limit=(1e-5, math.inf), max_position_embeddings=1 << 20,
    )


def status_kb(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS; False where ``/proc/self/clear_refs`` is not writable."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def gb(kb: float) -> float:
    return kb * 1024 / 1e9


def measure_step(step) -> dict:
    """Run ``step()`` (returns a scalar loss) and its backward under a reset peak counter.

    Returns ``loss`` (the float), ``before_kb`` (RSS before the step), ``peak_kb`` (``VmHWM`` after the
    backward), ``peak_reset`` (whether the counter could be reset; if not the peak includes everything
    before) and ``seconds`` (the step's wall time)."""
    before = status_kb("VmRSS")
    reset = reset_peak()
    t0 = time.perf_counter()
    loss = step()
    loss.backward()
    seconds = time.perf_counter() - t0
    return {"loss": loss.item(), "before_kb": before, "peak_kb": status_kb("VmHWM"), "peak_reset": reset,
            "seconds": seconds}
