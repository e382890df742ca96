"""Batched generation on the hybrid cache: sampling, per-token logprobs, stop tokens, thinking budget.

    >>> engine = GenerationEngine(model, max_batch=8)
    >>> params = SamplingParams(max_new_tokens=256, temperature=0.8, top_p=0.95, seed=0,
    ...                         stop_token_ids=(tok.token_to_id("<|im_end|>"),), thinking_budget=128)
    >>> results = engine.generate(prompt_id_lists, params, think_ids=ThinkTokens.from_tokenizer(tok))
    >>> results[0].tokens, results[0].logprobs, results[0].finish_reason

How it runs: up to ``max_batch`` prompts are prefilled together (right-padded, each row's state taken at
its own length, see :mod:`model.cache`), then decoded one token per step together. A row that finishes
is dropped from the batch (its cache rows are removed), so it costs nothing afterwards. With
``static=True`` (or ``compile=True``: the same, with the step through ``torch.compile``) the decode runs at
fixed shapes with its bookkeeping on the device instead (:mod:`~tandem.trainer.inference.static`: finished
rows stay in place, no host read per token, the thinking budget as tensor ops; same tokens).

Chunked prefill: the prompts are fed ``prefill_chunk`` positions at a time (default
:data:`DEFAULT_PREFILL_CHUNK`; ``None`` = the whole prompt in one forward). Each chunk continues from the
cache the previous one left — attention appends its keys/values to the KV cache and attends over the cached
prefix, Mamba layers carry their conv window and SSM state — so the result equals the one-shot prefill
(up to floating-point summation order) while the widest activation is [B, chunk, ·] instead of
[B, prompt, ·]; attention's score/mask block is [chunk, cached] rather than [prompt, prompt], linear in the
prompt length. A row whose prompt ends inside a chunk is right-padded there (its length is given to the
model, as for ragged one-shot prefill); a row that ended in an earlier chunk adds nothing to its state.

Semantics (also in ``docs/GENERATION.md``):

- ``logprobs[i]`` is ``log_softmax(logits / temperature)[token]`` over the **whole** vocabulary: the
  model's distribution at temperature T, *not* renormalised after top-k / top-p. This is what a GRPO
  trainer recomputes for the same tokens at temperature T. With ``greedy`` the temperature still scales
  the logprob (default 1.0).
- Tokens the engine forces (``</think>``, newlines of the thinking budget) are part of ``tokens`` with
  ``forced[i] = True``; their ``logprobs[i]`` is the model's logprob of that token under the same rule
  (finite, but not a sample from the policy: mask forced tokens out of a policy loss).
- A sampled stop token ends the row and is kept as the last entry of ``tokens``
  (``finish_reason="stop"``, ``stop_token`` = its id); otherwise ``finish_reason="length"`` after
  ``max_new_tokens`` tokens (forced ones included).
- Thinking budget (as the Nemotron 3 Nano model card describes it): a row is *in reasoning* while its prompt + generated text has an
  open ``<think>`` not closed by ``</think>``. ``reasoning_tokens`` counts sampled tokens while in
  reasoning. Once at least ``thinking_budget`` of them were generated, the first one that contains a
  newline ends the reasoning: the engine forces ``</think>`` and a newline token, and sampling continues
  with the answer (``thinking_forced="budget"``). At ``thinking_budget + thinking_grace`` reasoning
  tokens without such a newline it forces newline, ``</think>``, newline at once
  (``thinking_forced="hard"``). A model that closes its reasoning itself is not touched.
- ``seed`` seeds one ``torch.Generator`` for the call: the same prompts, parameters and ``max_batch`` give
  the same tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from tandem.model.cache import HybridCache

from .static import DEFAULT_SYNC_EVERY, ThinkState, bucket_length, check_static_model, compile_decode_step

__all__ = ["DEFAULT_PREFILL_CHUNK", "SamplingParams", "ThinkTokens", "GenerationResult", "GenerationEngine",
           "prefill", "sample_next"]

#: prompt positions per prefill forward: large enough that short prompts take one forward and long ones
#: keep a few MB of activations per layer at nano3 width
DEFAULT_PREFILL_CHUNK = 2048


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    greedy: bool = False
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    thinking_budget: int | None = None  # None = no budget
    thinking_grace: int = 500

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (use greedy=True for argmax), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.thinking_budget is not None and self.thinking_budget < 0:
            raise ValueError(f"thinking_budget must be >= 0 or None, got {self.thinking_budget}")
        if self.thinking_grace < 0:
            raise ValueError(f"thinking_grace must be >= 0, got {self.thinking_grace}")


@dataclass(frozen=True)
class ThinkTokens:
    """Ids the thinking budget needs: ``<think>``, ``</think>``, every id whose text contains a newline,
    and the ids of ``"\\n"`` that the engine forces."""

    think_start: int
    think_end: int
    newline_ids: frozenset[int]
    newline: tuple[int, ...]

    @classmethod
    def from_tokenizer(cls, tok) -> "ThinkTokens":
        start, end = tok.token_to_id("<think>"), tok.token_to_id("</think>")
        if start is None or end is None:
            raise ValueError(f"{tok}: the tokenizer has no <think>/</think> tokens; a thinking budget needs them")
        vocab = getattr(tok, "vocab_size", None) or len(tok)
        newline_ids = frozenset(i for i in range(vocab) if "\n" in tok.decode([i]))
        newline = tuple(tok.encode("\n"))
        if not newline:
            raise ValueError(f"{tok}: '\\n' encodes to no tokens")
        return cls(start, end, newline_ids, newline)


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    tokens: list[int] = field(default_factory=list)  # generated ids (forced ones included)
    logprobs: list[float] = field(default_factory=list)  # per generated token, see the module doc
    forced: list[bool] = field(default_factory=list)  # True where the engine forced the token
    finish_reason: str = "length"  # "stop" | "length"
    stop_token: int | None = None
    reasoning_tokens: int = 0  # sampled tokens while a <think> was open
    thinking_forced: str | None = None  # None | "budget" | "hard": how the engine closed the reasoning


def _filter_top_k_top_p(scaled: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Logits [B, V] with everything outside the top-k / nucleus set to -inf."""
    if top_k and top_k < scaled.shape[-1]:
        kth = scaled.topk(top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # keep a token if the mass strictly before it is < top_p (the first token is always kept)
        drop = (probs.cumsum(-1) - probs) >= top_p
        scaled = scaled.scatter(-1, order, sorted_logits.masked_fill(drop, -math.inf))
    return scaled


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None):
    """``logits`` [B, V] → ``(tokens [B], logp [B, V])`` where ``logp = log_softmax(logits / T)``."""
    logp = torch.log_softmax(logits.float() / params.temperature, dim=-1)
    if params.greedy:
        return logp.argmax(-1), logp
    filtered = _filter_top_k_top_p(logp, params.top_k, params.top_p)
    probs = torch.softmax(filtered, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0], logp


class _Row:
    """Per-sequence bookkeeping while it is in the batch."""

    __slots__ = ("result", "in_reasoning", "pending")

    def __init__(self, prompt: list[int], think: ThinkTokens | None):
        self.result = GenerationResult(prompt_ids=list(prompt))
        self.pending: list[int] = []  # tokens to force next, in order
        self.in_reasoning = False
        if think is not None:
            for t in prompt:
                if t == think.think_start:
                    self.in_reasoning = True
                elif t == think.think_end:
                    self.in_reasoning = False


def prefill(model: nn.Module, ids: torch.Tensor, lengths: list[int], cache: HybridCache,
            chunk: int | None) -> torch.Tensor:
    """Run right-padded prompts ``ids`` [B, T] (row ``b`` has ``lengths[b]`` real tokens) into an empty
    ``cache`` ``chunk`` positions per forward (None: one forward); returns each row's hidden state at its
    last prompt token [B, H] (the input of the first sampled token's logits).

    Rows whose prompt ends before a chunk's end get their per-row length for that chunk (0 once they are
    done: Mamba's state and conv window stay put, attention writes pad keys past the row's length, which
    its length mask hides and decoding overwrites). Only the last token's hidden state of each row is kept.
    """
    b, t = ids.shape
    if chunk is not None and chunk < 1:
        raise ValueError(f"prefill_chunk must be >= 1 or None, got {chunk}")
    step = t if chunk is None else chunk
    len_t = torch.tensor(lengths, device=ids.device)
    last = None
    for start in range(0, t, step):
        stop = min(start + step, t)
        # per-row real tokens in [start, stop) — a host-side list, so no device sync per chunk
        n_new = [min(max(n - start, 0), stop - start) for n in lengths]
        full = all(n == stop - start for n in n_new)
        new_lengths = None if full else torch.tensor(n_new, device=ids.device)
        hidden = model.hidden_states(ids[:, start:stop], cache=cache, lengths=new_lengths)  # [B, chunk, H]
        ends = [r for r, n in enumerate(lengths) if start < n <= stop]  # rows whose last token is here
        if last is None:
            last = hidden.new_empty(b, hidden.shape[-1])
        if ends:
            rows = torch.tensor(ends, device=ids.device)
            last[rows] = hidden[rows, len_t[rows] - 1 - start]
    return last


def _no_autograd(model: nn.Module):
    """``torch.inference_mode`` — or ``torch.no_grad`` for a model with FSDP2-sharded (DTensor) parameters:
    FSDP's unshard of a block records version counters, which inference tensors do not have."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in model.parameters()):
        return torch.no_grad()
    return torch.inference_mode()


class GenerationEngine:
    """Generates for lists of prompt ids with a :class:`model.HybridLM` (or anything with its ``config``,
    ``hidden_states(input_ids, cache=, lengths=)``, ``lm_head`` and ``forward(input_ids, cache=)``).

    ``max_batch`` rows run together (more prompts run in successive waves); ``dtype`` is the KV cache's
    dtype (default: the model's parameter dtype when each wave starts — under FSDP2 mixed precision, inside a
    :class:`~tandem.trainer.parallel.lockstep.LockstepGeneration` region, that is the gathered compute dtype,
    not the fp32 of the sharded master weights); ``prefill_chunk`` prompt positions are prefilled per forward (None: the
    whole prompt at once; see the module doc). The model is run in eval mode under ``torch.inference_mode`` (``no_grad`` when FSDP2 shards it) and put
    back in its previous mode afterwards.

    ``static=True`` decodes with :meth:`_generate_wave_static` (:mod:`~tandem.trainer.inference.static`; the model
    needs ``decode_step``, i.e. a :class:`model.HybridLM`); ``compile=True`` also compiles that step
    (``compile_mode`` is ``torch.compile``'s ``mode``; None = default, the one for CPU). ``sync_every``:
    static decode steps between the host's checks whether every row has finished. The thinking budget
    works on both paths (no fallback); see docs/GENERATION.md for what "same tokens" means under a seed.
    """

    def __init__(self, model: nn.Module, *, max_batch: int = 8, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
                 static: bool = False, compile: bool = False, compile_mode: str | None = None,
                 sync_every: int = DEFAULT_SYNC_EVERY):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1 or None, got {prefill_chunk}")
        self.model = model
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        p = next(model.parameters())
        self.device = torch.device(device) if device is not None else p.device
        self._dtype = dtype
        if sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {sync_every}")
        self.static = static or compile
        self.compiled = compile
        self.sync_every = sync_every
        self._step = None
        if self.static:
            check_static_model(model)
            self._step = compile_decode_step(model, compile_mode) if compile else model.decode_step

    @property
    def dtype(self) -> torch.dtype:
        """The KV cache's dtype: the one given, else the model's parameters' now (see the class doc)."""
        return self._dtype or next(self.model.parameters()).dtype

    def generate(self, prompts: list[list[int]], params: SamplingParams, *,
                 think_ids: ThinkTokens | None = None) -> list[GenerationResult]:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs at least one prompt and every prompt at least one token")
        if params.thinking_budget is not None and think_ids is None:
            raise ValueError("thinking_budget needs think_ids=ThinkTokens(...) (e.g. ThinkTokens.from_tokenizer(tok))")
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(params.seed)
        was_training = self.model.training
        self.model.eval()
        try:
            with _no_autograd(self.model):
                out: list[GenerationResult] = []
                for i in range(0, len(prompts), self.max_batch):
                    wave = prompts[i : i + self.max_batch]
                    run = self._generate_wave_static if self.static else self._generate_wave
                    out += run(wave, params, think_ids, generator)
                return out
        finally:
            self.model.train(was_training)

    # ------------------------------------------------------------------------------------------------
    def _generate_wave(self, prompts, params, think, generator) -> list[GenerationResult]:
        rows = [_Row(p, think) for p in prompts]
        lengths = [len(p) for p in prompts]
        cache = HybridCache.allocate(self.model.config, len(prompts), max(lengths) + params.max_new_tokens,
                                     device=self.device, dtype=self.dtype)
        ids = torch.zeros(len(prompts), max(lengths), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.as_tensor(p, dtype=torch.long)
        ids = ids.to(self.device)
        # lm_head only on each row's last prompt token (a [B, T, V] prefill logit tensor is large)
        logits = self.model.lm_head(prefill(self.model, ids, lengths, cache, self.prefill_chunk))
        active = list(range(len(prompts)))  # row index of each cache row
        stop = set(params.stop_token_ids)
        while True:
            sampled, logp = sample_next(logits, params, generator)
            sampled = sampled.tolist()
            next_tokens, keep = [], []
            for j, r in enumerate(active):
                row = rows[r]
                res = row.result
                forced = bool(row.pending)
                tok = row.pending.pop(0) if forced else sampled[j]
                next_tokens.append(tok)
                res.tokens.append(tok)
                res.forced.append(forced)
                if not forced and tok in stop:
                    res.finish_reason, res.stop_token = "stop", tok
                elif len(res.tokens) < params.max_new_tokens:
                    keep.append(j)
                if think is not None and not forced:
                    self._thinking(row, tok, params, think)
            lp = logp.gather(1, torch.tensor(next_tokens, device=logp.device)[:, None])[:, 0].tolist()
            for j, r in enumerate(active):
                rows[r].result.logprobs.append(lp[j])
            if not keep:
                break
            if len(keep) < len(active):
                cache.select(keep)
                active = [active[j] for j in keep]
                next_tokens = [next_tokens[j] for j in keep]
            step = torch.tensor(next_tokens, dtype=torch.long, device=self.device)[:, None]
            logits = self.model(step, cache=cache)[:, 0]
        return [r.result for r in rows]

    def _generate_wave_static(self, prompts: list[list[int]], params, think, generator) -> list[GenerationResult]:
        """Decode one wave of ``prompts`` at fixed shapes (:mod:`~tandem.trainer.inference.static`). The step is
        ``model.decode_step`` or its compiled form; compiled, the wave is padded to ``max_batch`` rows and the
        cache length rounded up by :func:`~tandem.trainer.inference.static.bucket_length` (few graphs)."""
        model, device = self.model, self.device
        n_real = len(prompts)
        b = self.max_batch if self.compiled else n_real
        rows = list(prompts) + [[0]] * (b - n_real)  # dummy rows: one token, finished from the start
        lengths = [len(p) for p in rows]
        max_len = max(lengths) + params.max_new_tokens
        if self.compiled:
            max_len = bucket_length(max_len)
        cache = HybridCache.allocate(model.config, b, max_len, device=device, dtype=self.dtype)
        ids = torch.zeros(b, max(lengths), dtype=torch.long)
        for i, p in enumerate(rows):
            ids[i, : len(p)] = torch.as_tensor(p, dtype=torch.long)
        logits = model.lm_head(prefill(model, ids.to(device), lengths, cache, self.prefill_chunk))

        new = params.max_new_tokens
        tokens = torch.zeros(b, new, dtype=torch.long, device=device)
        logprobs = torch.zeros(b, new, dtype=torch.float32, device=device)
        forced_buf = torch.zeros(b, new, dtype=torch.bool, device=device)
        done = torch.arange(b, device=device) >= n_real
        count = torch.zeros(b, dtype=torch.long, device=device)  # tokens generated per row
        stopped = torch.zeros(b, dtype=torch.bool, device=device)
        stop_ids = torch.tensor(sorted(set(params.stop_token_ids)), dtype=torch.long, device=device)
        ts = ThinkState(prompts, think, params, b, device) if think is not None else None
        for i in range(new):
            sampled, logp = sample_next(logits, params, generator)
            active = ~done
            if ts is not None:
                tok, forced = ts.force(sampled, active)
            else:
                tok, forced = sampled, torch.zeros_like(active)
            tokens[:, i] = tok
            logprobs[:, i] = logp.gather(1, tok[:, None])[:, 0]
            forced_buf[:, i] = forced
            count += active.long()
            hit = active & ~forced & torch.isin(tok, stop_ids) if stop_ids.numel() else torch.zeros_like(active)
            stopped |= hit
            if ts is not None:
                ts.update(tok, active & ~forced)
            done = done | hit | (count >= new)
            if i == new - 1 or ((i + 1) % self.sync_every == 0 and bool(done.all())):
                break
            logits = self._step(tok, cache, (~done).long())  # finished rows keep their slot: the next step rewrites it

        # the one read of the wave's results
        tokens_l, logprobs_l, forced_l = tokens.tolist(), logprobs.tolist(), forced_buf.tolist()
        count_l, stopped_l = count.tolist(), stopped.tolist()
        reasoning_l = ts.count.tolist() if ts is not None else [0] * b
        kind_l = ts.kind.tolist() if ts is not None else [0] * b
        out = []
        for r in range(n_real):
            n = count_l[r]
            res = GenerationResult(prompt_ids=list(prompts[r]), tokens=tokens_l[r][:n], logprobs=logprobs_l[r][:n],
                                   forced=forced_l[r][:n], reasoning_tokens=reasoning_l[r],
                                   thinking_forced=(None, "budget", "hard")[kind_l[r]])
            if stopped_l[r]:
                res.finish_reason, res.stop_token = "stop", res.tokens[-1]
            out.append(res)
        return out

    @staticmethod
    def _thinking(row: _Row, tok: int, params: SamplingParams, think: ThinkTokens) -> None:
        """Budget bookkeeping after a *sampled* token ``tok``; queues forced tokens when it ends reasoning."""
        res = row.result
        if tok == think.think_end:
            row.in_reasoning = False
            return
        if tok == think.think_start:
            row.in_reasoning = True
            return
        if not row.in_reasoning:
            return
        res.reasoning_tokens += 1
        budget = params.thinking_budget
        if budget is None:
            return
        if res.reasoning_tokens >= budget and tok in think.newline_ids:
            row.pending += [think.think_end, *think.newline]
            res.thinking_forced = "budget"
            row.in_reasoning = False
        elif res.reasoning_tokens >= budget + params.thinking_grace:
            row.pending += [*think.newline, think.think_end, *think.newline]
            res.thinking_forced = "hard"
            row.in_reasoning = False
