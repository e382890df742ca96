"""Synchronous GRPO in the shared loop: each optimizer step generates its own rollout batch.

``batches_for_step(step)``, on every rank:

1. **Prompts.** ``P = stage.grpo.prompts_per_step`` global slots; slot ``i`` gets an environment drawn by
   the configured weights and a prompt of that environment, from a generator seeded by
   ``(data.seed, step)`` — every rank computes the same list. Rank ``r`` takes the contiguous slots
   ``[r·P/W, (r+1)·P/W)``: a prompt's whole group lives on one rank.
2. **Rollouts.** ``G`` completions per prompt from the *current* weights (the rollout back-end,
   :class:`GenerationEngine` unless ``stage.grpo.rollout_backend`` says otherwise; one call per group,
   ``max_batch = G``), sampling seeded by ``(stage.seed, step, slot)``. The seed names the global slot,
   not the rank, so the rollouts are a pure function of (weights, seeds, step) whatever the number of ranks:
   2 ranks train exactly like 1, and a resumed run regenerates the same rollouts.
3. **Rewards** of whole groups from :meth:`GRPOStage.score_groups` (here: each rollout through the environment
   dispatcher, :func:`score_batch`; the ``rlhf`` stage overrides it with a judge), **advantages** per group
   (:func:`compute_advantages`: estimator, clip, overlong filtering).
4. **Packing.** Each rollout is one sequence ``prompt + completion``; the rank's sequences are packed
   first-fit-decreasing into rows of ``data.seq_len`` tokens with ``seq_idx`` (padding is its own
   document), ``stage.micro_batch`` rows per micro-batch, every rank padded to the same number of
   micro-batches (with empty rows). Targets (``loss_mask``) are the completion tokens only; tokens the
   engine forced (thinking budget) are in ``forced_mask`` and get no loss. Per target token:
   ``advantages`` (the rollout's), ``logp_gen`` (the engine's), ``logp_old``.
5. **Old logprobs**: a no-grad forward of the same micro-batches with the same numerics as the training
   forward, before the update, so the ratio is 1 up to kernel differences (CPU: exactly);
   ``grpo/token_mult_prob_error`` measures generation vs training logprobs.

``loss`` is :func:`tandem.trainer.rl.losses.policy_loss` (token sum; the loop divides by the step's global
target count). One optimizer step per rollout batch by default; ``ppo_epochs × minibatches`` steps per batch
otherwise (the batch and its old log-probs made at its first step; minibatch ``m`` = global slots ``i % M ==
m``), with an optional dynamic-sampling refill of zero-variance groups (docs/RL.md). ``kl_beta`` defaults
to 0: no reference model is built; with ``kl_beta > 0`` the frozen reference is loaded from
``stage.grpo.kl_reference``. Metrics and their reduction: docs/RL.md.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from tandem.data_pipelines.chat import render_prompt, thinking_mode
from tandem.data_pipelines.packing import IGNORE_LABEL
from tandem.data_pipelines.rl_prompts import RLPrompt, load_rl_prompts
from tandem.data_pipelines.sft import first_fit_decreasing, sft_cache_key
from tandem.data_pipelines.tokenizer import load_tokenizer
from tandem.model.loss import logprobs_from_logits

from tandem.model.checkpoint import CheckpointError

from ..autocast import autocast_context
from ..config import ConfigError, DataConfig, StageConfig
from ..data import DataError
from ..inference.backends import build_backend, check_backend
from ..inference.engine import SamplingParams, ThinkTokens
from ..parallel.lockstep import LockstepGeneration
from ..rl.advantages import GroupAdvantages, advantage_metrics, compute_advantages, group_std
from ..rl.environments import ENVIRONMENTS, DispatchStats, score_batch
from ..rl.losses import PolicyLossConfig, policy_loss, target_tokens
from ..rl.multiturn import rollout_episodes
from ..rl.prompt_store import RLPromptStore
from .base import LossOutput, Stage

log = logging.getLogger(__name__)

__all__ = ["GRPOStage", "Rollout", "pack_rollouts", "model_logprobs", "token_logprobs", "SOLVED_REWARD"]

#: a rollout counts as solved (pass@1, pass@G) when its reward is at least this (the built-in tasks give 0/1)
SOLVED_REWARD = 1.0
_EVAL = 1 << 40  # seed offset of held-out rollouts (never a training step)


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python versions)."""
    h = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


@dataclass
class Rollout:
    """One prompt + completion sequence, as packed for training."""

    prompt_ids: list[int]
    tokens: list[int]  # generated ids (stop token and forced ones included)
    logprobs: list[float]  # the engine's, per generated token
    forced: list[bool]
    advantage: float
    keep: bool = True  # False: removed by overlong filtering (no target tokens)


def pack_rollouts(rollouts: list[Rollout], seq_len: int, pad_id: int, rows: int | None = None) -> dict[str, torch.Tensor]:
    """Rows ``[R, seq_len]`` holding every rollout as one document (first-fit-decreasing), ``rows`` at least.

    Position ``t`` of a document predicts its token ``t + 1`` (``labels``); ``loss_mask[t]`` is 1 where that
    token is generated (``forced_mask`` marks the forced ones), ``advantages`` / ``logp_gen`` are aligned the
    same way. Padding positions are a document of their own, ``valid`` False."""
    lengths = [len(r.prompt_ids) + len(r.tokens) for r in rollouts]
    if any(n > seq_len for n in lengths):
        raise ValueError(f"a rollout of {max(lengths)} tokens does not fit data.seq_len={seq_len}")
    bins = first_fit_decreasing(lengths, seq_len) if rollouts else []
    R = max(len(bins), rows or 0)
    shape = (R, seq_len)
    batch = {
        "input_ids": torch.full(shape, pad_id, dtype=torch.long), "labels": torch.full(shape, IGNORE_LABEL, dtype=torch.long),
        "loss_mask": torch.zeros(shape), "forced_mask": torch.zeros(shape, dtype=torch.bool),
        "seq_idx": torch.zeros(shape, dtype=torch.long), "valid": torch.zeros(shape, dtype=torch.bool),
        "advantages": torch.zeros(shape), "logp_gen": torch.zeros(shape),
    }
    for b in range(R):
        pos = 0
        members = sorted(bins[b]) if b < len(bins) else []  # rollout order within a row
        for d, k in enumerate(members):
            r = rollouts[k]
            ids = r.prompt_ids + r.tokens
            n, p = len(ids), len(r.prompt_ids)
            batch["input_ids"][b, pos:pos + n] = torch.tensor(ids)
            batch["labels"][b, pos:pos + n - 1] = torch.tensor(ids[1:])
            batch["seq_idx"][b, pos:pos + n] = d
            batch["valid"][b, pos:pos + n] = True
            g = slice(pos + p - 1, pos + n - 1)  # positions whose next token is generated
            if r.keep:
                batch["loss_mask"][b, g] = 1.0
            batch["forced_mask"][b, g] = torch.tensor(r.forced, dtype=torch.bool)
            batch["advantages"][b, g] = r.advantage
            batch["logp_gen"][b, g] = torch.tensor(r.logprobs)
            pos += n
        batch["seq_idx"][b, pos:] = len(members)
    return batch


#: per-position log-probs (and entropy) of full logits: the plain reference of the chunked path below
token_logprobs = logprobs_from_logits


def model_logprobs(model, input_ids, seq_idx, labels, temperature: float, entropy: bool = False):
    """:func:`token_logprobs` of ``model``'s logits, computed in the model's forward in chunks of tokens
    (``labels=``: no [B, T, V] logits); the same values."""
    out = model(input_ids, seq_idx=seq_idx, labels=labels, temperature=temperature, entropy=entropy)
    if entropy:
        return -out[0], out[1]
    return -out


class GRPOStage(Stage):
    name = "grpo"
    max_metrics = frozenset({"grpo/ratio_max"})
    headline = ("grpo/reward_mean", "grpo/val_reward")  # the loss is a surrogate, not the thing to watch

    def __init__(self, data: DataConfig, stage: StageConfig, rank: int = 0, world_size: int = 1):
        g = stage.grpo
        self.data, self.stage, self.g = data, stage, g
        self.rank, self.world_size = rank, world_size
        if g.prompts_per_step % world_size:
            raise ConfigError(f"stage.grpo.prompts_per_step ({g.prompts_per_step}) must be a multiple of the "
                              f"data-parallel size ({world_size}): a prompt's group stays on one rank")
        if (g.prompts_per_step // world_size) % g.minibatches:
            raise ConfigError(f"stage.grpo.minibatches ({g.minibatches}) must divide each rank's share of the "
                              f"prompts (stage.grpo.prompts_per_step {g.prompts_per_step} / {world_size} ranks): "
                              f"every minibatch holds whole groups, the same number on every rank")
        try:  # this machine can run the rollout back-end: checked before anything (the prompt store) is written
            check_backend(g.rollout_backend, g, world_size)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        rl = data.rl
        if not rl.train:
            raise DataError("data.rl.train: no RL prompt files given (JSONL / Parquet / HF dataset folders)")
        try:
            self.tokenizer = load_tokenizer(rl.tokenizer)
        except (OSError, ValueError) as e:
            raise DataError(f"data.rl.tokenizer: {e}") from None
        tasks = sorted(ENVIRONMENTS)

        def load():  # on one process per node (trainer/rl/prompt_store.py); schema errors name file:line
            try:
                train = load_rl_prompts(list(rl.train), tasks=tasks)
            except ValueError as e:
                raise ValueError(f"data.rl.train: {e}") from None
            if rl.valid:
                try:
                    return train, load_rl_prompts(list(rl.valid), tasks=tasks)
                except ValueError as e:
                    raise ValueError(f"data.rl.valid: {e}") from None
            if data.valid_fraction > 0 and g.eval_prompts > 0:
                order = list(range(len(train)))
                random.Random(data.seed).shuffle(order)
                held = set(order[: max(1, round(len(train) * data.valid_fraction))])
                return [p for i, p in enumerate(train) if i not in held], [p for i, p in enumerate(train) if i in held]
            return train, []

        key = sft_cache_key([*rl.train, *rl.valid], self.tokenizer, valid=[str(v) for v in rl.valid],
                            valid_fraction=data.valid_fraction, seed=data.seed, held_out=g.eval_prompts > 0)
        cache = Path(data.cache_dir) if data.cache_dir else Path(tempfile.mkdtemp(prefix="tandem-rl-"))
        try:
            store = RLPromptStore.build(cache, key, load)
        except ValueError as e:
            raise DataError(str(e)) from None
        counts = store.counts
        # environments: configured, or every task of the data weighted by its prompt count
        envs = list(g.environments) or [{"task": t, "weight": float(n), "enable_thinking": None,
                                         "thinking_budget": None} for t, n in counts.items()]
        self.tasks = [e["task"] for e in envs]
        unknown = [t for t in self.tasks if t not in ENVIRONMENTS]
        if unknown:
            raise ConfigError(f"stage.grpo.environments: no environment registered for {unknown}; "
                              f"registered: {sorted(ENVIRONMENTS)}")
        self.envs = {}
        for e in envs:  # started once, here: an environment that cannot run (no sandbox) stops the start
            try:
                self.envs[e["task"]] = ENVIRONMENTS[e["task"]](**dict(e.get("options") or {}))
            except Exception as err:  # noqa: BLE001 — named and mapped to exit status 2 by the CLI
                raise ConfigError(f"stage.grpo.environments: environment {e['task']!r} cannot start: "
                                  f"{type(err).__name__}: {err}") from None
        empty = [t for t in self.tasks if not counts.get(t)]
        if empty:
            raise DataError(f"data.rl.train has no prompts for environment(s) {empty} of stage.grpo.environments")
        self.weights = torch.tensor([float(e["weight"]) for e in envs], dtype=torch.float64)
        self.mode = {e["task"]: g.enable_thinking if e["enable_thinking"] is None else bool(e["enable_thinking"])
                     for e in envs}
        self.budget = {e["task"]: g.thinking_budget if e["thinking_budget"] is None else e["thinking_budget"]
                       for e in envs}
        self.turns = {e["task"]: int(e.get("max_turns") or 1) for e in envs}  # > 1: multi-turn (rl/multiturn.py)
        self.think_ids = None
        if any(b is not None for b in self.budget.values()):
            try:
                self.think_ids = ThinkTokens.from_tokenizer(self.tokenizer)
            except ValueError as e:
                raise DataError(f"stage.grpo.thinking_budget: {e}") from None
        stop = self.tokenizer.token_to_id("<|im_end|>")
        if stop is None:
            raise DataError(f"data.rl.tokenizer: {self.tokenizer} has no <|im_end|> token to stop generation at")
        self.stop_ids = (stop,)
        self.pad_id = self.tokenizer.eod
        # Records and rendered ids on disk, memory-mapped (one copy per node); pools are store indices per task
        self.train = store
        self.pools = {t: store.pool(t) for t in self.tasks}
        self.valid = [p for p in store.valid if p.task in self.mode][: g.eval_prompts]
        render_key = hashlib.blake2b(json.dumps(
            {"mode": self.mode, "tools": {t: repr(getattr(self.envs[t], "tools", None)) for t in self.tasks},
             "seq_len": self.data.seq_len, "max_new_tokens": g.max_new_tokens}, sort_keys=True).encode(),
            digest_size=8).hexdigest()
        try:
            store.render(render_key, self._render, keep=lambda task: task in self.mode)
        except ValueError as e:
            raise DataError(str(e)) from None
        self.valid_ids = [self._render(p) for p in self.valid]
        self.fingerprint = hashlib.blake2b(f"{key}|{render_key}".encode(), digest_size=8).hexdigest()
        self.model = self.info = self.engine = self.backend = self.reference = None
        self.precision = "auto"
        self._pending: dict = {}
        self._cache: dict | None = None  # the current rollout batch: {"batch": b, "minibatches": [[micro-batch]]}
        self._served = -1  # the last step whose micro-batches were handed out
        self._times: dict = {}
        self.last_rewards: torch.Tensor | None = None
        log.info("GRPO data: %d train / %d held-out prompts; environments %s (weights %s)", sum(map(len, self.pools.values())),
                 len(self.valid), self.tasks, [round(float(w), 3) for w in self.weights / self.weights.sum()])

    def _render(self, p: RLPrompt) -> list[int]:
        messages = p.messages if p.messages is not None else [{"role": "user", "content": p.prompt}]
        ids = render_prompt(messages, self.tokenizer, enable_thinking=self.mode[p.task],
                            tools=getattr(self.envs[p.task], "tools", None))  # a tool world's, in the system block
        if len(ids) + self.g.max_new_tokens > self.data.seq_len:
            raise DataError(f"{p.where}: the prompt has {len(ids)} tokens; with stage.grpo.max_new_tokens="
                            f"{self.g.max_new_tokens} it does not fit data.seq_len={self.data.seq_len}")
        return ids

    def _completion_text(self, p: RLPrompt, tokens: list[int]) -> str:
        """The text an environment scores: the generation prompt's think opening + the completion (stop
        token dropped), so an unclosed reasoning block is visible to the verifier."""
        messages = p.messages if p.messages is not None else [{"role": "user", "content": p.prompt}]
        head = "<think>\n" if thinking_mode(messages, self.mode[p.task]) else "<think></think>"
        if tokens and tokens[-1] in self.stop_ids:
            tokens = tokens[:-1]
        return head + self.tokenizer.decode(tokens)

    # ------------------------------------------------------------------------------------------------
    def check_model(self, config) -> None:
        if config.vocab_size < self.tokenizer.vocab_size:
            raise DataError(f"model.vocab_size={config.vocab_size} is smaller than the tokenizer's "
                            f"({self.tokenizer.vocab_size}, {self.tokenizer.source})")

    def bind(self, model, info, precision: str = "auto") -> None:
        self.model, self.info, self.precision = model, info, precision
        # Several ranks: the forward may communicate (expert parallelism's all-to-all, FSDP2's weight
        # all-gathers, which the engine installs after bind), so every rank runs as many forwards as the
        # busiest one (see _generating). Over the whole world: rollouts end in a world collective anyway.
        self.lockstep = LockstepGeneration(model, dist.group.WORLD) if info.distributed else None
        # the rollout back-end (stage.grpo.rollout_backend): the engine runs the model bind was given (or its
        # lock-step wrapper); vLLM is refitted from self.model before each rollout batch / evaluation
        gen_model = (self.lockstep or model) if self.g.rollout_backend == "engine" else model
        self.backend = build_backend(self.g.rollout_backend, gen_model, max_batch=self.g.generations_per_prompt,
                                     max_len=self.data.seq_len, grpo=self.g, seed=self.stage.seed)
        self.engine = getattr(self.backend, "engine", None)  # the in-process GenerationEngine when that back-end runs
        if self.g.kl_beta > 0:
            from ..checkpoint import load_weights, weights_dir

            from ..parallel import load_frozen
            from ..parallel.fsdp import is_sharded

            # A copy of the policy cannot be made under expert parallelism (its MoE layers hold the EP process
            # group) or of FSDP2 shards (built on meta): a frozen model of the policy's layout, dense weights whole
            # and this rank's experts only (its forward exchanges tokens over the same EP group, in the same
            # micro-batches as the policy's).
            if info.ep > 1 or is_sharded(model):
                self.reference = load_frozen(weights_dir(self.g.kl_reference), info, dtype=torch.float32,
                                             what="the KL reference")
            else:
                self.reference = copy.deepcopy(model)
                load_weights(self.reference, self.g.kl_reference)
                self.reference.eval().requires_grad_(False)

    def prompts_for_step(self, step: int, refill: int = 0) -> list[int]:
        """Global prompt indices (into ``self.train``) of rollout batch ``step``'s slots: environment by
        weight, then a prompt of it (no repeat within an environment until its pool is used up). ``refill``
        > 0: the slots of dynamic sampling's extra round ``refill`` (their own seed)."""
        gen = torch.Generator().manual_seed(_seed(self.data.seed, step) if not refill else _seed(self.data.seed, step, refill))
        env = torch.multinomial(self.weights, self.g.prompts_per_step, replacement=True, generator=gen).tolist()
        orders = {t: torch.randperm(len(self.pools[t]), generator=gen).tolist() for t in self.tasks}
        used = {t: 0 for t in self.tasks}
        out = []
        for e in env:
            t = self.tasks[e]
            out.append(int(self.pools[t][orders[t][used[t] % len(orders[t])]]))
            used[t] += 1
        return out

    def _params(self, task: str, seed: int, greedy: bool = False) -> SamplingParams:
        g = self.g
        return SamplingParams(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
                              greedy=greedy, seed=seed, stop_token_ids=self.stop_ids, thinking_budget=self.budget[task])

    def _generate(self, prompts: list[list[int]], params: SamplingParams, samples: list[RLPrompt]):
        """Rollouts of ``prompts`` (one task; ``samples``: their prompt records): the engine's, or the rollout
        driver's episodes when the task has ``max_turns > 1``."""
        generate = lambda ids, prm: self.backend.generate(ids, prm, think_ids=self.think_ids)  # noqa: E731
        task = samples[0].task
        if self.turns[task] == 1:
            return generate(prompts, params)
        msgs = [s.messages if s.messages is not None else [{"role": "user", "content": s.prompt}] for s in samples]
        return rollout_episodes(generate, prompts, params, env=self.envs[task], samples=[s.as_sample() for s in samples],
                                tokenizer=self.tokenizer, thinking=[thinking_mode(m, self.mode[task]) for m in msgs],
                                max_turns=self.turns[task], max_tokens=self.data.seq_len, stop_ids=self.stop_ids)

    def _generating(self):
        """A stretch of generation with no other collective in it. With several ranks it ends with a drain: a
        rank done with its prompts keeps partnering the others' forwards (their MoE all-to-alls, FSDP
        all-gathers) until every rank is done (:class:`~tandem.trainer.parallel.lockstep.LockstepGeneration`)."""
        return self.lockstep or contextlib.nullcontext()

    def _all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Rows of every rank in rank order (same shape on every rank)."""
        if not self.info.distributed:
            return x
        x = x.to(self.info.device)
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x)
        return torch.cat(parts).cpu()

    def _all_reduce(self, x: torch.Tensor, op=None) -> torch.Tensor:
        if not self.info.distributed:
            return x
        x = x.to(self.info.device)
        dist.all_reduce(x, op=op or dist.ReduceOp.SUM)
        return x.cpu()

    # ------------------------------------------------------------------------------------------------
    def batches_for_step(self, step: int) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of optimizer step ``step``: one minibatch of rollout batch
        ``step // (ppo_epochs · minibatches)``, generated (and its old log-probs computed) at the batch's first
        step and kept for the rest (or restored from a checkpoint's ``stage/`` files on a resume mid-batch)."""
        if self.model is None:
            raise RuntimeError("GRPOStage.bind(model, info) must be called before batches_for_step")
        g = self.g
        per_batch = g.ppo_epochs * g.minibatches
        b, j = divmod(step, per_batch)
        self._pending, self._times = {}, {}
        if step == 0 and self._evaluates():
            self._pending.update({k.replace("grpo/", "grpo/initial_", 1): v for k, v in self.evaluate(self.model).items()})
        if self._cache is None or self._cache["batch"] != b:
            if j:
                raise CheckpointError(
                    f"step {step} is step {j + 1} of {per_batch} of rollout batch {b} (stage.grpo.ppo_epochs="
                    f"{g.ppo_epochs} × minibatches={g.minibatches}), but this rank has no saved rollouts of that "
                    f"batch: resume from a checkpoint written at that step by a run with the same number of ranks "
                    f"(its stage/rank_*.pt files hold the batch)")
            self._cache = self._rollout_batch(b)
        self._served = step
        return self._cache["minibatches"][j % g.minibatches]

    def _rollout_batch(self, b: int) -> dict:
        """Generate, score and pack rollout batch ``b`` (collective: every rank runs the same rounds)."""
        g, G, P = self.g, self.g.generations_per_prompt, self.g.prompts_per_step
        L = P // self.world_size
        first = self.rank * L
        t_gen = t_score = 0.0
        groups = []  # this rank's groups of every round: (round, global slot, prompt index, results)
        verdict_rows, informative = [], []  # per round: local rewards [L, G]; global "std > 0" flags [P]
        dstats_all = []
        self.backend.refit(self.model)  # generate from the weights of the last optimizer step
        for rnd in range(1 + g.dynamic_sampling_rounds):
            t0 = time.perf_counter()
            # round > 0: dynamic sampling's refill, drawn from its own seed
            slots = self.prompts_for_step(b) if rnd == 0 else self.prompts_for_step(b, rnd)
            mine = [(rnd * P + i, slots[i]) for i in range(first, first + L)]
            with self._generating():
                results = [self._generate([self.train.ids(pidx)] * G, self._params(self.train[pidx].task, self._slot_seed(b, slot)),
                                          [self.train[pidx]] * G) for slot, pidx in mine]
            t1 = time.perf_counter()
            rewards, dstats = self.score_groups(b, mine, results)
            t_gen, t_score = t_gen + (t1 - t0), t_score + (time.perf_counter() - t1)
            dstats_all.append(dstats)
            groups += [(rnd, slot, pidx, res) for (slot, pidx), res in zip(mine, results)]
            verdict_rows.append(rewards)
            if not g.dynamic_sampling_rounds:
                break
            informative.append(self._all_gather((group_std(rewards).flatten() > 0).float()).bool())
            if int(torch.cat(informative).sum()) >= P:
                break
        self.backend.offload()  # generation done until the next batch: the device memory is training's
        t2 = time.perf_counter()
        rewards = torch.cat(verdict_rows)  # [rounds · L, G], this rank's groups in (round, slot) order
        truncated = torch.tensor([r.finish_reason == "length" for *_, grp in groups for r in grp]).view(-1, G)
        adv = compute_advantages(rewards, estimator=g.advantage, clip=g.advantage_clip, truncated=truncated,
                                 overlong_filtering=g.overlong_filtering)
        # which groups train: all of round 0, or with dynamic sampling the first P informative groups in global
        # (round, slot) order, topped up with the earliest uninformative ones if the rounds ran out
        rounds = len(verdict_rows)
        if g.dynamic_sampling_rounds:
            flags = torch.cat(informative)  # [rounds · P] global
            order = torch.cat([flags.nonzero().flatten(), (~flags).nonzero().flatten()])[:P]
            position = torch.full((rounds * P,), -1, dtype=torch.long)
            position[order.sort().values] = torch.arange(P)  # rank of each selected group in global order
        else:
            position = torch.arange(P)
        positions = position.tolist()  # one host copy, not one per group
        local_pos = [positions[slot] for _, slot, _, _ in groups]  # -1: not trained
        advantages, keep = adv.advantages.tolist(), adv.loss_mask.tolist()  # one host copy, not one per rollout
        mbs: list[list[Rollout]] = [[] for _ in range(g.minibatches)]
        for i, (_, _, _, grp) in enumerate(groups):
            if local_pos[i] < 0:
                continue
            mbs[local_pos[i] % g.minibatches] += [Rollout(r.prompt_ids, r.tokens, r.logprobs, r.forced, advantages[i][j],
                                                          keep[i][j]) for j, r in enumerate(grp)]
        selected = torch.tensor([p >= 0 for p in local_pos])
        self.last_rewards = rewards[selected]  # [groups this rank trains on, G] (inspection, tests)
        packed = [pack_rollouts(rs, self.data.seq_len, self.pad_id) for rs in mbs]
        # every rank runs the same number of micro-batches per step (collectives inside the model / engines)
        mb = self.stage.micro_batch
        n_mb = torch.tensor([max(1, -(-p["input_ids"].shape[0] // mb)) for p in packed])
        n_mb = self._all_reduce(n_mb, dist.ReduceOp.MAX if self.info.distributed else None).tolist()
        minibatches = []
        for rs, p, n in zip(mbs, packed, n_mb):
            if n * mb > p["input_ids"].shape[0]:
                p = pack_rollouts(rs, self.data.seq_len, self.pad_id, rows=n * mb)
            minibatches.append([{k: v[i * mb:(i + 1) * mb] for k, v in p.items()} for i in range(n)])
        self._old_logprobs([x for m in minibatches for x in m])
        t3 = time.perf_counter()
        # rollout metrics over all ranks: one row per generated rollout, gathered in rank order
        env_id = torch.tensor([float(self.tasks.index(self.train[pidx].task)) for _, _, pidx, _ in groups]).repeat_interleave(G)
        lengths = torch.tensor([float(len(r.tokens)) for *_, grp in groups for r in grp])
        forced = torch.tensor([float(r.thinking_forced is not None) for *_, grp in groups for r in grp])
        local = torch.stack([rewards.flatten(), adv.advantages.flatten(), adv.loss_mask.flatten().float(),
                             truncated.flatten().float(), lengths, env_id, forced,
                             selected.float().repeat_interleave(G)], dim=1).double()
        allr = self._all_gather(local)
        timeouts, errors = sum(d.timeouts for d in dstats_all), sum(d.errors for d in dstats_all)
        invalid = sum(getattr(r, "invalid_calls", 0) for *_, grp in groups for r in grp)
        phases = self._all_reduce(torch.tensor([timeouts, errors, float(sum(lengths)), invalid], dtype=torch.float64))
        slowest = self._all_reduce(torch.tensor([t_gen, t_score, t3 - t2], dtype=torch.float64),
                                   dist.ReduceOp.MAX if self.info.distributed else None)
        trained = allr[allr[:, 7] > 0]
        self._pending.update(self._rollout_metrics(trained, G))
        n = allr.shape[0]
        self._pending.update({
            "grpo/env_timeout_frac": float(phases[0]) / n, "grpo/env_error_frac": float(phases[1]) / n,
            "grpo/rollout_tokens_per_s": float(phases[2]) / max(float(slowest[0]), 1e-9),
            "grpo/invalid_tool_calls_per_rollout": float(phases[3]) / n,
        })
        if g.dynamic_sampling_rounds:
            all_std = group_std(allr[:, 0].float().view(-1, G))
            self._pending.update({"grpo/sampling_rounds": float(rounds), "grpo/sampled_groups": float(all_std.numel()),
                                  "grpo/sampled_zero_std_frac": float((all_std == 0).float().mean())})
        self._times = {"generate": float(slowest[0]), "score": float(slowest[1]), "logprob": float(slowest[2]),
                       "end": time.perf_counter()}
        first_errors = [e for d in dstats_all for e in d.first_errors]
        if first_errors:
            log.warning("rollout batch %d: %d verifier errors, %d timeouts; first: %s", b, errors, timeouts, first_errors[0])
        return {"batch": b, "minibatches": minibatches}

    def score_groups(self, b: int, slots: list[tuple[int, int]], results: list[list]) -> tuple[torch.Tensor, DispatchStats]:
        """Rewards ``[len(slots), G]`` (float32) of whole groups: ``slots`` are ``(global slot, prompt index)``
        of rollout batch ``b``, ``results[i]`` the G rollouts of slot ``i``. GRPO scores each rollout on its
        own with its environment; a subclass may score a group at once (RLHF: a judge compares the group's
        rollouts in pairs, trainer/stages/rlhf.py)."""
        g = self.g
        pairs = [(self.train[pidx].as_sample(), self._completion_text(self.train[pidx], r.tokens))
                 for (_, pidx), group in zip(slots, results) for r in group]
        verdicts, dstats = score_batch(pairs, envs=self.envs, timeout_s=g.score_timeout_s,
                                       max_workers=g.score_workers, backend=g.score_backend)
        return torch.tensor([v.reward for v in verdicts], dtype=torch.float32).view(len(slots), g.generations_per_prompt), dstats

    def _slot_seed(self, b: int, slot: int) -> int:
        return _seed(self.stage.seed, b, slot)

    @torch.no_grad()
    def _old_logprobs(self, batches) -> None:
        """``logp_old`` (and ``logp_ref``) of every micro-batch: the training forward's numerics, no grad, eval
        mode (the MoE does not count these tokens for its load balancing)."""
        model, dev = self.model, self.info.device
        was = model.training
        model.eval()
        try:
            for b in batches:
                ids, seq_idx, labels = b["input_ids"].to(dev), b["seq_idx"].to(dev), b["labels"].to(dev)
                with autocast_context(self.precision, dev):
                    b["logp_old"] = model_logprobs(model, ids, seq_idx, labels, self.g.temperature).cpu()
                    if self.reference is not None:
                        b["logp_ref"] = model_logprobs(self.reference, ids, seq_idx, labels, self.g.temperature).cpu()
        finally:
            model.train(was)

    def _rollout_metrics(self, allr: torch.Tensor, G: int) -> dict:
        rewards = allr[:, 0].float().view(-1, G)
        out = GroupAdvantages(allr[:, 1].float().view(-1, G), allr[:, 2].bool().view(-1, G), group_std(rewards))
        m = {f"grpo/{k}": float(v) for k, v in advantage_metrics(rewards, out).items()}
        solved = rewards >= SOLVED_REWARD
        lengths = allr[:, 4]
        m.update({
            "grpo/pass@1": float(solved.float().mean()), "grpo/pass@G": float(solved.any(dim=1).float().mean()),
            "grpo/response_length_mean": float(lengths.mean()), "grpo/response_length_max": float(lengths.max()),
            "grpo/truncated_frac": float(allr[:, 3].mean()), "grpo/thinking_forced_frac": float(allr[:, 6].mean()),
            "grpo/rollouts": float(allr.shape[0]),
        })
        env = allr[:, 5].long()
        for e, t in enumerate(self.tasks):
            sel = env == e
            if sel.any():
                m[f"grpo/reward_mean/{t}"] = float(allr[sel, 0].mean())
                m[f"grpo/reward_std/{t}"] = float(allr[sel, 0].std()) if int(sel.sum()) > 1 else 0.0
                m[f"grpo/pass@1/{t}"] = float((allr[sel, 0] >= SOLVED_REWARD).float().mean())
        return m

    def after_step(self, step: int, finite: bool) -> dict:
        out, t = dict(self._pending), self._times
        if t:
            train = time.perf_counter() - t["end"]
            total = t["generate"] + t["score"] + t["logprob"] + train
            out.update({"grpo/time_generate_frac": t["generate"] / total, "grpo/time_score_frac": t["score"] / total,
                        "grpo/time_logprob_frac": t["logprob"] / total, "grpo/time_train_frac": train / total,
                        "grpo/step_seconds": total})
        self._pending, self._times = {}, {}
        return out

    # ------------------------------------------------------------------------------------------------
    def loss(self, model, batch) -> LossOutput:
        logp, entropy = model_logprobs(model, batch["input_ids"], batch.get("seq_idx"), batch["labels"], self.g.temperature,
                                       entropy=True)
        g = self.g
        cfg = PolicyLossConfig(name=g.loss, eps_low=g.eps_low, eps_high=g.eps_high, dual_clip=g.dual_clip,
                               kl_beta=g.kl_beta, is_cap=g.is_cap)
        out = policy_loss(logp, batch["logp_old"], batch["advantages"], batch["loss_mask"], config=cfg,
                          forced_mask=batch["forced_mask"], logp_ref=batch.get("logp_ref"), logp_gen=batch["logp_gen"],
                          entropy=entropy)
        loss_sum = out.loss_sum
        aux = getattr(getattr(model, "module", model), "aux_loss", lambda: None)()
        if aux is not None:  # MoE balance / z losses, token-weighted as in SFT
            loss_sum = loss_sum + aux * out.num_tokens
        return LossOutput(loss_sum, out.num_tokens, {f"grpo/{k}": v for k, v in out.metrics.items()})

    def target_tokens(self, batch) -> float:
        return float(target_tokens(batch["loss_mask"], batch["forced_mask"]).sum())

    # ------------------------------------------------------------------------------------------------
    def _evaluates(self) -> bool:
        return bool(self.valid) and self.stage.eval_batches > 0

    def evaluate(self, model) -> dict:
        """Held-out reward: one rollout per held-out prompt (greedy, or sampled with fixed seeds), in chunks
        of G prompts spread over ranks (chunk c seeded by ``(stage.seed, c)``), reduced over ranks."""
        if not self.valid:
            return {}
        G = self.g.generations_per_prompt
        sums = torch.zeros(2 * (len(self.tasks) + 1), dtype=torch.float64)
        # the environments' declared components: (task, name) → a (sum, count) slot, the same layout on every rank
        comp_keys = [(t, n) for t in self.tasks for n in getattr(self.envs[t], "components", ())]
        comps = torch.zeros(2 * len(comp_keys), dtype=torch.float64)
        length = torch.zeros(1, dtype=torch.float64)  # generated tokens over all held-out rollouts
        self.backend.refit(self.model)
        with self._generating():  # no collective inside: the reductions come after
            for c, start in enumerate(range(0, len(self.valid), G)):
                if c % self.world_size != self.rank:
                    continue
                idx = list(range(start, min(start + G, len(self.valid))))
                by_task: dict[str, list[int]] = {}
                for i in idx:
                    by_task.setdefault(self.valid[i].task, []).append(i)
                for t, ids in by_task.items():
                    res = self._generate([self.valid_ids[i] for i in ids],
                                         self._params(t, _seed(self.stage.seed, _EVAL, c), greedy=self.g.eval_greedy),
                                         [self.valid[i] for i in ids])
                    pairs = [(self.valid[i].as_sample(), self._completion_text(self.valid[i], r.tokens)) for i, r in zip(ids, res)]
                    length += sum(len(r.tokens) for r in res)
                    verdicts, _ = score_batch(pairs, envs=self.envs, timeout_s=self.g.score_timeout_s,
                                              max_workers=self.g.score_workers, backend=self.g.score_backend)
                    e = self.tasks.index(t)
                    for v in verdicts:
                        sums[0] += v.reward
                        sums[1] += 1
                        sums[2 + 2 * e] += v.reward
                        sums[3 + 2 * e] += 1
                        for k, (kt, name) in enumerate(comp_keys):
                            if kt == t and name in v.components:
                                comps[2 * k] += float(v.components[name])
                                comps[2 * k + 1] += 1
        self.backend.offload()
        sums = self._all_reduce(torch.cat([sums, length]))
        sums, length = sums[:-1], sums[-1]
        comps = self._all_reduce(comps) if comp_keys else comps
        out = {"grpo/val_reward": float(sums[0] / sums[1].clamp(min=1)), "grpo/val_prompts": float(sums[1]),
               # the style a reward can move (RLHF against a judge that prefers concise answers), judge-free
               "grpo/val_response_length": float(length / sums[1].clamp(min=1))}
        for e, t in enumerate(self.tasks):
            if sums[3 + 2 * e] > 0:
                out[f"grpo/val_reward/{t}"] = float(sums[2 + 2 * e] / sums[3 + 2 * e])
        for k, (t, name) in enumerate(comp_keys):
            if comps[2 * k + 1] > 0:
                out[f"grpo/val/{t}/{name}"] = float(comps[2 * k] / comps[2 * k + 1])
        return out

    def step_info(self, step: int) -> dict:
        return {}

    def schedule(self) -> dict:
        g = self.g
        return {f"stage.grpo.{k}": getattr(g, k) for k in ("prompts_per_step", "generations_per_prompt", "ppo_epochs",
                                                            "minibatches", "dynamic_sampling_rounds")}

    def state_dict(self) -> dict:
        return {"train_prompts": len(self.train), "fingerprint": self.fingerprint}

    def rank_state(self) -> dict | None:
        """This rank's rollout batch when the next step still trains on it (a checkpoint in the middle of
        ``ppo_epochs × minibatches`` steps): saved with the checkpoint, so a resume continues on the same
        rollouts and old log-probs instead of regenerating them from weights that have moved on. None at a
        batch boundary (the next step generates afresh)."""
        per_batch = self.g.ppo_epochs * self.g.minibatches
        if self._cache is None or (self._served + 1) % per_batch == 0:
            return None
        return {"batch": self._cache["batch"], "world_size": self.world_size, "rank": self.rank,
                "minibatches": self._cache["minibatches"]}

    def load_rank_state(self, state: dict | None, source=None) -> None:
        if state is None:
            return
        if (state.get("world_size"), state.get("rank")) != (self.world_size, self.rank):
            raise CheckpointError(
                f"{source or 'the checkpoint'}: its saved rollout batch was generated by rank {state.get('rank')} "
                f"of {state.get('world_size')}; this run has {self.world_size} ranks. Resume mid-batch with the "
                f"same number of ranks, or from a checkpoint at a rollout-batch boundary")
        self._cache = {"batch": int(state["batch"]), "minibatches": state["minibatches"]}

    def load_state_dict(self, state: dict) -> None:
        if state.get("fingerprint") != self.fingerprint:
            raise DataError(
                f"the RL prompts differ from the checkpoint's (prompts {state.get('train_prompts')} → {len(self.train)}, "
                f"fingerprint {state.get('fingerprint')} → {self.fingerprint}): resuming would not regenerate the same "
                f"rollouts. Start a new run from its weights with model.init_from=<checkpoint> instead"
            )
