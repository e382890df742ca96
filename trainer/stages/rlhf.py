"""RLHF: GRPO whose rewards come from a frozen GenRM judge comparing each group's rollouts in pairs.

Everything of :class:`GRPOStage` (prompts, rollouts, advantages, packing, loss, resume) is unchanged; only
the group-level scoring hook :meth:`GRPOStage.score_groups` is replaced:

1. the G rollouts of a prompt are paired (``stage.rlhf.pairing``: circular ``(i, i+1 mod G)`` or all pairs,
   :func:`tandem.trainer.rl.genrm.comparison_pairs`), each pair ``judge_samples`` times;
2. each pair becomes a judge prompt — the prompt's conversation + the two completions' final answers
   (reasoning stripped), as text — rendered through the chat template with the *judge's* tokenizer;
3. the judge generates its verdicts with the same :class:`GenerationEngine` (one call per group, the
   group's comparisons batched, ``judge_batch`` rows at once), sampling seeded by ``(stage.seed, batch,
   global slot, attempt)`` so judging, like the rollouts, does not depend on the number of ranks and a
   resumed run judges identically; verdicts that do not parse are re-sampled up to ``retries`` times, then
   take the counted default (score 3, ranking 3.5);
4. :func:`rollout_rewards`: tie-break ``adj = 3.5 − ranking`` on equal scores, each rollout's reward = the
   mean of its comparison scores; then the optional group shaping (``shortest_top_bonus``,
   ``length_penalty``, on completion token counts); then GRPO's ordinary advantage.

The held-out evaluation is GRPO's: each held-out prompt's own environment (e.g. ``math``) scores one
rollout, so ``grpo/val_reward`` measures the policy independently of the judge.

**The judge** (``stage.rlhf.judge``): a tandem run / checkpoint or an HF NemotronH folder, frozen, eval mode,
in ``stage.rlhf.judge_dtype`` (auto: bf16 on CUDA, fp32 on CPU), with its own tokenizer
(:func:`judge_tokenizer`: ``stage.rlhf.judge_tokenizer``, else the one saved beside its weights, else the
policy's; its vocabulary is checked against the judge's embedding). It is laid out like the policy: under expert parallelism each rank builds it on
``meta`` and allocates and reads only its own experts (:func:`~tandem.trainer.parallel.load_frozen`), so a
30B judge beside a 30B policy costs a rank its dense weights + 1/EP of the experts (``tandem plan`` counts
it); with several ranks every judge forward is a lockstep round over the world
(:class:`~tandem.trainer.parallel.lockstep.LockstepGeneration`), as the policy's rollouts are, because
ranks judge different groups and re-sample different verdicts. Its dense weights are not FSDP-sharded: a
frozen model has no gradients or optimizer state, and decoding would gather them anyway. A judge served
over HTTP (NeMo Gym's form) is not built (docs/RLHF.md).

Metrics (over all ranks' groups; with dynamic sampling, of the last round): ``rlhf/judged_score_mean`` (before shaping),
``rlhf/judge_format_error_frac`` (after retries), ``rlhf/judge_retry_frac``, ``rlhf/comparisons``,
``rlhf/tie_frac``, ``rlhf/judge_tokens`` (tokens the judge generated, every attempt: its cost), ``rlhf/swap_consistency`` (circular pairing with G = 2 compares each pair in both orders:
the fraction whose two verdicts prefer the same rollout).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging

import torch
import torch.distributed as dist

from tandem.data_pipelines.chat import render_prompt
from tandem.data_pipelines.preferences import final_answer, judge_messages
from tandem.model.checkpoint import CheckpointError

from ..config import ConfigError, DataConfig, StageConfig, validate_rlhf
from ..inference.backends import engine_for
from ..inference.engine import SamplingParams
from ..parallel import DistInfo, is_expert_param, load_frozen
from ..parallel.lockstep import LockstepGeneration
from ..rl.environments import DispatchStats
from ..rl.genrm import (
    ParseCounter, comparison_pairs, length_penalty, parse_judgement, rollout_rewards, shortest_top_bonus,
    swap_consistent, with_default,
)
from .grpo import GRPOStage

log = logging.getLogger(__name__)

__all__ = ["RLHFStage", "judge_dtype", "judge_tokenizer", "load_judge"]



def _seed(*parts: int) -> int:
    """A 63-bit judge-sampling seed from integers, stable across processes (its own hash prefix, so it never
    equals a rollout's seed)."""
    h = hashlib.blake2b(("judge:" + ",".join(str(int(p)) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


def judge_dtype(name: str, device: torch.device) -> torch.dtype:
    """``stage.rlhf.judge_dtype``: auto = bf16 on CUDA (a frozen model needs no fp32 master copy), fp32 on CPU."""
    if name == "auto":
        name = "bf16" if device.type == "cuda" else "fp32"
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def load_judge(source: str, info: DistInfo, dtype: torch.dtype = torch.float32):
    """The frozen judge: a tandem run / checkpoint or an HF NemotronH folder, laid out like the policy (under
    expert parallelism only this rank's experts are read; :func:`~tandem.trainer.parallel.load_frozen`);
    CheckpointError naming the source."""
    from ..checkpoint.manager import weights_dir

    folder = weights_dir(source)
    try:
        return load_frozen(folder, info, dtype=dtype, what=f"the judge ({folder})")
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"stage.rlhf.judge={source}: cannot load the judge from {folder}: {e}") from None


def judge_tokenizer(r, policy_tokenizer):
    """``(tokenizer, where it came from)`` the judge reads and writes with: ``stage.rlhf.judge_tokenizer`` when
    set, else the tokenizer saved beside the judge's weights (a tandem checkpoint, or an HF folder with its
    tokenizer files), else the policy's. DataError-free: a bad path is a ConfigError naming the key."""
    from tandem.data_pipelines.tokenizer import load_tokenizer

    from ..checkpoint.manager import weights_dir
    from ..checkpoint.tokenizer_files import saved_tokenizer

    if r.judge_tokenizer:
        try:
            return load_tokenizer(r.judge_tokenizer), f"stage.rlhf.judge_tokenizer={r.judge_tokenizer}"
        except Exception as e:  # the tokenizers / transformers loaders raise their own types
            raise ConfigError(f"stage.rlhf.judge_tokenizer={r.judge_tokenizer}: cannot load a tokenizer ({e})") from None
    folder = saved_tokenizer(weights_dir(r.judge))
    if folder is None:
        return policy_tokenizer, "the policy's (none saved with the judge)"
    return load_tokenizer(folder), f"saved with the judge ({folder})"


class RLHFStage(GRPOStage):
    name = "rlhf"

    def __init__(self, data: DataConfig, stage: StageConfig, rank: int = 0, world_size: int = 1):
        validate_rlhf(stage.rlhf, required=True)
        super().__init__(data, stage, rank, world_size)
        self.r = stage.rlhf
        self.judge = self.judge_engine = self.judge_lockstep = None
        self.pairs = comparison_pairs(self.g.generations_per_prompt, self.r.pairing).repeat_interleave(
            self.r.judge_samples, dim=0)  # [K·S, 2]: each pair judge_samples times, adjacent

    def bind(self, model, info, precision: str = "auto") -> None:
        super().bind(model, info, precision)
        self.judge = load_judge(self.r.judge, info, judge_dtype(self.r.judge_dtype, info.device))
        self.judge_tokenizer, source = judge_tokenizer(self.r, self.tokenizer)
        if self.judge.config.vocab_size < self.judge_tokenizer.vocab_size:
            raise ConfigError(f"stage.rlhf.judge={self.r.judge}: its vocabulary ({self.judge.config.vocab_size}) is "
                              f"smaller than its tokenizer's ({self.judge_tokenizer.vocab_size}, {source}); name the "
                              f"judge's own tokenizer with stage.rlhf.judge_tokenizer")
        stop = self.judge_tokenizer.token_to_id("<|im_end|>")
        if stop is None:
            raise ConfigError(f"stage.rlhf.judge_tokenizer: {source} has no <|im_end|> token to stop the judge at")
        self.judge_stop_ids = (stop,)
        log.info("judge %s, tokenizer: %s", self.r.judge, source)
        # several ranks: every judge forward is a lockstep round over the world (its MoE all-to-all under EP;
        # ranks judge different groups and retry different verdicts), as the policy's rollouts are
        # (a judge read whole — no MoE, or experts EP does not divide — has no collective: no lockstep)
        collective = info.distributed and any(is_expert_param(p) for p in self.judge.parameters())
        self.judge_lockstep = LockstepGeneration(self.judge, dist.group.WORLD) if collective else None
        # the judge decodes like the rollouts (stage.grpo.rollout_engine) when they run in process; one call
        # judges one group's comparisons, so a wave never needs more rows than that
        mode = self.g.rollout_engine if self.g.rollout_backend == "engine" else "eager"
        self.judge_engine = engine_for(self.judge_lockstep or self.judge, min(self.r.judge_batch, len(self.pairs)), mode)

    def _judge_params(self, seed: int) -> SamplingParams:
        r = self.r
        return SamplingParams(max_new_tokens=r.judge_max_new_tokens, temperature=r.judge_temperature,
                              greedy=r.judge_greedy, seed=seed, stop_token_ids=self.judge_stop_ids)

    def _judge_text(self, tokens: list[int]) -> str:
        if tokens and tokens[-1] in self.judge_stop_ids:
            tokens = tokens[:-1]
        return ("<think>\n" if self.r.judge_enable_thinking else "<think></think>") + self.judge_tokenizer.decode(tokens)

    def judge_group(self, conversation: list[dict], answers: list[str], seed: int, counter: ParseCounter):
        """Verdicts ``(score_1, score_2, ranking)`` tensors ``[K·S]`` of one group's comparisons, how many
        judgements were re-sampled and how many tokens the judge generated (every attempt)."""
        # the policy's completions enter as text (decoded with its tokenizer), the judge reads them in its own
        prompts = [render_prompt(judge_messages(conversation, answers[i], answers[j], self.r.judge_instructions),
                                 self.judge_tokenizer,
                                 enable_thinking=self.r.judge_enable_thinking) for i, j in self.pairs.tolist()]
        verdicts = [None] * len(prompts)
        todo, retried, generated = list(range(len(prompts))), 0, 0
        for attempt in range(1 + self.r.retries):
            results = self.judge_engine.generate([prompts[k] for k in todo], self._judge_params(_seed(seed, attempt)))
            generated += sum(len(res.tokens) for res in results)
            failed = []
            for k, res in zip(todo, results):
                j = parse_judgement(self._judge_text(res.tokens))
                verdicts[k] = j
                if not j.ok:
                    failed.append(k)
            if not failed or attempt == self.r.retries:
                break
            retried += len(failed)
            todo = failed
        for j in verdicts:
            counter.add(j)
        values = torch.tensor([with_default(j) for j in verdicts], dtype=torch.float64)
        return values[:, 0], values[:, 1], values[:, 2], retried, generated

    def score_groups(self, b, slots, results):
        G, N = self.g.generations_per_prompt, len(slots)
        counter, retried, generated = ParseCounter(), 0, 0
        s1, s2, rk = (torch.zeros(N, len(self.pairs), dtype=torch.float64) for _ in range(3))
        with self.judge_lockstep or contextlib.nullcontext():  # no other collective inside: the reduction comes after
            for n, ((slot, pidx), group) in enumerate(zip(slots, results)):
                p = self.train[pidx]
                conversation = p.messages if p.messages is not None else [{"role": "user", "content": p.prompt}]
                answers = [final_answer(self._completion_text(p, r.tokens)) for r in group]
                a, c, k, n_retry, n_tokens = self.judge_group(conversation, answers, _seed(self.stage.seed, b, slot), counter)
                s1[n], s2[n], rk[n] = a, c, k
                retried, generated = retried + n_retry, generated + n_tokens
        r = self.r
        rewards = rollout_rewards(s1, s2, rk, self.pairs, G, tie_break=r.tie_break)
        judged = rewards.clone()
        lengths = torch.tensor([[len(x.tokens) for x in group] for group in results], dtype=torch.float64)
        if r.shortest_top_bonus > 0:
            rewards = shortest_top_bonus(rewards, lengths, r.shortest_top_bonus)
        if r.length_penalty > 0:
            rewards = length_penalty(rewards, lengths, r.length_penalty)
        cons = []
        if r.pairing == "circular" and G == 2:  # (0, 1) and (1, 0): one pair in both orders
            cons = [swap_consistent(float(rk[n, i]), float(rk[n, i + r.judge_samples]))
                    for n in range(N) for i in range(r.judge_samples)]
        # summed over ranks (every rank scores the same number of rounds, so this collective is matched)
        t = self._all_reduce(torch.tensor([float(judged.sum()), float(judged.numel()), counter.errors, counter.total,
                                           retried, float((s1 == s2).sum()), sum(cons), len(cons), generated],
                                          dtype=torch.float64))
        metrics = {"rlhf/judged_score_mean": float(t[0] / t[1].clamp(min=1)),
                   "rlhf/judge_format_error_frac": float(t[2] / t[3].clamp(min=1)),
                   "rlhf/judge_retry_frac": float(t[4] / t[3].clamp(min=1)), "rlhf/comparisons": float(t[3]),
                   "rlhf/tie_frac": float(t[5] / t[3].clamp(min=1)), "rlhf/judge_tokens": float(t[8])}
        if cons:
            metrics["rlhf/swap_consistency"] = float(t[6] / t[7])
        self._pending.update(metrics)
        stats = DispatchStats(calls=N * G, ok=N * G)
        return rewards.float(), stats
