"""Pretraining datasets: weighted blends of indexed sources and a phase schedule, on megatron-core.

    cfg = PretrainDataConfig(
        phases=[Phase("phase1", {"data/web": 0.7, "data/code": 0.3}, fraction=0.94),
                Phase("phase2", {"data/wiki": 0.5, "data/web": 0.2, "data/code": 0.3}, fraction=0.06)],
        seq_length=4096, seed=1234, split="98,2,0", cache_dir="runs/x/data_cache")
    data = build_pretrain_datasets(cfg, tokenizer, train_samples=global_batch * train_steps,
                                   valid_samples=global_batch * eval_iters)
    data.train[i]         # the i-th training sample of the whole run, i = consumed samples
    data.valid["phase2"]  # a validation set per phase mixture

How it is built, and why not two ``BlendedMegatronDatasetBuilder`` runs (one per phase): a separate blend
per phase restarts every source's shuffled epoch, so phase 2 would replay the samples phase 1 already
consumed from a shared source. Instead:

1. every source (a ``.bin``/``.idx`` prefix) gets **one** megatron ``GPTDataset`` for the whole run
   (built through ``BlendedMegatronDatasetBuilder`` with a single-prefix blend, so megatron's split,
   epoch/shuffle indices and index cache are used unchanged);
2. each phase gets its own blending index from megatron's ``helpers.build_blending_indices`` (the
   deterministic error-minimising interleave megatron uses for its ``BlendedDataset``), over only the
   sources active in that phase;
3. per-source sample offsets are carried across the switch: phase 2 continues each source where phase 1
   stopped, so no sample is reused unless a source is genuinely exhausted (then it wraps into its next
   shuffled epoch, as megatron does within a single blend);
4. each ``GPTDataset`` is asked for exactly as many samples as all phases together take from it.

The train dataset is map-style: sample ``i`` depends only on the config, the tokenizer's identifiers,
``train_samples`` and ``i``. Resuming after a restart = rebuilding with the same arguments and reading
from the consumed-sample count (see ``packing.ResumableBatchSampler``). ``fingerprint()`` identifies the
schedule; store it in the checkpoint and compare on resume (a changed ``train_samples`` moves the switch).

Phases switch at a *token* fraction of the run; every training sample has ``seq_length`` tokens, so the
switch sample is ``round(fraction_so_far * train_samples)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class Phase:
    """One stage of the schedule: a blend (prefix → weight) used for ``fraction`` of the training tokens."""

    name: str
    blend: Mapping[str, float]
    fraction: float = 1.0


@dataclass
class PretrainDataConfig:
    """Typed schema of the pretraining data section (Hydra ``data/`` groups fill it).

    ``split``: megatron's "train,valid,test" weights over each source's documents (contiguous ranges).
    ``cache_dir``: where megatron caches its shuffle indices; None → beside each source's data
    (``<dir>/cache/GPTDataset_indices``), which must then be writable.
    ``eod_mask_loss``: zero the loss where the *input* token is EOD — the next document's first token
    is unpredictable from a context that ``seq_idx`` has just reset.
    """

    phases: Sequence[Phase]
    seq_length: int
    seed: int = 1234
    split: str = "98,2,0"
    cache_dir: str | None = None
    eod_mask_loss: bool = True

    def validate(self) -> None:
        if self.seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {self.seq_length}")
        if not self.phases:
            raise ValueError("phases is empty: give at least one Phase(name, {prefix: weight}, fraction)")
        names = [p.name for p in self.phases]
        if len(set(names)) != len(names):
            raise ValueError(f"phase names must be unique, got {names}")
        for p in self.phases:
            if not p.blend:
                raise ValueError(f"phase {p.name!r}: blend is empty; give {{prefix: weight}}")
            for prefix, w in p.blend.items():
                if not isinstance(w, (int, float)) or not np.isfinite(w) or w < 0:
                    raise ValueError(f"phase {p.name!r}: weight of {prefix!r} must be a finite number >= 0, got {w!r}")
            if sum(p.blend.values()) <= 0:
                raise ValueError(f"phase {p.name!r}: all blend weights are zero ({dict(p.blend)}); at least "
                                 f"one source needs a positive weight")
            if not (0 < p.fraction <= 1):
                raise ValueError(f"phase {p.name!r}: fraction must be in (0, 1], got {p.fraction}")
        total = sum(p.fraction for p in self.phases)
        if abs(total - 1) > 1e-6:
            raise ValueError(f"phase fractions must sum to 1 (the whole run), got {total:.6f} from "
                             f"{[(p.name, p.fraction) for p in self.phases]}")


def sources_of(cfg: PretrainDataConfig) -> list[str]:
    """Every prefix with a positive weight in some phase, in order of first appearance."""
    seen: dict[str, None] = {}
    for p in cfg.phases:
        for prefix, w in p.blend.items():
            if w > 0:
                seen.setdefault(prefix, None)
    return list(seen)


def phase_boundaries(cfg: PretrainDataConfig, num_samples: int, align: int = 1) -> list[int]:
    """Sample index where each phase starts, plus ``num_samples`` at the end.

    ``align`` rounds each switch to a multiple of it (pass the global batch size so that no optimizer
    step mixes two phases).
    """
    if align < 1:
        raise ValueError(f"align must be >= 1, got {align}")
    bounds, acc = [0], 0.0
    for p in cfg.phases[:-1]:
        acc += p.fraction
        bounds.append(min(int(round(acc * num_samples / align)) * align, num_samples))
    bounds.append(num_samples)
    return bounds


def blend_schedule(weights_per_phase: Sequence[Sequence[float]], phase_sizes: Sequence[int],
                   start_offsets: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Interleave sources over consecutive phases with megatron's ``build_blending_indices``.

    ``weights_per_phase[p][s]``: weight of source s in phase p (0 = absent). Returns
    ``(source_index[int16], source_sample_index[int64], samples_taken_per_source[int64])`` for the
    concatenated phases: within a phase the interleave is megatron's; across phases, each source's sample
    index continues from where the previous phases left it (``start_offsets`` seeds it, default 0).
    """
    from megatron.core.datasets import helpers

    n_sources = len(weights_per_phase[0])
    taken = np.zeros(n_sources, dtype=np.int64) if start_offsets is None else np.array(start_offsets, dtype=np.int64)
    src_parts, idx_parts = [], []
    for weights, size in zip(weights_per_phase, phase_sizes):
        w = np.asarray(weights, dtype=np.float64)
        active = np.flatnonzero(w > 0)
        # Only the active sources enter the helper: with a zero-weight source at position 0 its
        # arg-max over equal errors can pick that source (ties go to the first index).
        local_w = w[active] / w[active].sum()
        local_src = np.zeros(size, dtype=np.int16)
        local_idx = np.zeros(size, dtype=np.int64)
        if size:
            helpers.build_blending_indices(local_src, local_idx, local_w, len(active), size, False)
        src = active[local_src].astype(np.int16)
        src_parts.append(src)
        idx_parts.append(local_idx + taken[src])
        taken += np.bincount(src, minlength=n_sources)
    return np.concatenate(src_parts), np.concatenate(idx_parts), taken


class PhasedBlendedDataset:
    """Map-style blend over per-source datasets, with a phase schedule. ``len`` = the requested samples.

    ``self[i]`` is the source dataset's sample dict (megatron: ``tokens``, ``labels``, ``loss_mask``,
    ``position_ids`` as torch tensors) plus ``source`` (index into ``prefixes``) and ``phase`` (index).
    """

    def __init__(self, prefixes: list[str], datasets: list[Any], phase_names: list[str], bounds: list[int],
                 source_index: np.ndarray, source_sample_index: np.ndarray, taken: Sequence[int]):
        self.prefixes, self.datasets, self.phase_names, self.bounds = prefixes, datasets, phase_names, bounds
        self.source_index, self.source_sample_index = source_index, source_sample_index
        self.taken = [int(t) for t in taken]  # samples the schedule reads from each source
        for s, ds in enumerate(datasets):  # an internal invariant: sizes were requested from the counts
            assert (ds is None and self.taken[s] == 0) or len(ds) >= self.taken[s], (prefixes[s], self.taken[s])

    def __len__(self) -> int:
        return len(self.source_index)

    def phase_of(self, i: int) -> int:
        return int(np.searchsorted(self.bounds, i, side="right") - 1)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for a schedule of {len(self)} samples")
        s = int(self.source_index[i])
        sample = dict(self.datasets[s][int(self.source_sample_index[i])])
        sample["source"] = s
        sample["phase"] = self.phase_of(i)
        return sample

    def source_shares(self, start: int = 0, stop: int | None = None) -> dict[str, float]:
        """Fraction of samples from each source in ``[start, stop)`` (for logging and tests)."""
        part = self.source_index[start:stop]
        counts = np.bincount(part, minlength=len(self.prefixes))
        return {p: float(c) / max(len(part), 1) for p, c in zip(self.prefixes, counts)}


@dataclass
class PretrainDatasets:
    train: PhasedBlendedDataset
    valid: dict[str, PhasedBlendedDataset] = field(default_factory=dict)  # one per phase; empty if none
    config: PretrainDataConfig | None = None
    train_samples: int = 0
    tokenizer_ids: dict | None = None
    align: int = 1

    def fingerprint(self) -> str:
        """Identifies the training schedule; equal fingerprints ⇒ identical sample order."""
        cfg = self.config
        desc = {
            "phases": [(p.name, sorted(p.blend.items()), p.fraction) for p in cfg.phases],
            "seq_length": cfg.seq_length, "seed": cfg.seed, "split": cfg.split, "eod_mask_loss": cfg.eod_mask_loss,
            "train_samples": self.train_samples, "tokenizer": self.tokenizer_ids, "align": self.align,
        }
        return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def phase_at(self, consumed_samples: int) -> str:
        return self.train.phase_names[self.train.phase_of(min(consumed_samples, len(self.train) - 1))]


def check_prefix(prefix: str) -> None:
    missing = [prefix + ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
    if missing:
        raise FileNotFoundError(f"blend source {prefix!r}: missing {missing} (build it with tandem-preprocess "
                                f"--output-prefix {prefix})")
    if os.path.getsize(prefix + ".bin") == 0:  # megatron's mmap reader fails on it with a bare OSError
        raise ValueError(f"blend source {prefix!r} holds no documents ({prefix}.bin is empty)")


def build_source_dataset(prefix: str, cfg: PretrainDataConfig, tokenizer: Any, train_samples: int | None,
                         valid_samples: int | None, seq_length: int | None = None):
    """One megatron ``GPTDataset`` per split for a single source → ``(train, valid)`` (either may be None).

    A sample count of None builds exactly one epoch of that split.

    Goes through ``BlendedMegatronDatasetBuilder`` with a one-prefix, unweighted blend, which hands back
    the ``GPTDataset`` itself (no ``BlendedDataset`` → none of its cache/rank pitfalls).
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    check_prefix(prefix)
    gcfg = GPTDatasetConfig(
        random_seed=cfg.seed,
        sequence_length=seq_length or cfg.seq_length,
        blend=([prefix], None),
        split=cfg.split,
        tokenizer=tokenizer,
        reset_position_ids=True,
        reset_attention_mask=False,  # masks come from seq_idx; megatron's dense mask costs ~45 ms/sample
        eod_mask_loss=cfg.eod_mask_loss,
        create_attention_mask=False,
        path_to_cache=cfg.cache_dir,
    )
    n_docs = _document_count(prefix)
    if n_docs == 0:
        raise ValueError(f"blend source {prefix!r} holds no documents")
    # megatron builds a dataset for every split with a non-zero weight, and one whose document range is
    # empty never finishes (its epoch loop adds 0 tokens per epoch), so check the ranges first, with the
    # same rounding megatron uses for them.
    for name, bounds in zip(("train", "valid", "test"), gcfg.split_matrix):
        if bounds is not None and int(round(bounds[1] * n_docs)) <= int(round(bounds[0] * n_docs)):
            raise ValueError(f"blend source {prefix!r}: split {cfg.split!r} gives its {n_docs} documents "
                             f"none for {name}; add documents or set that split's weight to 0 "
                             f"(e.g. split '100,0,0')")
    try:
        train, valid, _ = BlendedMegatronDatasetBuilder(
            GPTDataset, [train_samples, valid_samples, 0], lambda: True, gcfg).build()
    except (AssertionError, IndexError, ValueError) as e:
        raise ValueError(f"blend source {prefix!r} ({n_docs} documents, split {cfg.split!r}): megatron could "
                         f"not build the dataset ({type(e).__name__}: {e}); a split with no documents or "
                         f"documents shorter than the sequence length can cause this") from e
    return train, valid


def _document_count(prefix: str) -> int:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return len(IndexedDataset(prefix).document_indices) - 1


def build_pretrain_datasets(cfg: PretrainDataConfig, tokenizer: Any, train_samples: int,
                            valid_samples: int = 0, *, align: int = 1) -> PretrainDatasets:
    """Build the run's training schedule and one validation blend per phase. See the module docstring.

    ``tokenizer``: anything with ``vocab_size``, ``eod``, ``unique_identifiers`` (``tokenizer.Tokenizer``).
    ``train_samples``: samples of ``seq_length`` tokens over the whole run (global batch × steps).
    ``align``: phase switches land on multiples of it (the global batch size: no step mixes phases).
    """
    cfg.validate()
    if train_samples < 1:
        raise ValueError(f"train_samples must be >= 1, got {train_samples}")
    if valid_samples < 0:
        raise ValueError(f"valid_samples must be >= 0, got {valid_samples}")
    prefixes = sources_of(cfg)
    for p in prefixes:
        check_prefix(p)
    weights = [[float(ph.blend.get(p, 0.0)) for p in prefixes] for ph in cfg.phases]
    bounds = phase_boundaries(cfg, train_samples, align)
    sizes = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    for ph, n in zip(cfg.phases, sizes):
        if n == 0:
            raise ValueError(f"phase {ph.name!r} gets 0 of {train_samples} train samples (fraction "
                             f"{ph.fraction}); raise train_samples or its fraction")
    src, idx, taken = _cached_blend_schedule(weights, sizes, cfg.cache_dir)
    # Validation: each phase's mixture over the valid split, each starting at the source's first valid
    # sample (evaluation sets may share samples; training ones may not).
    valid_src, valid_need = {}, np.zeros(len(prefixes), dtype=np.int64)
    if valid_samples:
        for ph, w in zip(cfg.phases, weights):
            vs, vi, vt = blend_schedule([w], [valid_samples])
            valid_src[ph.name] = (vs, vi)
            valid_need = np.maximum(valid_need, vt)
    train_ds, valid_ds = [], []
    for s, prefix in enumerate(prefixes):
        t, v = build_source_dataset(prefix, cfg, tokenizer, int(taken[s]) or 1, int(valid_need[s]))
        if valid_need[s] and v is None:
            raise ValueError(f"blend source {prefix!r}: split {cfg.split!r} leaves no validation documents "
                             f"but valid_samples={valid_samples} were asked for")
        train_ds.append(t)
        valid_ds.append(v)
    names = [p.name for p in cfg.phases]
    train = PhasedBlendedDataset(prefixes, train_ds, names, bounds, src, idx, taken)
    valid = {name: PhasedBlendedDataset(prefixes, valid_ds, [name], [0, valid_samples], vs, vi, valid_need)
             for name, (vs, vi) in valid_src.items()}
    for s, prefix in enumerate(prefixes):
        epoch = _epoch_samples(train_ds[s])
        if epoch and taken[s] > epoch:
            log.warning("source %s: the schedule takes %d samples, %.2f epochs of it (samples repeat)",
                        prefix, taken[s], taken[s] / epoch)
    return PretrainDatasets(train, valid, cfg, train_samples, dict(tokenizer.unique_identifiers), align)


def _cached_blend_schedule(weights: list[list[float]], sizes: list[int], cache_dir: str | None):
    """``blend_schedule`` stored under ``cache_dir`` and memory-mapped, as megatron does for its blends.

    At pretraining scale the two index arrays hold one entry per training sample (25T tokens / 8k =
    3e9 samples → ~30 GB), so they must not live in every rank's memory: rank 0 computes and saves them
    (atomically: temp file + rename), the other ranks wait at a barrier and map the same files.
    Without a ``cache_dir`` they are computed in memory (fine for small runs and tests).
    """
    if cache_dir is None:
        return blend_schedule(weights, sizes)
    import torch

    key = hashlib.md5(json.dumps({"w": weights, "n": sizes, "v": 1}).encode()).hexdigest()
    base = os.path.join(cache_dir, f"tandem_blend_{key}")
    files = {k: f"{base}_{k}.npy" for k in ("source", "sample")}
    taken_file = f"{base}_taken.json"
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not dist or torch.distributed.get_rank() == 0:
        if not all(os.path.isfile(f) for f in [*files.values(), taken_file]):
            src, idx, taken = blend_schedule(weights, sizes)
            os.makedirs(cache_dir, exist_ok=True)
            for name, arr in (("source", src), ("sample", idx)):
                tmp = f"{files[name]}.tmp{os.getpid()}.npy"
                np.save(tmp, arr)
                os.replace(tmp, files[name])
            tmp = f"{taken_file}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump([int(t) for t in taken], f)
            os.replace(tmp, taken_file)  # written last: its presence marks a complete entry
    if dist:
        torch.distributed.barrier()
    with open(taken_file) as f:
        taken = np.array(json.load(f), dtype=np.int64)
    return np.load(files["source"], mmap_mode="r"), np.load(files["sample"], mmap_mode="r"), taken


def _epoch_samples(ds) -> int | None:
    """Samples in one epoch of a GPTDataset (tokens of its documents // seq_length), for logging."""
    try:
        tokens = int(ds.dataset.sequence_lengths[ds.indices].sum())
        return max((tokens - 1) // ds.config.sequence_length, 1)
    except Exception:  # logging only; GPTDataset internals may move between megatron versions
        return None


_CONFIG_KEYS = {"phases", "seq_length", "seed", "split", "cache_dir", "eod_mask_loss"}
_PHASE_KEYS = {"name", "blend", "fraction"}


def config_from_dict(d: Mapping[str, Any]) -> PretrainDataConfig:
    """A ``PretrainDataConfig`` from plain data (a Hydra/OmegaConf node or a dict), validated.

    ``phases``: a list of ``{name, fraction, blend}``; ``blend`` is either ``{prefix: weight}`` or a list
    of ``{prefix, weight}`` (the list form keeps paths with dots or slashes out of YAML keys). A single
    blend without phases may be given as top-level ``blend`` (one phase named ``"main"``).
    """
    d = _plain(d)
    if not isinstance(d, dict):
        raise ValueError(f"data config must be a mapping, got {type(d).__name__}")
    extra = set(d) - _CONFIG_KEYS - {"blend"}
    if extra:
        raise ValueError(f"unknown data config key(s) {sorted(extra)}; expected {sorted(_CONFIG_KEYS | {'blend'})}")
    if "blend" in d:
        if "phases" in d:
            raise ValueError("give either 'blend' (one phase) or 'phases', not both")
        d["phases"] = [{"name": "main", "blend": d.pop("blend"), "fraction": 1.0}]
    if "seq_length" not in d:
        raise ValueError("data config needs 'seq_length'")
    phases = []
    for i, p in enumerate(d.get("phases") or []):
        if not isinstance(p, dict):
            raise ValueError(f"phases[{i}] must be a mapping with name/blend/fraction, got {p!r}")
        extra = set(p) - _PHASE_KEYS
        if extra or "blend" not in p:
            raise ValueError(f"phases[{i}]: expected keys {sorted(_PHASE_KEYS)} (blend required), got {sorted(p)}")
        phases.append(Phase(str(p.get("name", f"phase{i + 1}")), _blend(p["blend"], f"phases[{i}].blend"),
                            float(p.get("fraction", 1.0))))
    cfg = PretrainDataConfig(phases=phases, **{k: v for k, v in d.items() if k != "phases"})
    cfg.validate()
    return cfg


def _blend(b: Any, where: str) -> dict[str, float]:
    if isinstance(b, dict):
        return {str(k): float(v) for k, v in b.items()}
    if isinstance(b, list):
        out: dict[str, float] = {}
        for j, item in enumerate(b):
            if not isinstance(item, dict) or set(item) != {"prefix", "weight"}:
                raise ValueError(f"{where}[{j}] must be {{prefix: ..., weight: ...}}, got {item!r}")
            if item["prefix"] in out:
                raise ValueError(f"{where}: prefix {item['prefix']!r} listed twice")
            out[str(item["prefix"])] = float(item["weight"])
        return out
    raise ValueError(f"{where} must be {{prefix: weight}} or a list of {{prefix, weight}}, got {type(b).__name__}")


def _plain(d: Any) -> Any:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(d, (DictConfig, ListConfig)):
            return OmegaConf.to_container(d, resolve=True)
    except ImportError:  # omegaconf is a dependency, but plain dicts need nothing from it
        pass
    return json.loads(json.dumps(d, default=str)) if isinstance(d, (dict, list)) else d
