"""Pretraining datasets: weighted blends of sources and a phase schedule, on megatron-core.

    cfg = PretrainDataConfig(
        phases=[Phase("phase1", {"data/web": 0.7, "data/code": 0.3}, fraction=0.94),
                Phase("phase2", {"data/wiki": 0.5, "data/web": 0.2, "data/code": 0.3}, fraction=0.06)],
        seq_length=4096, seed=1234, split="98,2,0", cache_dir="runs/x/data_cache")
    data = build_pretrain_datasets(cfg, tokenizer, train_samples=global_batch * train_steps,
                                   valid_samples=global_batch * eval_iters)
    data.train[i]         # the i-th training sample of the whole run, i = consumed samples
    data.valid["phase2"]  # a validation set per phase mixture

Blend keys are source specs (:mod:`tandem.data_pipelines.sources`): a ``tandem-preprocess`` prefix
(``indexed:`` optional), or the byte-level ``synthetic:<kind>`` / ``text:<file>`` of smoke runs and tests.

How it is built, and why not two ``BlendedMegatronDatasetBuilder`` runs (one per phase): a separate blend
per phase restarts every source's shuffled epoch, so phase 2 would replay the samples phase 1 already
consumed from a shared source. Instead:

1. every source gets **one** dataset for the whole run — for a prefix, megatron's ``GPTDataset`` (built
   through ``BlendedMegatronDatasetBuilder`` with a single-prefix blend, so megatron's split, multi-epoch
   shuffle, index cache and loss mask are used unchanged);
2. each phase gets its own blending index from megatron's ``helpers.build_blending_indices`` (the
   deterministic error-minimising interleave megatron uses for its ``BlendedDataset``), over only the
   sources active in that phase;
3. per-source sample offsets are carried across the switch: phase 2 continues each source where phase 1
   stopped, so no sample is reused unless a source is genuinely exhausted (then it runs into its next
   epoch, which megatron shuffles anew);
4. each dataset is asked for exactly as many samples as all phases together take from it.

The train dataset is map-style: sample ``i`` depends only on the config, the tokenizer's identifiers,
``train_samples``, ``extensions`` and ``i``. Resuming after a restart = rebuilding with the same arguments
and reading from the consumed-sample count (see ``packing.ResumableBatchSampler``). ``fingerprint()``
identifies the schedule.

Phases switch at a *token* fraction of the run; every training sample has ``seq_length`` tokens, so the
switch sample is ``round(fraction_so_far * train_samples)`` (a multiple of ``align``).

Extending a run (``extensions``): the run planned for N samples was resumed at sample R with a new total
N'. Samples before R keep the old plan; from R on the phases are re-planned over N' — a switch that lies
after R moves to its fraction of N', a switch already passed stays where it happened (a phase never
restarts), and each source continues from the samples it had given. A source's megatron order depends
on how many epochs of it the plan needs, so one that the longer plan takes into an extra epoch is
reshuffled as a whole (samples may then repeat earlier than in the original plan); within the epochs
already planned, the order is unchanged.
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
    ``cache_dir``: where megatron's shuffle indices and this module's blend indices are cached; None →
    megatron's default beside each source's data (``<dir>/cache/GPTDataset_indices``), which must then be
    writable (the trainer always gives one: ``data.cache_dir``, default ``<run.dir>/data_cache``).
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
        from .sources import parse_spec

        for p in self.phases:
            if not p.blend:
                raise ValueError(f"phase {p.name!r}: blend is empty; give {{prefix: weight}}")
            for spec in p.blend:
                try:
                    parse_spec(spec)
                except ValueError as e:
                    raise ValueError(f"phase {p.name!r}: {e}") from None
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
    """Every source spec with a positive weight in some phase, in order of first appearance."""
    seen: dict[str, None] = {}
    for p in cfg.phases:
        for spec, w in p.blend.items():
            if w > 0:
                seen.setdefault(spec, None)
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


def plan_phases(cfg: PretrainDataConfig, train_samples: int, align: int = 1,
                extensions: Sequence[tuple[int, int]] = ()) -> tuple[list[int], list[tuple[int, int, int]]]:
    """Phase bounds of a run and its segments ``(phase, start, stop)``, each one interleave.

    ``extensions``: ``[(resume_sample, previous_total), ...]`` oldest first — the run was planned for
    ``previous_total`` samples and re-planned at ``resume_sample`` (see the module docstring); the last
    plan is for ``train_samples``. Without extensions there is one segment per phase.
    """
    totals = [n for _, n in extensions] + [train_samples]
    bounds = phase_boundaries(cfg, totals[0], align)
    cuts = [0]
    for (at, _), total in zip(extensions, totals[1:]):
        if not 0 <= at <= min(bounds[-1], total):
            raise ValueError(f"extension at sample {at} lies outside the plan of {bounds[-1]} samples")
        # the phase of the last sample served; one starting exactly at ``at`` has not started yet
        current = int(np.searchsorted(bounds, at - 1, side="right") - 1) if at > 0 else 0
        fresh = phase_boundaries(cfg, total, align)
        new = bounds[: current + 1]
        for q in range(current + 1, len(cfg.phases)):
            new.append(min(max(fresh[q], at, new[-1]), total))
        bounds = new + [total]
        cuts.append(at)
    cuts.append(train_samples)
    segments = []
    for q in range(len(cfg.phases)):
        edges = sorted({bounds[q], bounds[q + 1], *(c for c in cuts if bounds[q] < c < bounds[q + 1])})
        segments += [(q, a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]
    return bounds, segments


def blending_indices_numpy(weights: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """megatron's ``helpers.build_blending_indices`` in Python, operation for operation (tested equal).

    Used only for runs whose sources are all byte-level (smoke runs, tests), which thus never import
    megatron-core: its package import costs ~6 s per process on the 2-core test machines. O(size ×
    sources) in the interpreter: fine for those sizes, not for pretraining-scale schedules."""
    n = len(weights)
    w = [float(x) for x in weights]
    counts = [0] * n
    src = np.empty(size, dtype=np.int16)
    idx = np.empty(size, dtype=np.int64)
    for i in range(size):
        x = max(float(i), 1.0)
        best, best_err = 0, w[0] * x - counts[0]
        for d in range(1, n):
            err = w[d] * x - counts[d]
            if err > best_err:
                best, best_err = d, err
        src[i], idx[i] = best, counts[best]
        counts[best] += 1
    return src, idx


def blend_schedule(weights_per_phase: Sequence[Sequence[float]], phase_sizes: Sequence[int],
                   start_offsets: Sequence[int] | None = None, *,
                   megatron: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Interleave sources over consecutive phases with megatron's ``build_blending_indices``.

    ``weights_per_phase[p][s]``: weight of source s in phase p (0 = absent). Returns
    ``(source_index[int16], source_sample_index[int64], samples_taken_per_source[int64])`` for the
    concatenated phases: within a phase the interleave is megatron's; across phases, each source's sample
    index continues from where the previous phases left it (``start_offsets`` seeds it, default 0).
    ``megatron=False``: the same interleave from :func:`blending_indices_numpy` (byte-level runs).
    """
    n_sources = len(weights_per_phase[0])
    taken = np.zeros(n_sources, dtype=np.int64) if start_offsets is None else np.array(start_offsets, dtype=np.int64)
    src_parts, idx_parts = [], []
    for weights, size in zip(weights_per_phase, phase_sizes):
        w = np.asarray(weights, dtype=np.float64)
        active = np.flatnonzero(w > 0)
        # Only the active sources enter the helper: with a zero-weight source at position 0 its
        # arg-max over equal errors can pick that source (ties go to the first index).
        local_w = w[active] / w[active].sum()
        if megatron:
            from megatron.core.datasets import helpers

            local_src = np.zeros(size, dtype=np.int16)
            local_idx = np.zeros(size, dtype=np.int64)
            if size:
                helpers.build_blending_indices(local_src, local_idx, local_w, len(active), size, False)
        else:
            local_src, local_idx = blending_indices_numpy(local_w, size)
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
    extensions: list = field(default_factory=list)

    def fingerprint(self) -> str:
        """Identifies the training schedule; equal fingerprints ⇒ identical sample order."""
        cfg = self.config
        desc = {
            "phases": [(p.name, sorted(p.blend.items()), p.fraction) for p in cfg.phases],
            "seq_length": cfg.seq_length, "seed": cfg.seed, "split": cfg.split, "eod_mask_loss": cfg.eod_mask_loss,
            "train_samples": self.train_samples, "tokenizer": self.tokenizer_ids, "align": self.align,
        }
        if self.extensions:
            desc["extensions"] = [list(e) for e in self.extensions]
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


def check_sources(cfg: PretrainDataConfig, tokenizer: Any) -> None:
    """Everything about the sources that can fail before building, cheaply (files, document counts,
    splits, the tokenizer they were made with), so a bad input fails before any index is written."""
    cfg.validate()
    for spec in sources_of(cfg):
        check_source(spec, cfg, tokenizer)


def check_source(spec: str, cfg: PretrainDataConfig, tokenizer: Any) -> None:
    """:func:`check_sources` for one source. Byte-level sources need :data:`sources.BYTE_TOKENIZER` and
    indexed ones a real tokenizer: the two kinds cannot share a run (their ids mean different things)."""
    from .sources import BYTE_TOKENIZER, check_byte_source, is_byte_level, parse_spec

    byte_tok = tokenizer.unique_identifiers == BYTE_TOKENIZER.unique_identifiers
    if is_byte_level(spec):
        if not byte_tok:
            raise ValueError(f"blend source {spec!r} is byte-level (ids = bytes + 3) and cannot be blended "
                             f"with data tokenised by {getattr(tokenizer, 'source', tokenizer)}")
        check_byte_source(spec, cfg.split)
        return
    prefix = parse_spec(spec)[1]
    if byte_tok:
        raise ValueError(f"blend source {prefix!r} is tokenised data and cannot be blended with the byte-level "
                         f"synthetic:/text: sources")
    check_prefix(prefix)
    made_with = _manifest_tokenizer(prefix)
    if made_with is not None and made_with != tokenizer.unique_identifiers:
        raise ValueError(f"blend source {prefix!r} was tokenised with another tokenizer ({prefix}.json records "
                         f"{made_with}) than this run's {getattr(tokenizer, 'source', '')} "
                         f"({tokenizer.unique_identifiers}); give the tokenizer it was made with")
    _check_documents(prefix, cfg.split)


def _check_documents(prefix: str, split: str) -> int:
    """The source's document count, refusing none at all or a split left with none."""
    from .sources import split_ranges

    n_docs = _document_count(prefix)
    if n_docs == 0:
        raise ValueError(f"blend source {prefix!r} holds no documents")
    # megatron builds a dataset for every split with a non-zero weight, and one whose document range is
    # empty never finishes (its epoch loop adds 0 tokens per epoch), so check the ranges first, rounded
    # as megatron rounds them.
    for name, r in zip(("train", "valid", "test"), split_ranges(split, n_docs)):
        if r is not None and r[1] <= r[0]:
            raise ValueError(f"blend source {prefix!r}: split {split!r} gives its {n_docs} documents none "
                             f"for {name}; add documents or set that split's weight to 0 (e.g. split '100,0,0')")
    return n_docs


def _manifest_tokenizer(prefix: str) -> dict | None:
    from .preprocess import read_manifest

    m = read_manifest(prefix)
    return None if m is None else m.get("settings", {}).get("tokenizer")


def build_source_dataset(spec: str, cfg: PretrainDataConfig, tokenizer: Any, train_samples: int | None,
                         valid_samples: int | None, seq_length: int | None = None):
    """One dataset per split for a single source → ``(train, valid)`` (either may be None).

    A sample count of None builds exactly one epoch of that split (indexed sources). Indexed sources go
    through ``BlendedMegatronDatasetBuilder`` with a one-prefix, unweighted blend, which hands back the
    ``GPTDataset`` itself (no ``BlendedDataset`` → none of its cache/rank pitfalls); byte-level ones are
    :func:`sources.build_byte_dataset` adapters.
    """
    from .sources import build_byte_dataset, is_byte_level, parse_spec

    if is_byte_level(spec):
        return build_byte_dataset(spec, seed=cfg.seed, split=cfg.split, seq_length=seq_length or cfg.seq_length,
                                  eod_mask_loss=cfg.eod_mask_loss, num_train=train_samples or 0,
                                  num_valid=valid_samples or 0)
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    prefix = parse_spec(spec)[1]
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
    n_docs = _check_documents(prefix, cfg.split)
    try:
        train, valid, _ = BlendedMegatronDatasetBuilder(
            GPTDataset, [train_samples, valid_samples, 0], lambda: True, gcfg).build()
    except (AssertionError, IndexError, ValueError) as e:
        raise ValueError(f"blend source {prefix!r} ({n_docs} documents, split {cfg.split!r}): megatron could "
                         f"not build the dataset ({type(e).__name__}: {e}); a split with no documents or "
                         f"documents shorter than the sequence length can cause this") from e
    return train, valid


def _document_count(prefix: str) -> int:
    from .preprocess import read_manifest

    m = read_manifest(prefix)
    if m is not None and isinstance(m.get("documents"), int):
        return m["documents"]  # no need to open the index (nor import megatron) to count
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return len(IndexedDataset(prefix).document_indices) - 1


def build_pretrain_datasets(cfg: PretrainDataConfig, tokenizer: Any, train_samples: int,
                            valid_samples: int = 0, *, align: int = 1,
                            extensions: Sequence[tuple[int, int]] = (),
                            allow_empty_phases: bool = False) -> PretrainDatasets:
    """Build the run's training schedule and one validation blend per phase. See the module docstring.

    ``tokenizer``: anything with ``vocab_size``, ``eod``, ``unique_identifiers`` (``tokenizer.Tokenizer``,
    or ``sources.BYTE_TOKENIZER`` for byte-level sources).
    ``train_samples``: samples of ``seq_length`` tokens over the whole run (global batch × steps).
    ``align``: phase switches land on multiples of it (the global batch size: no step mixes phases).
    ``extensions``: ``[(resume_sample, previous_total), ...]`` of a run extended on resume.
    ``allow_empty_phases``: a phase whose fraction rounds to 0 samples is skipped (with a warning) instead
    of refused — a run too short to reach its last phase (the trainer's short smoke runs).
    **Collective** under torch.distributed: every rank must call it with the same arguments (rank 0
    writes the index caches, the others wait at megatron's and this module's barriers, then read them).
    """
    from .sources import is_byte_level

    cfg.validate()
    if train_samples < 1:
        raise ValueError(f"train_samples must be >= 1, got {train_samples}")
    if valid_samples < 0:
        raise ValueError(f"valid_samples must be >= 0, got {valid_samples}")
    prefixes = sources_of(cfg)
    check_sources(cfg, tokenizer)
    megatron = not all(is_byte_level(p) for p in prefixes)
    weights = [[float(ph.blend.get(p, 0.0)) for p in prefixes] for ph in cfg.phases]
    bounds, segments = plan_phases(cfg, train_samples, align, extensions)
    for ph, a, b in zip(cfg.phases, bounds[:-1], bounds[1:]):
        if b == a and not extensions:
            if allow_empty_phases:
                log.warning("phase %r gets 0 of %d train samples (fraction %s): skipped", ph.name, train_samples,
                            ph.fraction)
                continue
            raise ValueError(f"phase {ph.name!r} gets 0 of {train_samples} train samples (fraction "
                                 f"{ph.fraction}); raise train_samples or its fraction")
    src, idx, taken = _cached_blend_schedule([weights[q] for q, _, _ in segments], [b - a for _, a, b in segments],
                                             cfg.cache_dir, megatron)
    # Validation: each phase's mixture over the valid split, each starting at the source's first valid
    # sample (evaluation sets may share samples; training ones may not).
    valid_src, valid_need = {}, np.zeros(len(prefixes), dtype=np.int64)
    if valid_samples:
        for ph, w in zip(cfg.phases, weights):
            vs, vi, vt = blend_schedule([w], [valid_samples], megatron=megatron)
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
            log.warning("source %s: the schedule takes %d samples, %.2f epochs of it (samples repeat, "
                        "each epoch in a new order)", prefix, taken[s], taken[s] / epoch)
    return PretrainDatasets(train, valid, cfg, train_samples, dict(tokenizer.unique_identifiers), align,
                            [tuple(e) for e in extensions])


def _cached_blend_schedule(weights: list[list[float]], sizes: list[int], cache_dir: str | None,
                           megatron: bool = True):
    """``blend_schedule`` stored under ``cache_dir`` and memory-mapped, as megatron does for its blends.

    At pretraining scale the two index arrays hold one entry per training sample (25T tokens / 8k =
    3e9 samples → ~30 GB), so they must not live in every rank's memory: rank 0 computes and saves them
    (atomically: temp file + rename), the other ranks wait at a barrier and map the same files.
    Without a ``cache_dir`` they are computed in memory (fine for small runs and tests).
    """
    if cache_dir is None:
        return blend_schedule(weights, sizes, megatron=megatron)
    import torch

    key = hashlib.md5(json.dumps({"w": weights, "n": sizes, "v": 1}).encode()).hexdigest()
    base = os.path.join(cache_dir, f"tandem_blend_{key}")
    files = {k: f"{base}_{k}.npy" for k in ("source", "sample")}
    taken_file = f"{base}_taken.json"
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not dist or torch.distributed.get_rank() == 0:
        if not all(os.path.isfile(f) for f in [*files.values(), taken_file]):
            src, idx, taken = blend_schedule(weights, sizes, megatron=megatron)
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
    """Samples in one epoch of a source dataset, for logging (None: unbounded or unknown)."""
    per_epoch = getattr(ds, "per_epoch", None)  # sources.TextDataset
    if per_epoch is not None:
        return per_epoch
    try:  # megatron GPTDataset: tokens of its documents // seq_length
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
