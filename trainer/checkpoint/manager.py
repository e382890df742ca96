"""Run checkpoints: atomic, with a ``latest`` pointer written last, keep-last-N, exact resume.

Layout under ``<run dir>/checkpoints/``::

    step_00000100/
        model/                 HF/NemotronH layout (config.json + safetensors) and the run's tokenizer files
                               (tokenizer.json, tokenizer_config.json with the chat template): loadable on its own
        optimizer.pt           gathered engines (ddp, zero): optimizer state keyed by parameter name, expert
                               tensors unsharded (loads at any EP size; read with weights_only=True)
        dcp/                   sharded engines (fsdp) instead: model + optimizer tensors, every rank's own
                               pieces under global names and shapes (torch.distributed.checkpoint; .sharded)
        optimizer_groups.json  ... with the optimizer's parameter groups (hyper-parameters, names)
        rng/rank_00000.pt      torch CPU/CUDA and Python RNG states of each rank
        stage/rank_00000.pt    a stage's per-rank state, where it has one (GRPO: a rollout batch in flight)
        trainer_state.json     step, tokens, stage name and data position, NaN counters, logger ids
    latest                     text file naming the newest complete checkpoint

A checkpoint is assembled in a hidden temporary directory and renamed into place only when complete (every
rank's files written: a sharded save is collective, an asynchronous one is committed when it finishes);
``latest`` is then replaced atomically. A process killed at any moment leaves ``latest`` naming a
complete checkpoint (tested with SIGKILL at random moments).
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import re
import shutil
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

from tandem.model.checkpoint import CheckpointError, load_checkpoint_into, save_state_dict
from tandem.model.checkpoint_io import read_json

from . import sharded
from .hf_writer import write_released_layout
from .tokenizer_files import write_tokenizer


__all__ = ["CheckpointManager", "exchange_paths", "load_torch_file", "load_weights", "replace_dir",
           "resolve_checkpoint", "rng_state", "set_rng_state", "weights_dir"]

_STEP_DIR = re.compile(r"^step_(\d{8})$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_version": random.getstate()[0],
             "python_gauss": random.getstate()[2]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_torch_file(path: Path):
    """``torch.load(path, weights_only=True)``; a truncated or corrupt file is a :class:`CheckpointError`."""
    try:
        return torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing from the checkpoint") from None
    except Exception as e:  # torch raises RuntimeError, EOFError or UnpicklingError depending on the damage
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable torch file, possibly truncated or corrupt ({first})") from None


def exchange_paths(a: Path, b: Path) -> bool:
    """Atomically swap two directory entries (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported.

    Python's ``os`` module has no binding for it; libc's is called through ctypes. File systems without
    the flag (and non-Linux systems) answer False and the caller falls back to two renames.
    """
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def replace_dir(new: Path, final: Path) -> None:
    """Put directory ``new`` at ``final``, replacing what is there, never leaving ``final`` absent where the
    file system can swap atomically; elsewhere the old copy waits as ``.<name>.old-*`` until the new one is
    in place, and :meth:`CheckpointManager.latest` moves it back if a kill fell between the two renames."""
    if not final.exists():
        os.replace(new, final)
        return
    if exchange_paths(new, final):  # final is now the new checkpoint, ``new`` holds the old one
        shutil.rmtree(new)
        return
    old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old)


class CheckpointManager:
    def __init__(self, run_dir: Path, keep_last: int, rank: int = 0, world_size: int = 1, async_save: bool = False):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.rank, self.world_size = rank, world_size
        self.async_save = async_save  # sharded checkpoints only: saves with blocking=False write in the background
        self._written: dict[str, str] = {}  # step dir → trainer_state JSON, for steps saved by this process
        self._pending = None  # (future, tmp dir, final dir, name, trainer_state JSON) of an in-flight async save
        self._gloo = None
        #: the run's tokenizer (tandem.data_pipelines.tokenizer.Tokenizer): its files go into every model/
        self.tokenizer = None

    @property
    def latest_file(self) -> Path:
        return self.root / "latest"

    def latest(self) -> Path | None:
        if not self.latest_file.exists():
            return None
        name = self.latest_file.read_text().strip()
        path = self.root / name
        if _STEP_DIR.match(name) and not path.exists():
            # killed between the two renames of a replacement on a file system without atomic exchange
            for old in sorted(self.root.glob(f".{name}.old-*")):
                if (old / "trainer_state.json").exists():
                    os.replace(old, path)
                    break
        if not _STEP_DIR.match(name) or not (path / "trainer_state.json").exists():
            raise CheckpointError(f"{self.latest_file}: names {name!r}, which is not a complete checkpoint")
        return path

    def save(self, step: int, engine, config, trainer_state: dict, *, blocking: bool = True,
             rank_state: dict | None = None) -> Path:
        """Write checkpoint ``step`` (collective: every rank calls it) and make it ``latest``.

        A gathered engine provides the whole model state and by-name optimizer state and rank 0 writes them;
        an engine with ``sharded_checkpoints`` provides this rank's pieces and every rank writes its own
        (``model/`` in the released layout and ``dcp/``, see :mod:`.sharded`). With ``blocking=False`` and
        ``async_save`` a sharded save returns once its pieces are staged in host memory; the files are
        written in the background and the checkpoint becomes ``latest`` at the next :meth:`save` or
        :meth:`wait` (an in-flight save is never ``latest``: a crash leaves the previous one).
        """
        self.wait()
        name = f"step_{step:08d}"
        final = self.root / name
        state_json = json.dumps(trainer_state, indent=2, sort_keys=True) + "\n"
        if name in self._written:
            # The same step again in this process (preempted right after a periodic save): nothing trained
            # since, so the weights, optimizer and RNG files on disk are this state. Deleting and rewriting
            # them would open a window in which ``latest`` names a half-deleted checkpoint.
            if self.rank == 0:
                if self._written[name] != state_json:
                    _write_atomic(final / "trainer_state.json", state_json)
                _write_atomic(self.latest_file, name + "\n")
            self._written[name] = state_json
            self._barrier()
            return final
        tmp_name = [f".{name}.tmp-{uuid.uuid4().hex[:8]}"]
        if self.world_size > 1:
            dist.broadcast_object_list(tmp_name, src=0)
        tmp = self.root / tmp_name[0]
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
        self._barrier()
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save(rng_state(), tmp / "rng" / f"rank_{self.rank:05d}.pt")
        if rank_state is not None:
            (tmp / "stage").mkdir(exist_ok=True)
            torch.save(rank_state, tmp / "stage" / f"rank_{self.rank:05d}.pt")
        if getattr(engine, "sharded_checkpoints", False):
            state = engine.sharded_state_dict()
            write_released_layout(state["model"], config, tmp / "model", rank=self.rank, barrier=self._barrier)
            if self.rank == 0:
                write_tokenizer(self.tokenizer, tmp / "model")
                (tmp / "trainer_state.json").write_text(state_json)
            if not blocking and self.async_save:
                future = sharded.async_save(state, tmp, rank=self.rank, process_group=self._async_group())
                self._pending = (future, tmp, final, name, state_json)
                return final
            sharded.save(state, tmp, rank=self.rank)
        else:
            full = engine.full_state_dict()
            opt_state = engine.optimizer_state()
            if self.rank == 0:
                save_state_dict(full, config, tmp / "model")
                write_tokenizer(self.tokenizer, tmp / "model")
                torch.save(opt_state, tmp / "optimizer.pt")
                (tmp / "trainer_state.json").write_text(state_json)
        self._commit(tmp, final, name, state_json)
        return final

    def wait(self) -> None:
        """Finish an asynchronous save still in flight and make it ``latest`` (collective; no-op if none)."""
        if self._pending is None:
            return
        future, tmp, final, name, state_json = self._pending
        self._pending = None
        future.result()  # this rank's files written (DCP's finish step has gathered every rank's results)
        self._commit(tmp, final, name, state_json)

    def _async_group(self):
        """A gloo group of its own for the background writer's collectives (created once; collective)."""
        if self._gloo is None and dist.is_initialized():
            self._gloo = dist.new_group(backend="gloo")
        return self._gloo

    def _commit(self, tmp: Path, final: Path, name: str, state_json: str) -> None:
        """Every rank's files are in ``tmp``: rename it to ``final``, then point ``latest`` at it (collective)."""
        self._barrier()
        if self.rank == 0:
            for f in tmp.rglob("*"):
                if f.is_file():  # (sharded pieces were fsynced by the rank that wrote them; this is cheap again)
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
            replace_dir(tmp, final)  # final exists when a run resumed from an earlier step reaches it again
            _fsync_dir(self.root)
            _write_atomic(self.latest_file, name + "\n")
            self._prune(keep=final)
        self._written[name] = state_json
        self._barrier()

    def _prune(self, keep: Path) -> None:
        steps = sorted(p for p in self.root.iterdir() if _STEP_DIR.match(p.name))
        for p in steps[: max(0, len(steps) - self.keep_last)]:
            if p != keep:
                shutil.rmtree(p, ignore_errors=True)
        for p in self.root.glob(".step_*.tmp-*"):  # leftovers of saves that were killed
            shutil.rmtree(p, ignore_errors=True)
        for p in self.root.glob(".step_*.old-*"):  # a replaced copy whose successor is in place
            if (self.root / p.name[1:].split(".old-")[0]).exists():
                shutil.rmtree(p, ignore_errors=True)
        for p in self.root.glob(".latest.tmp-*"):  # a pointer update killed before its rename
            p.unlink(missing_ok=True)

    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def load(self, path: Path, model, *, sharded_engine: bool = False, pieces=None) -> tuple[dict, dict | None]:
        """Restore the weights (this rank's expert shard) and this rank's RNG.

        Returns ``(trainer_state, optimizer_state)``; the engine loads the by-name optimizer state once it
        exists (DeepSpeed partitions it at initialisation). For an engine with ``sharded_checkpoints``
        (``sharded_engine``) and a sharded checkpoint, nothing but the trainer state and RNG is read here and
        ``optimizer_state`` is None: weights and optimizer come from :meth:`load_sharded` once the engine
        exists, each rank reading only its pieces. Any engine resumes any checkpoint: a gathered engine
        reads a sharded one's ``model/`` and whole optimizer tensors, a sharded engine a gathered one's
        ``model/`` and ``optimizer.pt``.
        """
        path = Path(path)
        state_file = path / "trainer_state.json"
        if not state_file.exists():
            raise CheckpointError(f"{path}: not a tandem run checkpoint (no trainer_state.json)")
        trainer_state = read_json(state_file)
        if not isinstance(trainer_state, dict):
            raise CheckpointError(f"{state_file}: expected a JSON object, got {type(trainer_state).__name__}")
        is_sharded = (path / sharded.DCP_DIR).exists()
        optimizer_state = None
        if not (sharded_engine and is_sharded):
            _load_into(model, path / "model", pieces)
            optimizer_state = sharded.read_whole_optimizer(path) if is_sharded else load_torch_file(path / "optimizer.pt")
        rng_file = path / "rng" / f"rank_{self.rank:05d}.pt"
        if rng_file.exists():
            rng = load_torch_file(rng_file)
            try:
                set_rng_state(rng)
            except (KeyError, TypeError, ValueError, RuntimeError) as e:
                raise CheckpointError(f"{rng_file}: not an RNG state of this checkpoint layout ({e})") from None
        return trainer_state, optimizer_state

    def load_rank_state(self, path: Path) -> dict | None:
        """This rank's ``stage/rank_NNNNN.pt`` of checkpoint ``path`` (None when it has none)."""
        f = Path(path) / "stage" / f"rank_{self.rank:05d}.pt"
        return load_torch_file(f) if f.exists() else None

    def load_sharded(self, path: Path, engine) -> None:
        """Weights and optimizer state of the sharded checkpoint ``path`` into a sharded engine (collective):
        each rank reads the pieces it holds at the current layout."""
        engine.load_sharded_state_dict(sharded.load(engine.sharded_state_dict(), Path(path)), path)


def resolve_checkpoint(path: str | Path) -> Path:
    """A run dir, its checkpoints/ dir, or a step dir → the step dir (via ``latest``)."""
    path = Path(path)
    for candidate in (path, path / "checkpoints"):
        if (candidate / "trainer_state.json").exists():
            return candidate
        if (candidate / "latest").exists():
            return CheckpointManager(candidate.parent if candidate.name == "checkpoints" else candidate, 1).latest()
    raise CheckpointError(f"{path}: no tandem checkpoint here (expected trainer_state.json or a 'latest' pointer)")


def weights_dir(source: str | Path) -> Path:
    """The HF-layout weights folder of ``source``: a released/HF directory itself, or a tandem run
    (run dir, checkpoints/ dir or step dir) → its latest step's ``model/``."""
    source = Path(source)
    if (source / "config.json").exists():
        return source
    if not source.exists():
        raise CheckpointError(f"{source}: no such checkpoint directory")
    return resolve_checkpoint(source) / "model"


def load_weights(model, source: str | Path, *, pieces=None) -> Path:
    """Initial weights for a new stage: a released/HF-layout directory or a tandem run checkpoint.
    ``pieces``: see :func:`tandem.model.checkpoint.load_checkpoint_into` (an FSDP2-sharded model)."""
    folder = weights_dir(source)
    _load_into(model, folder, pieces)
    return folder


def _load_into(model, folder: Path, pieces=None) -> None:
    """Weights into ``model``; with ``pieces`` (a sharded model: ``parallel.fsdp.local_pieces``) each rank
    reads only its pieces of each tensor."""
    with torch.no_grad():
        load_checkpoint_into(model, folder, pieces=pieces)
