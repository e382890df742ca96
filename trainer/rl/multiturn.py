"""Multi-turn rollouts (tool use): generate a turn, let the environment answer, append, generate again.

    results = rollout_episodes(engine.generate, [prompt_ids] * G, params, env=env, samples=[prompt.as_sample()] * G,
                               tokenizer=tok, thinking=False, max_turns=4, max_tokens=data.seq_len)

Per episode, each turn:

1. **Generate** from the episode's exact token context (prompt + everything so far) until the stop token
   ``<|im_end|>`` or ``params.max_new_tokens`` (one batched ``generate`` call for the group's live episodes,
   seeded by ``(params.seed, turn)``; a rollout is a pure function of the weights and the seeds).
2. **Observe**: the turn's text (decoded) is appended to the history as an assistant message and
   ``env.step(history, sample)`` answers with an :class:`Observation` (tool messages, or a text that
   becomes a user turn) or ``None`` — the episode is over.
3. **Append** the observation's tokens exactly as the chat template renders them after an assistant turn:
   ``"\\n"``, the user turn holding one ``<tool_response>\\n…\\n</tool_response>`` per tool message, and the
   next generation prompt (``<|im_start|>assistant\\n<think></think>`` with reasoning OFF, ``<think>\\n`` ON).
   The pieces come from :func:`tandem.data_pipelines.chat.chat_pieces`, so they are the template's, and
   are tokenised piecewise like every rendering (each boundary touches a special token).

**Token-in / token-out.** Nothing is re-rendered or re-tokenised: the generated ids are kept as sampled and
the next turn's context is the previous context plus those ids plus the observation's ids. The result's
``tokens`` are everything after the prompt; ``forced`` is True on observation tokens (and on the engine's
own forced thinking-budget tokens), and the GRPO stage gives no loss to forced tokens — so tool responses
are masked out of the loss with no change to packing (their ``logprobs`` are 0 and never used).

**Ends**: a turn without a stop token (``finish_reason="length"``: the episode is truncated), ``step``
returning None, ``max_turns`` generated turns, or no room left: ``max_tokens`` bounds prompt + all turns
(the packed row length); an observation that would not fit ends the episode as truncated. Invalid tool
calls are counted by the environment (``Observation.info["invalid_calls"]``, summed per episode).

Each turn re-runs the prompt through the model (the hybrid cache is not carried across turns): prefill
cost grows with the number of turns, a deliberate simplicity for the short episodes of tool use.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from tandem.data_pipelines.chat import chat_pieces

from .environments.base import Environment, Observation

__all__ = ["EpisodeResult", "rollout_episodes", "observation_ids"]


@dataclass
class EpisodeResult:
    """A multi-turn rollout with the fields of a ``GenerationResult`` the GRPO stage reads."""

    prompt_ids: list[int]
    tokens: list[int]  # generated and observation ids after the prompt, in order
    logprobs: list[float]  # the engine's per generated token; 0.0 on observation tokens
    forced: list[bool]  # True on observation tokens and on the engine's forced tokens: no loss
    finish_reason: str = "stop"  # "stop" (the episode ended) | "length" (truncated)
    thinking_forced: str | None = None
    turns: int = 0
    invalid_calls: int = 0
    history: list[dict] = dataclasses.field(default_factory=list)  # the decoded conversation after the prompt


def _turn_seed(seed: int | None, turn: int) -> int | None:
    if seed is None:
        return None
    h = hashlib.blake2b(f"{int(seed)},{turn}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


def observation_ids(obs: Observation, tokenizer, thinking: bool) -> list[int]:
    """The ids the template renders after an assistant turn's ``<|im_end|>`` for ``obs``, through the next
    generation prompt."""
    if isinstance(obs.content, str):
        messages = [{"role": "user", "content": obs.content}]
    else:
        messages = [dict(m) for m in obs.content]
        bad = [m.get("role") for m in messages if m.get("role") not in ("tool", "user")]
        if bad:
            raise ValueError(f"an observation holds tool or user messages, got roles {bad}")
    pieces = chat_pieces(messages, enable_thinking=thinking, add_generation_prompt=True)[1:]  # no system block
    texts = ["\n"] + [text for text, _ in pieces]
    return [i for text in texts for i in tokenizer.encode(text)]


def rollout_episodes(generate: Callable, prompts: Sequence[list[int]], params, *, env: Environment,
                     samples: Sequence[Mapping[str, Any]], tokenizer, thinking: bool | Sequence[bool], max_turns: int,
                     max_tokens: int, stop_ids: Sequence[int] = ()) -> list[EpisodeResult]:
    """Run one episode of ``env`` per prompt (see the module doc); ``samples[i]`` is prompt ``i``'s record,
    ``thinking`` its reasoning mode (one for all, or one each). ``generate(prompts, params)`` is the engine's
    ``generate`` (or a scripted policy with its signature) returning objects with ``tokens``, ``logprobs``,
    ``forced``, ``finish_reason``, ``thinking_forced``."""
    if max_turns < 1:
        raise ValueError(f"max_turns must be >= 1, got {max_turns}")
    if len(samples) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(samples)} samples")
    modes = [bool(thinking)] * len(prompts) if isinstance(thinking, bool) else [bool(t) for t in thinking]
    stops = set(stop_ids or params.stop_token_ids)
    eps = [EpisodeResult(list(p), [], [], []) for p in prompts]
    live = list(range(len(eps)))
    for turn in range(max_turns):
        if not live:
            break
        room = {i: max_tokens - len(eps[i].prompt_ids) - len(eps[i].tokens) for i in live}
        live = [i for i in live if room[i] > 0]
        if not live:
            break
        budget = min(params.max_new_tokens, min(room[i] for i in live))
        turn_params = dataclasses.replace(params, seed=_turn_seed(params.seed, turn), max_new_tokens=budget)
        outs = generate([eps[i].prompt_ids + eps[i].tokens for i in live], turn_params)
        still = []
        for i, out in zip(live, outs):
            ep = eps[i]
            ep.tokens += list(out.tokens)
            ep.logprobs += list(out.logprobs)
            ep.forced += list(out.forced)
            ep.turns += 1
            ep.thinking_forced = ep.thinking_forced or out.thinking_forced
            body = [t for t in out.tokens if t not in stops]
            ep.history.append({"role": "assistant", "content": tokenizer.decode(body)})
            if out.finish_reason != "stop" or not (out.tokens and out.tokens[-1] in stops):
                ep.finish_reason = "length"
                continue
            if turn + 1 == max_turns:
                continue  # the last allowed turn: the episode ends on this answer
            sample = samples[i]
            obs = env.step(list(sample.get("messages") or [{"role": "user", "content": sample.get("prompt")}])
                           + ep.history, sample)
            if obs is None:
                continue
            ep.invalid_calls += int(obs.info.get("invalid_calls", 0))
            ids = observation_ids(obs, tokenizer, modes[i])
            if len(ep.prompt_ids) + len(ep.tokens) + len(ids) >= max_tokens:
                ep.finish_reason = "length"  # no room to answer the observation
                continue
            ep.history += obs.content if not isinstance(obs.content, str) else [{"role": "user", "content": obs.content}]
            ep.tokens += ids
            ep.logprobs += [0.0] * len(ids)
            ep.forced += [True] * len(ids)
            still.append(i)
        live = still
    return eps
