"""Metric sinks (console progress, ``metrics.jsonl``, wandb) and the model-FLOPs count behind MFU.

Sinks are callbacks: the loop hands each a dict per logged step; adding a sink never touches the loop.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path

import torch

from tandem.model import HybridConfig

log = logging.getLogger(__name__)

__all__ = ["JsonlSink", "ConsoleSink", "NOISY_LIBRARIES", "WandbSink", "configure_logging", "memory_now_bytes",
           "memory_peak_bytes", "model_flops_per_token", "peak_flops_per_device"]

#: libraries that log or warn on every run (megatron's index builds, DeepSpeed's accelerator detection and
#: engine set-up, torchao's deprecations, setuptools' distutils shim imported by DeepSpeed): quiet unless
#: ``logger.verbose``; their errors still show
NOISY_LIBRARIES = ("megatron", "deepspeed", "DeepSpeed", "torchao", "_distutils_hack")


class _AtLeast(logging.Filter):
    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level


def configure_logging(rank: int, verbose: bool = False) -> None:
    """Quiet by default: log lines from rank 0 only (other ranks print errors), no warnings from
    :data:`NOISY_LIBRARIES`; ``verbose`` (``logger.verbose=true``) leaves every rank and library as is.

    Levels go on each library's top logger (their module loggers inherit them); a filter as well, because
    DeepSpeed resets its logger's level when it is imported and logs through that logger directly.
    """
    if verbose:
        return
    for name in NOISY_LIBRARIES:
        lib = logging.getLogger(name)
        lib.setLevel(logging.ERROR)
        if not any(isinstance(f, _AtLeast) for f in lib.filters):
            lib.addFilter(_AtLeast(logging.ERROR))
        warnings.filterwarnings("ignore", module=rf"{name}(\.|$)")
    if rank != 0:
        logging.getLogger().setLevel(logging.ERROR)
        logging.getLogger("tandem").setLevel(logging.ERROR)


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def memory_now_bytes(device: torch.device) -> int:
    """This process's memory in use now: allocated CUDA memory on a GPU, resident set size (VmRSS) on CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _proc_status_bytes("VmRSS")


def memory_peak_bytes(device: torch.device) -> int:
    """This process's peak memory so far: ``torch.cuda.max_memory_allocated`` on a GPU, VmHWM on CPU (Linux)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _proc_status_bytes("VmHWM")


def model_flops_per_token(cfg: HybridConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3 × forward; 2 FLOPs per multiply-add).

    Counts every matmul a token goes through: projections of each layer kind with only the routed
    experts it is sent to, the lm_head, causal attention scores/values (≈ seq_len/2 keys per query), and
    the SSD scan's chunk-local and state terms. The embedding lookup is free.
    """
    h = cfg.hidden_size
    fwd = 2 * h * cfg.vocab_size  # lm_head
    for ch in cfg.hybrid_override_pattern:
        if ch == "M":
            d, gn, heads, q = cfg.mamba_d_inner, cfg.n_groups * cfg.ssm_state_size, cfg.mamba_num_heads, cfg.chunk_size
            fwd += 2 * h * cfg.mamba_in_proj_dim + 2 * d * h  # in_proj, out_proj
            fwd += 2 * (d + 2 * gn) * cfg.conv_kernel  # depthwise conv
            n = cfg.ssm_state_size
            # SSD per token: C·Bᵀ within a chunk (q·n per head), its product with x (q·p), chunk state
            # (p·n) and the state read-out (p·n); halved for causality inside a chunk.
            fwd += 2 * heads * (q * n / 2 + q * cfg.mamba_head_dim / 2 + 2 * cfg.mamba_head_dim * n)
        elif ch == "*":
            qd, kvd = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
            fwd += 2 * h * (2 * qd + 2 * kvd)  # q, o, k, v projections
            fwd += 2 * 2 * qd * seq_len / 2  # QKᵀ and AV over ~seq_len/2 causal keys
        elif ch == "-":
            fwd += 2 * 2 * h * cfg.intermediate_size
        elif ch == "E":
            width = cfg.moe_latent_size or h
            fwd += 2 * h * cfg.n_routed_experts  # router
            fwd += cfg.num_experts_per_tok * 2 * 2 * width * cfg.moe_intermediate_size
            if cfg.moe_latent_size:
                fwd += 2 * 2 * h * cfg.moe_latent_size
            if cfg.n_shared_experts:
                fwd += 2 * 2 * h * cfg.moe_shared_expert_intermediate_size
    return 3.0 * fwd


#: dense (no sparsity) tensor-core peak FLOP/s per device by the format its GEMMs run in (vendor datasheets)
PEAK_FLOPS = {
    "bf16": {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12, "GB200": 2500e12, "L40S": 362e12},
    "fp8": {"H100": 1979e12, "H200": 1979e12, "B200": 4500e12, "GB200": 5000e12, "L40S": 733e12},
    "fp4": {"B200": 9000e12, "GB200": 10000e12},
}


def gemm_format(precision: str, backend: str) -> str | None:
    """The format a run's GEMMs execute in: FP8 / FP4 only where Transformer Engine runs them (emulated
    recipes quantise and dequantise, then multiply in bf16), bf16 for ``auto``/``bf16`` on GPUs; None for
    fp32 (no tensor-core peak to compare with)."""
    if backend == "te":
        return "fp4" if precision == "nvfp4" else "fp8"
    return None if precision == "fp32" else "bf16"


def peak_flops_per_device(override: float | None, precision: str = "auto", backend: str = "emulate",
                          device_name: str | None = None) -> float | None:
    """The peak MFU is measured against: ``logger.peak_flops`` if set, else the table's entry for this GPU
    and the precision in use (:func:`gemm_format`); None (MFU not reported) on CPU, for fp32, or for a GPU
    or format the table lacks."""
    if override:
        return float(override)
    if device_name is None:
        if not torch.cuda.is_available():
            return None  # CPU: no meaningful peak, MFU not reported
        device_name = torch.cuda.get_device_name()
    fmt = gemm_format(precision, backend)
    # the longest matching key first: "GB200" before "B200"
    for key, peak in sorted(PEAK_FLOPS.get(fmt, {}).items(), key=lambda kv: -len(kv[0])):
        if key in device_name:
            return peak
    return None


class JsonlSink:
    """``metrics.jsonl``: one JSON object per logged step, appended across resumes."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", buffering=1)

    def log(self, record: dict) -> None:
        self._f.write(json.dumps(record, sort_keys=True) + "\n")

    def close(self) -> None:
        self._f.close()


class ConsoleSink:
    """A tqdm progress bar (loss, lr, tokens/s; ETA from tqdm) or plain log lines when not a TTY.

    While the bar is up, log records and Python warnings are written through ``tqdm.write`` (tqdm's
    ``logging_redirect_tqdm``), so they land on lines of their own above the bar, never inside it.
    """

    def __init__(self, total_steps: int, start_step: int, progress_bar: bool):
        self.bar = None
        self._redirect = None
        if progress_bar and sys.stderr.isatty():
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
            logging.captureWarnings(True)
            self._redirect = logging_redirect_tqdm(loggers=[logging.getLogger(), logging.getLogger("py.warnings")])
            self._redirect.__enter__()
        self._last = start_step

    def log(self, record: dict) -> None:
        text = f"loss {record['loss']:.4f} lr {record['lr']:.2e} tok/s {record['tokens_per_s']:.0f}"
        if record.get("mfu") is not None:
            text += f" mfu {100 * record['mfu']:.1f}%"
        if self.bar is not None:
            self.bar.update(record["step"] - self._last)
            self.bar.set_postfix_str(text)
            self._last = record["step"]
        else:
            eval_text = f" val_loss {record['val_loss']:.4f}" if "val_loss" in record else ""
            print(f"[{record['stage']}] step {record['step']}/{record['total_steps']} phase {record.get('phase', '-')} "
                  f"{text}{eval_text}", flush=True)

    def close(self) -> None:
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            logging.captureWarnings(False)
            self._redirect = None
        if self.bar is not None:
            self.bar.close()


class WandbSink:
    """wandb, offline unless the user chose a mode: ``WANDB_MODE=online`` with ``logger.project`` set."""

    def __init__(self, run_dir: Path, project: str | None, entity: str | None, config: dict, run_id: str | None):
        import wandb

        os.environ.setdefault("WANDB_MODE", "offline")
        self.run = wandb.init(
            project=project or "tandem", entity=entity, dir=str(run_dir), config=config, id=run_id,
            resume="allow", name=Path(run_dir).name,
        )

    @property
    def run_id(self) -> str:
        return self.run.id

    def log(self, record: dict) -> None:
        self.run.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])

    def close(self) -> None:
        self.run.finish()
