"""Static-shape decoding: one wave of rows decoded at fixed shapes, bookkeeping on the device.

:class:`GenerationEngine(..., static=True) <tandem.trainer.inference.engine.GenerationEngine>` runs a wave
through :func:`generate_wave_static` instead of the eager loop. The prefill is the same (chunked,
:func:`~tandem.trainer.inference.engine.prefill`); decoding differs in *how*, not *what*:

- **Fixed shapes.** The wave keeps all its rows until the end: a finished row stays in the cache, is fed a
  token like the others and is simply not advanced (its ``cache.lengths`` stays put, so it only ever
  rewrites its own next slot) — no ``cache.select`` per step. The step is
  :meth:`HybridLM.decode_step <tandem.model.hybrid.HybridLM.decode_step>` (attention over the whole
  ``max_len`` under a position mask, Mamba state updated in place), so every step has the same shapes.
- **No host sync per token.** Sampling (:func:`~tandem.trainer.inference.engine.sample_next`: greedy,
  temperature, top-k / top-p, the seeded generator), stop tokens, ``max_new_tokens`` and the thinking
  budget are tensor ops on ``[B]`` / ``[B, V]`` tensors; tokens, logprobs and the forced flags go into
  preallocated ``[B, max_new_tokens]`` buffers. The host reads one boolean every ``sync_every`` steps
  (have all rows finished? then the wave ends early) and the buffers once at the end.
- **Thinking budget on the device.** Each row's state (in reasoning, reasoning tokens, a queue of tokens
  to force) is a tensor; a forced token replaces the sample with ``torch.where``. Same rules as the eager
  engine (module doc of :mod:`~tandem.trainer.inference.engine`), no fallback.
- **Compiled** (``compile=True``): ``torch.compile(model.decode_step, fullgraph=True, dynamic=False)``
  — a graph break would be an error, not a silent slowdown. Sampling and bookkeeping stay eager (a few
  small ops; ``torch.multinomial`` with a ``torch.Generator`` is what keeps the seeded stream equal to the
  eager engine's). The compiled step reads the model's parameters as they are at each call (no
  freezing), so a GRPO trainer may update the weights between calls. To keep one graph across waves the
  compiled path pads a short wave to ``max_batch`` rows (dummy one-token prompts, finished from the
  start) and rounds the cache's ``max_len`` up to a multiple of :data:`MAX_LEN_BUCKET`; a new bucket is
  one more compile.

Same results as the eager engine: greedy tokens are the same (the static step computes the same maths;
attention's masked tail adds exact zeros, and the compiled Mamba read-out sums in another order, so
logits agree to rounding, not bit for bit). With a seed, the generator is drawn exactly as the eager
engine draws it **while every row of the wave is running**: once a row finishes, the eager engine samples
only the rows left (a smaller ``multinomial``) while this one keeps sampling all ``B`` rows and discards
the finished rows' draws, so from then on the two streams — and the other rows' samples — differ. Both are
deterministic for a given seed; a padded wave (compiled, fewer prompts than ``max_batch``) draws for its
dummy rows too.
"""

from __future__ import annotations

import torch
from torch import nn

from tandem.model.cache import HybridCache

__all__ = ["MAX_LEN_BUCKET", "DEFAULT_SYNC_EVERY", "generate_wave_static", "compile_decode_step"]

#: the compiled path rounds a wave's cache length up to a multiple of this (one graph per bucket)
MAX_LEN_BUCKET = 256
#: decode steps between the host's checks whether every row has finished
DEFAULT_SYNC_EVERY = 16


def compile_decode_step(model: nn.Module, mode: str | None = None):
    """``torch.compile`` of :meth:`HybridLM.decode_step`: one graph, no breaks (``fullgraph``), static
    shapes. ``mode`` is passed to ``torch.compile`` (None = its default, the one that fits CPU;
    ``"reduce-overhead"`` adds CUDA graphs on GPU — not measured here, no GPU)."""
    return torch.compile(model.decode_step, fullgraph=True, dynamic=False, mode=mode)


class _ThinkState:
    """The thinking budget as [B] tensors (see the engine's module doc for the rules)."""

    def __init__(self, prompts, think, params, batch: int, device):
        self.think, self.params = think, params
        in_r = []
        for p in prompts:
            state = False
            for t in p:
                if t == think.think_start:
                    state = True
                elif t == think.think_end:
                    state = False
            in_r.append(state)
        in_r += [False] * (batch - len(prompts))
        self.in_r = torch.tensor(in_r, device=device)
        self.count = torch.zeros(batch, dtype=torch.long, device=device)  # reasoning tokens
        self.kind = torch.zeros(batch, dtype=torch.long, device=device)  # 0 none, 1 budget, 2 hard
        nl = list(think.newline)
        self.budget_seq = torch.tensor([think.think_end, *nl], device=device)
        self.hard_seq = torch.tensor([*nl, think.think_end, *nl], device=device)
        width = self.hard_seq.numel()
        self.queue = torch.zeros(batch, width, dtype=torch.long, device=device)  # tokens to force, in order
        self.queued = torch.zeros(batch, dtype=torch.long, device=device)
        vocab = max([*think.newline_ids, think.think_start, think.think_end, 0]) + 1
        self.newline_mask = torch.zeros(vocab, dtype=torch.bool, device=device)
        if think.newline_ids:
            self.newline_mask[torch.tensor(sorted(think.newline_ids), device=device)] = True

    def force(self, sampled: torch.Tensor, active: torch.Tensor):
        """(token per row, forced [B]): the head of an active row's queue replaces its sample."""
        forced = active & (self.queued > 0)
        tok = torch.where(forced, self.queue[:, 0], sampled)
        shifted = torch.cat([self.queue[:, 1:], torch.zeros_like(self.queue[:, :1])], dim=1)
        self.queue = torch.where(forced[:, None], shifted, self.queue)
        self.queued = self.queued - forced.long()
        return tok, forced

    def update(self, tok: torch.Tensor, sampled_row: torch.Tensor) -> None:
        """After the tokens of a step: ``sampled_row`` = active rows whose token was sampled, not forced."""
        t = self.think
        is_end, is_start = tok == t.think_end, tok == t.think_start
        counting = sampled_row & self.in_r & ~is_end & ~is_start
        self.in_r = torch.where(sampled_row & is_end, False, torch.where(sampled_row & is_start, True, self.in_r))
        self.count = self.count + counting.long()
        budget = self.params.thinking_budget
        if budget is None:
            return
        in_vocab = tok < self.newline_mask.numel()
        newline = self.newline_mask[tok.clamp(max=self.newline_mask.numel() - 1)] & in_vocab
        soft = counting & (self.count >= budget) & newline
        hard = counting & ~soft & (self.count >= budget + self.params.thinking_grace)
        width = self.queue.shape[1]
        pad = lambda seq: torch.cat([seq, seq.new_zeros(width - seq.numel())])  # noqa: E731
        self.queue = torch.where(soft[:, None], pad(self.budget_seq), torch.where(hard[:, None], pad(self.hard_seq), self.queue))
        self.queued = torch.where(soft, self.budget_seq.numel(), torch.where(hard, self.hard_seq.numel(), self.queued))
        self.kind = torch.where(soft, 1, torch.where(hard, 2, self.kind))
        self.in_r = self.in_r & ~(soft | hard)


def generate_wave_static(engine, prompts: list[list[int]], params, think, generator, step_fn, *,
                         batch: int | None = None, bucket: int | None = None,
                         sync_every: int = DEFAULT_SYNC_EVERY) -> list:
    """Decode one wave of ``prompts`` at fixed shapes (module doc). ``step_fn(tokens [B], cache, advance [B])
    → logits [B, V]`` is ``model.decode_step`` or its compiled form; ``batch`` pads the wave to that many
    rows, ``bucket`` rounds the cache length up to a multiple of it (both for the compiled step)."""
    from .engine import GenerationResult, prefill, sample_next

    model, device = engine.model, engine.device
    n_real = len(prompts)
    b = max(batch or n_real, n_real)
    rows = list(prompts) + [[0]] * (b - n_real)  # dummy rows: one token, finished from the start
    lengths = [len(p) for p in rows]
    max_len = max(lengths) + params.max_new_tokens
    if bucket:
        max_len = -(-max_len // bucket) * bucket
    cache = HybridCache.allocate(model.config, b, max_len, device=device, dtype=engine.dtype)
    ids = torch.zeros(b, max(lengths), dtype=torch.long)
    for i, p in enumerate(rows):
        ids[i, : len(p)] = torch.as_tensor(p, dtype=torch.long)
    logits = model.lm_head(prefill(model, ids.to(device), lengths, cache, engine.prefill_chunk))

    new = params.max_new_tokens
    tokens = torch.zeros(b, new, dtype=torch.long, device=device)
    logprobs = torch.zeros(b, new, dtype=torch.float32, device=device)
    forced_buf = torch.zeros(b, new, dtype=torch.bool, device=device)
    done = torch.arange(b, device=device) >= n_real
    count = torch.zeros(b, dtype=torch.long, device=device)  # tokens generated per row
    stopped = torch.zeros(b, dtype=torch.bool, device=device)
    stop_ids = torch.tensor(sorted(set(params.stop_token_ids)), dtype=torch.long, device=device)
    ts = _ThinkState(prompts, think, params, b, device) if think is not None else None
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
        if i == new - 1 or ((i + 1) % sync_every == 0 and bool(done.all())):
            break
        logits = step_fn(tok, cache, (~done).long())  # finished rows keep their slot: the next step rewrites it

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


def _check_static_model(model: nn.Module) -> None:
    if not callable(getattr(model, "decode_step", None)):
        raise ValueError(f"static decoding needs a model with decode_step(tokens, cache) (model.HybridLM); "
                         f"{type(model).__name__} has none: use GenerationEngine(..., static=False)")

