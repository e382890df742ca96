"""Static-shape decoding: one wave of rows decoded at fixed shapes, bookkeeping on the device.

:class:`GenerationEngine(..., static=True) <tandem.trainer.inference.engine.GenerationEngine>` runs a wave
through ``GenerationEngine._generate_wave_static`` instead of the eager loop; this module holds its parts
that do not depend on the engine (the compiled step, the thinking budget as tensors, the constants). The
prefill is the same (chunked, :func:`~tandem.trainer.inference.engine.prefill`); decoding differs in
*how*, not *what*:

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
  start) and rounds the cache's ``max_len`` up to a power of two (≥ :data:`MAX_LEN_BUCKET`,
  :func:`bucket_length`); a new bucket is one more compile, and past :data:`RECOMPILE_LIMIT` graphs the
  step runs eagerly (a warning; ``fullgraph`` would otherwise make the limit a hard error).

Why not a serving library: vLLM / SGLang run their own model code and weights copy (a separate back-end,
not this in-process engine), and transformers' ``StaticCache`` serves its own attention models, not
tandem's hybrid cache; the rollouts of GRPO need the training model itself, in process, with the weights
of the current step. So the static step is tandem's own, and the compiler is ``torch.compile``.

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

import warnings

import torch
from torch import nn

__all__ = ["DEFAULT_SYNC_EVERY", "MAX_LEN_BUCKET", "RECOMPILE_LIMIT", "ThinkState", "bucket_length",
           "check_static_model", "compile_decode_step"]

#: the compiled path rounds a wave's cache length up to a power of two, at least this (one graph per
#: bucket: a handful for any mix of lengths, at the cost of at most 2× the KV length a wave needs)
MAX_LEN_BUCKET = 256
#: graphs the compiled step may hold (batch sizes × length buckets) before it runs eagerly instead
RECOMPILE_LIMIT = 32
#: decode steps between the host's checks whether every row has finished
DEFAULT_SYNC_EVERY = 16


def bucket_length(n: int) -> int:
    """The compiled path's cache length for a wave needing ``n`` positions: the next power of two
    ≥ max(n, :data:`MAX_LEN_BUCKET`)."""
    return max(MAX_LEN_BUCKET, 1 << (n - 1).bit_length())


def compile_decode_step(model: nn.Module, mode: str | None = None):
    """``torch.compile`` of :meth:`HybridLM.decode_step`: one graph, no breaks (``fullgraph``), static
    shapes. ``mode`` is passed to ``torch.compile`` (None = its default, the one that fits CPU;
    ``"reduce-overhead"`` adds CUDA graphs on GPU — not measured here, no GPU).

    With ``fullgraph`` a shape beyond dynamo's recompile limit is a hard error, so the returned step
    catches it once, warns, and runs ``model.decode_step`` eagerly from then on (same results, slower).
    """
    compiled = torch.compile(model.decode_step, fullgraph=True, dynamic=False, mode=mode,
                             recompile_limit=RECOMPILE_LIMIT)
    state = {"eager": False}

    def step(tokens, cache, advance=None):
        if not state["eager"]:
            try:
                return compiled(tokens, cache, advance)
            except torch._dynamo.exc.FailOnRecompileLimitHit:
                warnings.warn(f"the compiled decode step reached {RECOMPILE_LIMIT} graphs (batch sizes × "
                              f"length buckets); running it eagerly from now on", stacklevel=2)
                state["eager"] = True
        return model.decode_step(tokens, cache, advance)

    return step


class ThinkState:
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

    def _padded(self, seq: torch.Tensor) -> torch.Tensor:
        return torch.cat([seq, seq.new_zeros(self.queue.shape[1] - seq.numel())])

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
        soft_q, hard_q = self._padded(self.budget_seq), self._padded(self.hard_seq)
        self.queue = torch.where(soft[:, None], soft_q, torch.where(hard[:, None], hard_q, self.queue))
        self.queued = torch.where(soft, self.budget_seq.numel(), torch.where(hard, self.hard_seq.numel(), self.queued))
        self.kind = torch.where(soft, 1, torch.where(hard, 2, self.kind))
        self.in_r = self.in_r & ~(soft | hard)


def check_static_model(model: nn.Module) -> None:
    """Raise unless ``model`` has the static step (``decode_step``) the static engine runs."""
    if not callable(getattr(model, "decode_step", None)):
        raise ValueError(f"static decoding needs a model with decode_step(tokens, cache) (model.HybridLM); "
                         f"{type(model).__name__} has none: use GenerationEngine(..., static=False)")

