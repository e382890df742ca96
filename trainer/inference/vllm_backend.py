"""The ``vllm`` rollout back-end: a vLLM engine colocated with the trainer on its GPU, refitted each step.

**Status: written against the vLLM 0.12 Python API (V1 engine: ``vllm.LLM``, ``SamplingParams`` with
``logprobs`` / ``seed`` / ``stop_token_ids``, ``LLM.collective_rpc``, ``LLM.sleep`` / ``wake_up(tags=...)``,
the ``logprobs_mode`` engine argument), and NOT run on hardware yet** — no machine this project is tested on
has vLLM and CUDA. ``tests/trainer/test_rollout_backends.py::test_vllm_backend_on_gpu`` runs this path
against the in-process engine where both exist and skips with its reason elsewhere; the mapping functions
below (sampling parameters, outputs, weight streaming) are pure and unit-tested on CPU.

How it runs (the colocated pattern of NeMo-RL's and verl's vLLM workers, written here for tandem):

1. **Build** (once, in ``GRPOStage.bind``): ``vllm.LLM`` over a folder holding only the run's
   ``config.json`` (:meth:`HybridConfig.to_hf_dict`, the NemotronH layout vLLM's ``NemotronHForCausalLM``
   reads) with ``load_format="dummy"``: vLLM allocates its weights without reading any file, then step 2
   fills them. No export of the weights to disk (30B parameters would be 60 GB per start). The engine core
   runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, tensor parallel 1) so ``collective_rpc``
   can run a local function on the worker without pickling the model.
2. **Refit** (before every rollout batch and evaluation): the training model's state dict is streamed
   tensor by tensor in HF key names (:func:`hf_weights`: stacked experts split per expert as views, an
   FSDP2-sharded tensor gathered alone with ``full_tensor()``) into the vLLM model's ``load_weights``: at
   most one gathered tensor exists at a time, never a second copy of the model on the host.
3. **Generate**: one vLLM request per prompt (``n=1``, its own seed from the call's seed and the row, so
   the G copies of a GRPO prompt sample differently and a rerun samples the same), ``logprobs=0`` (the
   chosen token's logprob only), ``ignore_eos`` (only the configured stop ids stop, as in the engine).
4. **Offload** (after the rollouts of a batch): ``LLM.sleep(level=2)`` frees vLLM's weights and KV cache
   for the training step; the next refit wakes the weights first (``wake_up(tags=["weights"])``), loads
   them, then wakes the KV cache.

What differs from the engine and is refused rather than approximated:

- The thinking budget forces tokens mid-generation; vLLM has no hook that appends forced tokens with their
  logprobs, so ``stage.grpo.thinking_budget`` (or an environment's) with this back-end is a ConfigError.
- vLLM computes the chosen token's logprob at engine level (``logprobs_mode``): ``raw_logprobs`` is
  ``log_softmax(logits)`` (= the engine's rule at temperature 1, any top-p / greedy), ``processed_logprobs``
  is after temperature *and* top-k/top-p renormalisation (= the engine's rule only without top-k/top-p).
  Temperature != 1 together with top_p < 1 or greedy evaluation has no faithful mode and is refused.
- Several ranks: each rank's in-process vLLM would initialise its own world of one process inside the
  trainer's process group; only a single-process run (world size 1, TP 1) is supported and more ranks are
  refused at start (use ``rollout_backend=engine``, which runs under DDP / FSDP2 / EP).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tandem.model.checkpoint_io import checkpoint_items

from .engine import GenerationResult, SamplingParams, ThinkTokens

__all__ = ["VLLMBackend", "check_available", "check_config", "hf_weights", "logprobs_mode", "row_seed",
           "sampling_kwargs", "to_result", "INSTALL_HINT"]

INSTALL_HINT = "pip install 'tandem[vllm]' on a CUDA machine"
_KEY = "stage.grpo.rollout_backend=vllm"


# --------------------------------------------------------------------------------------------------
# start-time checks
def check_config(g: Any) -> None:
    """Refusals of ``stage.grpo`` that need no machine (``validate_grpo`` calls it for ``rollout_backend=vllm``
    and raises its ValueError as a ConfigError: this module does not import the config, which imports it)."""
    budgets = [("stage.grpo.thinking_budget", g.thinking_budget)]
    budgets += [(f"stage.grpo.environments.{i}.thinking_budget", e.thinking_budget) for i, e in enumerate(g.environments)]
    for key, b in budgets:
        if b is not None:
            raise ValueError(f"{key}={b} with {_KEY}: vLLM cannot force the thinking budget's tokens (with their "
                             f"logprobs) mid-generation; set {key}=null or stage.grpo.rollout_backend=engine")
    try:
        logprobs_mode(g.temperature, g.top_p, greedy=g.eval_greedy)
    except ValueError as e:
        raise ValueError(f"stage.grpo.temperature={g.temperature} with {_KEY}: {e}; use temperature 1, or "
                         f"stage.grpo.top_p=1 and stage.grpo.eval_greedy=false, or rollout_backend=engine") from None


def check_available(g: Any, world_size: int) -> None:
    """Refuse a machine or layout this back-end cannot run on (ValueError; the GRPO stage raises it as a
    ConfigError at start, before anything is written)."""
    if importlib.util.find_spec("vllm") is None:
        raise ValueError(f"{_KEY}: vllm is not installed ({INSTALL_HINT}), or use stage.grpo.rollout_backend=engine")
    if not torch.cuda.is_available():
        raise ValueError(f"{_KEY}: vLLM needs a CUDA GPU and none is visible; run on a GPU node ({INSTALL_HINT}) "
                         f"or use stage.grpo.rollout_backend=engine")
    if world_size != 1:
        raise ValueError(f"{_KEY} runs one in-process vLLM engine in a single-process run (world size 1, tensor "
                         f"parallel 1); this run has {world_size} ranks. Use stage.grpo.rollout_backend=engine "
                         f"under several ranks")


# --------------------------------------------------------------------------------------------------
# pure mappings (no vllm import): unit-tested on CPU
def logprobs_mode(temperature: float, top_p: float, top_k: int = 0, greedy: bool = False) -> str:
    """vLLM's ``logprobs_mode`` that reproduces the engine's logprob rule (``log_softmax(logits / T)`` over the
    whole vocabulary) for runs sampling at ``temperature`` with ``top_p`` / ``top_k`` (``greedy``: also greedy
    requests); ValueError when none does."""
    if temperature == 1.0:
        return "raw_logprobs"
    if greedy:
        raise ValueError("greedy requests report logprobs at temperature 1 in vLLM, not at the sampling temperature")
    if top_p < 1.0 or top_k:
        raise ValueError("vLLM's processed logprobs are renormalised after top-k/top-p, the engine's are not")
    return "processed_logprobs"


def row_seed(seed: int | None, row: int) -> int | None:
    """The seed of request ``row`` of a call seeded ``seed`` (None: unseeded): stable across processes."""
    if seed is None:
        return None
    h = hashlib.blake2b(f"{int(seed)},{row}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


def sampling_kwargs(params: SamplingParams, mode: str, n_prompts: int) -> list[dict]:
    """``vllm.SamplingParams`` keyword arguments for each of ``n_prompts`` requests of one ``generate`` call,
    for an engine built with ``logprobs_mode=mode``; ValueError for what vLLM would not do identically."""
    if params.thinking_budget is not None:
        raise ValueError("the vllm back-end cannot force the thinking budget's tokens (use the engine back-end)")
    if mode == "raw_logprobs" and params.temperature != 1.0:
        raise ValueError(f"this vLLM engine reports logprobs at temperature 1 (logprobs_mode={mode}); "
                         f"the call samples at temperature {params.temperature}")
    if mode == "processed_logprobs" and (params.greedy or params.top_p < 1.0 or params.top_k):
        raise ValueError(f"logprobs_mode={mode} renormalises after top-k/top-p (and greedy reports temperature-1 "
                         f"logprobs): top_p must be 1, top_k 0 and greedy off")
    if mode not in ("raw_logprobs", "processed_logprobs"):
        raise ValueError(f"logprobs_mode must be raw_logprobs or processed_logprobs, got {mode!r}")
    base = {
        "n": 1, "max_tokens": params.max_new_tokens, "min_tokens": 0,
        "temperature": 0.0 if params.greedy else params.temperature,  # vLLM: temperature 0 = greedy
        "top_p": 1.0 if params.greedy else params.top_p, "top_k": -1 if params.greedy or not params.top_k else params.top_k,
        "stop_token_ids": list(params.stop_token_ids), "ignore_eos": True,  # only the given ids stop, as in the engine
        "logprobs": 0,  # the chosen token's logprob only
        "detokenize": False, "skip_special_tokens": False,
    }
    return [{**base, "seed": row_seed(params.seed, i)} for i in range(n_prompts)]


def _chosen_logprob(entry: Any, token: int) -> float:
    """The chosen token's logprob out of one position of vLLM's ``logprobs`` ({id: Logprob} or {id: float})."""
    value = entry[token]
    return float(getattr(value, "logprob", value))


def _reasoning_tokens(prompt: Sequence[int], tokens: Sequence[int], think: ThinkTokens | None) -> int:
    """The engine's ``reasoning_tokens`` count: generated tokens while a ``<think>`` is open (no budget here)."""
    if think is None:
        return 0
    open_ = False
    for t in prompt:
        open_ = True if t == think.think_start else False if t == think.think_end else open_
    n = 0
    for t in tokens:
        if t == think.think_end:
            open_ = False
        elif t == think.think_start:
            open_ = True
        elif open_:
            n += 1
    return n


def to_result(prompt: Sequence[int], completion: Any, stop_ids: Sequence[int],
              think: ThinkTokens | None = None) -> GenerationResult:
    """A vLLM ``CompletionOutput`` (``token_ids``, ``logprobs``, ``finish_reason``, ``stop_reason``) as the
    engine's :class:`GenerationResult` (nothing forced; a stop token is the last entry of ``tokens``)."""
    tokens = [int(t) for t in completion.token_ids]
    if completion.logprobs is None or len(completion.logprobs) != len(tokens):
        raise ValueError(f"vLLM returned {0 if completion.logprobs is None else len(completion.logprobs)} logprob "
                         f"entries for {len(tokens)} tokens; requests must ask for logprobs=0")
    res = GenerationResult(prompt_ids=list(prompt), tokens=tokens,
                           logprobs=[_chosen_logprob(e, t) for e, t in zip(completion.logprobs, tokens)],
                           forced=[False] * len(tokens), reasoning_tokens=_reasoning_tokens(prompt, tokens, think))
    if completion.finish_reason == "stop":
        stop = completion.stop_reason
        if not isinstance(stop, int) or stop not in stop_ids or not tokens or tokens[-1] != stop:
            raise ValueError(f"vLLM stopped with stop_reason={stop!r} (last token {tokens[-1:]}); expected one of the "
                             f"stop token ids {list(stop_ids)} kept as the last token")
        res.finish_reason, res.stop_token = "stop", stop
    elif completion.finish_reason == "length":
        res.finish_reason = "length"
    else:
        raise RuntimeError(f"vLLM finished a request with {completion.finish_reason!r}")
    return res


def hf_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``model``'s weights in HF NemotronH key names, one tensor at a time (what ``save_pretrained`` writes):
    stacked experts as per-expert views, an FSDP2 ``DTensor`` gathered alone (a collective: every rank must
    iterate in the same order). Nothing is copied to the host."""
    from torch.distributed.tensor import DTensor

    state = model.state_dict()
    for key, t in checkpoint_items(state):
        if isinstance(t, DTensor):
            t = t.full_tensor()
        yield key, t.detach()


# --------------------------------------------------------------------------------------------------
class VLLMBackend:
    """A colocated vLLM engine generating from the training model's weights (GPU only; see the module doc).

    ``gpu_memory_utilization`` is vLLM's share of the GPU (weights + KV cache; the trainer needs the rest),
    ``max_len`` the longest prompt + completion (``max_model_len``), ``temperature`` / ``top_p`` the run's
    sampling, which fix the engine's ``logprobs_mode`` (:func:`logprobs_mode`)."""

    def __init__(self, model: nn.Module, *, max_len: int, seed: int = 0, gpu_memory_utilization: float = 0.5,
                 temperature: float = 1.0, top_p: float = 1.0):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process (collective_rpc)
        import vllm  # the optional extra: imported only when this back-end is built

        self._vllm = vllm
        self.mode = logprobs_mode(temperature, top_p)
        dtype = next(model.parameters()).dtype
        self._folder = tempfile.TemporaryDirectory(prefix="tandem-vllm-")
        hf = model.config.to_hf_dict()
        hf["dtype"] = hf["torch_dtype"] = str(dtype).replace("torch.", "")
        (Path(self._folder.name) / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
        self.llm = vllm.LLM(
            model=self._folder.name, skip_tokenizer_init=True, load_format="dummy", dtype=str(dtype).replace("torch.", ""),
            tensor_parallel_size=1, gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_len,
            enable_sleep_mode=True, logprobs_mode=self.mode, enable_prefix_caching=False, seed=seed,
        )
        self._asleep = False
        self.refit(model)

    def refit(self, model: nn.Module) -> None:
        if self._asleep:
            self.llm.wake_up(tags=["weights"])  # weights first: the KV cache is not needed while loading
        weights = hf_weights(model)

        def load(worker):  # runs on vLLM's (in-process) worker
            worker.model_runner.model.load_weights(weights=weights)

        with torch.no_grad():
            self.llm.collective_rpc(load)
        if self._asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self._asleep = False
        self.llm.reset_prefix_cache()  # nothing cached from the old weights may be reused

    def offload(self) -> None:
        if not self._asleep:
            self.llm.sleep(level=2)  # weights and KV cache freed; the next refit reloads every weight
            self._asleep = True

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 think_ids: ThinkTokens | None = None) -> list[GenerationResult]:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs at least one prompt and every prompt at least one token")
        if self._asleep:
            raise RuntimeError("the vLLM back-end was offloaded: refit(model) before generating again")
        sp = [self._vllm.SamplingParams(**kw) for kw in sampling_kwargs(params, self.mode, len(prompts))]
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], sp, use_tqdm=False)
        return [to_result(p, o.outputs[0], params.stop_token_ids, think_ids) for p, o in zip(prompts, outs)]
