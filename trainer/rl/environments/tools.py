"""The ``tools`` environment: a small deterministic tool world (a calculator and a key-value store) for
multi-step, multi-turn tool use.

The tools (:data:`TOOLS`, OpenAI function specs) are described in the system block by the chat template
(``render_prompt(..., tools=env.tools)``). The policy calls them in the template's format::

    <tool_call>
    {"name": "calculator", "arguments": {"expression": "17 * 23"}}
    </tool_call>

and the rollout driver (:mod:`tandem.trainer.rl.multiturn`) feeds back each result as a ``tool`` message
(rendered ``<tool_response>…</tool_response>`` in a user turn) before generating again, until a turn makes
no call or the turn limit is reached.

A prompt's ``metadata``: ``initial`` (the store's contents at the start, default empty), ``expect_state``
(key → value the store must hold at the end) and/or the row's ``answer`` (the final answer must contain
it as a number or word, like the math environment's last-number rule), ``invalid_penalty`` (optional,
subtracted per invalid call; the environment's default is 0)::

    {"prompt": "Compute 17*23 with the calculator, store it under 'result', then say the value.",
     "task": "tools", "answer": "391", "metadata": {"initial": {}, "expect_state": {"result": 391}}}

**Deterministic replay.** The world's state is never kept between calls: :meth:`ToolWorldEnv.step` and
:meth:`ToolWorldEnv.verify` replay every call of the transcript from ``initial`` (a handful of cheap
calls), so the environment is stateless, thread-safe and picklable, and the verdict depends only on the
transcript. **Invalid calls** — a ``<tool_call>`` whose JSON does not parse, an unknown tool, missing,
unexpected or ill-typed arguments, an expression that is not plain arithmetic — get an ``{"error": ...}``
response and are counted (component ``invalid_calls``). Reward: the mean of the checks (answer, each
expected key), minus ``invalid_penalty`` per invalid call, floored at 0. Components: ``answer_ok``,
``state_ok`` (fraction of expected keys right), ``tool_calls``, ``invalid_calls``, ``turns``.
"""

from __future__ import annotations

import ast
import json
import operator
import re
from typing import Any, Mapping, Sequence

from .base import Environment, Observation, Verdict, register_environment

__all__ = ["ToolWorldEnv", "TOOLS", "parse_tool_calls", "split_transcript", "run_tool", "ToolError"]

TOOLS = [
    {"type": "function", "function": {
        "name": "calculator", "description": "Evaluate an arithmetic expression (+ - * / // % ** and parentheses).",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                       "required": ["expression"]}}},
    {"type": "function", "function": {
        "name": "kv_get", "description": "Read the value stored under a key.",
        "parameters": {"type": "object", "properties": {"key": {"type": "string"}}, "required": ["key"]}}},
    {"type": "function", "function": {
        "name": "kv_set", "description": "Store a value under a key (replacing any previous value).",
        "parameters": {"type": "object", "properties": {"key": {"type": "string"}, "value": {}},
                       "required": ["key", "value"]}}},
]
_PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}

_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
        ast.USub: operator.neg, ast.UAdd: operator.pos}
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


class ToolError(ValueError):
    """An invalid call (reported to the policy as ``{"error": ...}`` and counted)."""


def _arith(node) -> float | int:
    if isinstance(node, ast.Expression):
        return _arith(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _arith(node.left), _arith(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 1e6):
            raise ToolError("exponent too large")
        return _OPS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_arith(node.operand))
    raise ToolError(f"not plain arithmetic: {ast.dump(node)[:60]}")


def _number(x: float | int) -> float | int:
    return int(x) if isinstance(x, float) and x.is_integer() and abs(x) < 2 ** 53 else x


def run_tool(store: dict, name: str, arguments: Any) -> dict:
    """One call against ``store`` (mutated by ``kv_set``); ToolError when the call is invalid."""
    if name not in _PARAMS:
        raise ToolError(f"unknown tool {name!r}; tools: {sorted(_PARAMS)}")
    if not isinstance(arguments, dict):
        raise ToolError("arguments must be an object")
    spec = _PARAMS[name]
    missing = [k for k in spec["required"] if k not in arguments]
    extra = [k for k in arguments if k not in spec["properties"]]
    if missing or extra:
        raise ToolError(f"{name}: missing arguments {missing}, unexpected {extra}")
    if name == "calculator":
        expr = arguments["expression"]
        if not isinstance(expr, str) or len(expr) > 200:
            raise ToolError("expression must be a string of at most 200 characters")
        try:
            value = _arith(ast.parse(expr, mode="eval"))
        except SyntaxError:
            raise ToolError(f"cannot parse {expr!r}") from None
        except ZeroDivisionError:
            raise ToolError("division by zero") from None
        return {"result": _number(value)}
    if not isinstance(arguments["key"], str):
        raise ToolError("key must be a string")
    if name == "kv_get":
        if arguments["key"] not in store:
            return {"error": f"no value under {arguments['key']!r}"}  # a valid call; the key is absent
        return {"value": store[arguments["key"]]}
    store[arguments["key"]] = arguments["value"]
    return {"ok": True}


def parse_tool_calls(text: str) -> list[tuple[str | None, Any, str | None]]:
    """``(name, arguments, error)`` of each ``<tool_call>`` block after the reasoning of one turn."""
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    out = []
    for body in _CALL.findall(text):
        try:
            call = json.loads(body)
        except ValueError as e:
            out.append((None, None, f"tool call is not JSON: {e}"))
            continue
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            out.append((None, None, 'a tool call is {"name": ..., "arguments": {...}}'))
            continue
        args = call.get("arguments", {})
        if isinstance(args, str):  # OpenAI style: arguments as a JSON string
            try:
                args = json.loads(args)
            except ValueError:
                out.append((call["name"], None, "arguments are not JSON"))
                continue
        out.append((call["name"], args, None))
    return out


def split_transcript(text: str) -> list[tuple[str, str]]:
    """``(role, text)`` turns of a multi-turn completion as the stage scores it: the first assistant turn,
    then ``<|im_start|>{role}\\n...`` turns (the closing ``<|im_end|>`` and newlines dropped)."""
    parts = text.split("<|im_start|>")
    turns = [("assistant", parts[0])]
    for part in parts[1:]:
        role, _, body = part.partition("\n")
        turns.append((role.strip(), body))
    return [(r, t.split("<|im_end|>")[0]) for r, t in turns]


@register_environment("tools")
class ToolWorldEnv(Environment):
    """The calculator + key-value tool world (see the module doc)."""

    tools = TOOLS

    def __init__(self, invalid_penalty: float = 0.0):
        if invalid_penalty < 0:
            raise ValueError(f"invalid_penalty must be >= 0, got {invalid_penalty}")
        self.invalid_penalty = float(invalid_penalty)

    def new_state(self, sample: Mapping[str, Any] | None) -> dict:
        """The store at the start of an episode: a private copy of ``metadata.initial``."""
        return json.loads(json.dumps(((sample or {}).get("metadata") or {}).get("initial") or {}))

    def call_tool(self, state: dict, name: str, arguments: Any) -> dict:
        """One call against a live ``state`` (the Gym server's tool routes); errors as ``{"error": ...}``."""
        try:
            return run_tool(state, name, arguments)
        except ToolError as e:
            return {"error": str(e)}

    def _replay(self, sample: Mapping[str, Any] | None, turns: Sequence[str]):
        """Run every call of ``turns`` (assistant texts) from the initial store; per turn, the responses."""
        store = self.new_state(sample)
        responses, calls, invalid = [], 0, 0
        for text in turns:
            out = []
            for name, args, error in parse_tool_calls(text):
                calls += 1
                try:
                    if error:
                        raise ToolError(error)
                    out.append(run_tool(store, name, args))
                except ToolError as e:
                    invalid += 1
                    out.append({"error": str(e)})
            responses.append(out)
        return store, responses, calls, invalid

    def step(self, history, sample=None) -> Observation | None:
        turns = [m.get("content") or "" for m in history if m.get("role") == "assistant"]
        if not turns:
            return None
        _, responses, _, invalid = self._replay(sample, turns)
        if not responses[-1]:
            return None  # no call in the last turn: the episode is over
        return Observation([{"role": "tool", "content": json.dumps(r)} for r in responses[-1]],
                           info={"invalid_calls": sum("error" in r for r in responses[-1])})

    def verify(self, sample: Mapping[str, Any], completion: str) -> Verdict:
        meta = sample.get("metadata") or {}
        turns = [t for role, t in split_transcript(completion) if role == "assistant"]
        store, _, calls, invalid = self._replay(sample, turns)
        final = turns[-1]
        answered = "</think>" in final or "<think>" not in final
        final = final.rsplit("</think>", 1)[-1]
        final = _CALL.sub(" ", final)
        checks = {}
        gold = sample.get("answer")
        if gold not in (None, ""):
            words = set(_NUMBER.findall(final)) | set(re.findall(r"\w+", final.lower()))
            checks["answer_ok"] = float(answered and str(gold).lower() in words)
        expect = meta.get("expect_state") or {}
        if expect:
            checks["state_ok"] = sum(store.get(k) == v for k, v in expect.items()) / len(expect)
        if not checks:
            raise ValueError(f"{sample.get('where', 'tools sample')}: neither 'answer' nor metadata.expect_state to check")
        penalty = float(meta.get("invalid_penalty", self.invalid_penalty))
        reward = max(0.0, sum(checks.values()) / len(checks) - penalty * invalid)
        return Verdict(reward, {**checks, "tool_calls": float(calls), "invalid_calls": float(invalid),
                                "turns": float(len(turns))}, {"final_store": store})
