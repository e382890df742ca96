"""NeMo Gym interoperability, client side, and the protocol conversions both sides share.

NeMo Gym (github.com/NVIDIA-NeMo/Gym) makes environments *resources servers*: HTTP services whose
``POST /verify`` takes a ``BaseVerifyRequest`` — ``responses_create_params`` (the OpenAI Responses API
request: ``input`` messages, ``tools``), ``response`` (the Responses API object the policy produced:
``output`` items of type ``message`` / ``reasoning`` / ``function_call`` / ``function_call_output``) and
the task's own fields (``expected_answer``, ...) at the top level — and answers a ``BaseVerifyResponse``:
the same fields plus ``reward`` (and optionally ``reward_components``, ``mask_sample``, ``failure_kind``,
``failure_reason``). ``POST /seed_session`` starts a session; tools are ``POST /<tool_name>`` routes.

**Client** (:class:`GymEnv`, task ``gym``): scores a completion by POSTing it to a Gym resources server.
A prompt row names the server and carries the task fields Gym's dataset row had::

    {"messages": [{"role": "user", "content": "What is 6*7?"}], "task": "gym", "answer": "42",
     "metadata": {"server": "math", "fields": {"expected_answer": "42"}}}

configured per run as ``stage.grpo.environments=[{task: gym, options: {servers: {math: http://host:8000}}}]``
(``server`` may be omitted when one server is configured). Each call: at most ``max_concurrency`` requests
in flight (per event loop), ``timeout_s`` per attempt, ``retries`` more attempts with exponential backoff
on connection errors, timeouts, 429 and 5xx (other 4xx are the request's fault: no retry); a call that
still fails raises, and the dispatcher scores it 0 and counts it. A reply with ``mask_sample: true`` keeps
its reward (Gym's meaning: the environment, not the policy, failed) and is flagged in ``info``.
httpx is used because the dispatcher's async path awaits it natively (``averify``).

**Conversions** (:func:`completion_to_response`, :func:`response_to_completion`): a tandem completion text
(``<think>…</think>`` reasoning, the answer, ``<tool_call>`` blocks and, for multi-turn episodes, tool
responses in user turns) maps to Responses API output items and back; the round trip is exact for texts
in the chat template's canonical form.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from typing import Any, Mapping

from .base import Environment, Verdict, register_environment
from .tools import parse_tool_calls, split_transcript

__all__ = ["GymEnv", "completion_to_response", "response_to_completion", "sample_to_create_params",
           "sample_from_request", "RETRY_STATUS"]

RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def _split_think(text: str) -> tuple[str | None, str]:
    """``(reasoning or None, rest)`` of one assistant turn's text."""
    if text.startswith("<think>") and "</think>" in text:
        head, rest = text[len("<think>"):].split("</think>", 1)
        return (head.strip() or None), rest
    return None, text


def completion_to_response(completion: str, model: str = "tandem") -> dict:
    """A Responses API ``response`` object for a tandem completion (single- or multi-turn)."""
    output, calls = [], []
    for role, text in split_transcript(completion):
        if role == "assistant":
            reasoning, rest = _split_think(text)
            if reasoning:
                output.append({"type": "reasoning", "id": _id("rs"), "summary": [{"type": "summary_text", "text": reasoning}]})
            body = rest.split("<tool_call>", 1)[0].strip()
            if body:
                output.append({"type": "message", "id": _id("msg"), "role": "assistant", "status": "completed",
                               "content": [{"type": "output_text", "text": body, "annotations": []}]})
            for name, args, error in parse_tool_calls(rest):
                call_id = _id("call")
                calls.append(call_id)
                output.append({"type": "function_call", "id": _id("fc"), "call_id": call_id, "name": name or "",
                               "arguments": json.dumps(args) if error is None else "", "status": "completed"})
        else:
            for chunk in text.split("<tool_response>")[1:]:
                out = chunk.split("</tool_response>", 1)[0].strip("\n")
                output.append({"type": "function_call_output", "call_id": calls.pop(0) if calls else _id("call"),
                               "output": out})
    return {"id": _id("resp"), "object": "response", "created_at": int(time.time()), "model": model,
            "output": output, "parallel_tool_calls": True, "tool_choice": "auto", "tools": []}


def response_to_completion(response: Mapping[str, Any]) -> str:
    """The tandem completion text of a Responses API object (the inverse of :func:`completion_to_response`)."""
    turns: list[dict] = [{"reasoning": None, "text": "", "calls": []}]
    pending_outputs: list[str] = []

    def flush_outputs():
        if pending_outputs:
            turns.append({"tool": list(pending_outputs)})
            turns.append({"reasoning": None, "text": "", "calls": []})
            pending_outputs.clear()

    for item in response.get("output") or []:
        kind = item.get("type")
        if kind == "function_call_output":
            pending_outputs.append(str(item.get("output", "")))
            continue
        flush_outputs()
        turn = turns[-1]
        if kind == "reasoning":
            parts = item.get("summary") or item.get("content") or []
            turn["reasoning"] = "\n".join(p.get("text", "") for p in parts if isinstance(p, dict))
        elif kind == "message" and item.get("role", "assistant") == "assistant":
            content = item.get("content")
            texts = [content] if isinstance(content, str) else [c.get("text", "") for c in content or []
                                                                 if isinstance(c, dict) and c.get("type") in ("output_text", "text")]
            turn["text"] = (turn["text"] + "\n" if turn["text"] else "") + "".join(texts)
        elif kind == "function_call":
            try:
                args = json.loads(item.get("arguments") or "{}")
            except ValueError:
                args = item.get("arguments")
            turn["calls"].append({"name": item.get("name"), "arguments": args})
    flush_outputs()
    if turns[-1] == {"reasoning": None, "text": "", "calls": []} and len(turns) > 1:
        turns.pop()
    out = []
    for t in turns:
        if "tool" in t:
            out.append("<|im_end|>\n<|im_start|>user\n" + "\n".join(f"<tool_response>\n{o}\n</tool_response>" for o in t["tool"])
                       + "<|im_end|>\n<|im_start|>assistant\n")
            continue
        head = f"<think>\n{t['reasoning']}\n</think>\n" if t["reasoning"] else "<think></think>"
        body = t["text"].strip()
        for j, c in enumerate(t["calls"]):
            body += ("\n" if body or j else "") + "<tool_call>\n" + json.dumps(c) + "\n</tool_call>"
        out.append(head + body)
    return "".join(out)


def sample_to_create_params(sample: Mapping[str, Any], tools: list | None = None) -> dict:
    """``responses_create_params`` of a prompt record: its messages as ``input`` (and function tools)."""
    messages = sample.get("messages") or [{"role": "user", "content": sample.get("prompt", "")}]
    params: dict[str, Any] = {"input": [{"role": m["role"], "content": m["content"]} for m in messages]}
    if tools:
        params["tools"] = [{"type": "function", **t.get("function", t)} for t in tools]
    return params


def sample_from_request(body: Mapping[str, Any], task: str) -> dict:
    """The tandem ``sample`` of a Gym verify request: ``task``, ``answer`` (or Gym's ``expected_answer``),
    ``metadata`` and the ``input`` messages."""
    inp = (body.get("responses_create_params") or {}).get("input")
    sample: dict[str, Any] = {"task": task, "where": "gym /verify request",
                              "answer": body.get("answer", body.get("expected_answer", "")),
                              "metadata": dict(body.get("metadata") or {})}
    if isinstance(inp, str):
        sample["prompt"] = inp
    elif isinstance(inp, list):
        sample["messages"] = [{"role": m.get("role", "user"), "content": m.get("content") if isinstance(m.get("content"), str)
                               else "".join(c.get("text", "") for c in m.get("content") or [] if isinstance(c, dict))}
                              for m in inp if isinstance(m, dict)]
    return sample


class _Transient(Exception):
    pass


@register_environment("gym")
class GymEnv(Environment):
    """A NeMo Gym resources server as a tandem environment (see the module doc)."""

    def __init__(self, servers: Mapping[str, str] | str | None = None, timeout_s: float = 10.0, retries: int = 2,
                 backoff_s: float = 0.25, max_concurrency: int = 16, seed_session: bool = False,
                 transport=None):
        if isinstance(servers, str):
            servers = {"default": servers}
        self.servers = {k: str(v).rstrip("/") for k, v in (servers or {}).items()}
        if not self.servers:
            raise ValueError("the gym environment needs options.servers: {name: url} (or one url)")
        bad = {k: v for k, v in self.servers.items() if not v.startswith(("http://", "https://"))}
        if bad:
            raise ValueError(f"gym servers must be http(s) URLs, got {bad}")
        if timeout_s <= 0 or retries < 0 or backoff_s < 0 or max_concurrency < 1:
            raise ValueError("gym options: need timeout_s > 0, retries >= 0, backoff_s >= 0, max_concurrency >= 1")
        self.timeout_s, self.retries, self.backoff_s = float(timeout_s), int(retries), float(backoff_s)
        self.max_concurrency, self.seed_session = int(max_concurrency), bool(seed_session)
        self.transport = transport  # an httpx transport (tests: httpx.MockTransport)
        self._loops: dict[int, tuple[Any, Any, asyncio.Semaphore]] = {}

    def __getstate__(self):  # clients and semaphores belong to an event loop: never pickled
        state = dict(self.__dict__)
        state["_loops"] = {}
        return state

    def _client(self):
        import httpx

        loop = asyncio.get_running_loop()
        entry = self._loops.get(id(loop))
        if entry is None or entry[0] is not loop:
            self._loops = {k: v for k, v in self._loops.items() if not v[0].is_closed()}
            client = httpx.AsyncClient(timeout=self.timeout_s, transport=self.transport)
            entry = self._loops[id(loop)] = (loop, client, asyncio.Semaphore(self.max_concurrency))
        return entry[1], entry[2]

    def _url(self, sample: Mapping[str, Any]) -> str:
        name = (sample.get("metadata") or {}).get("server")
        if name is None:
            if len(self.servers) != 1:
                raise ValueError(f"{sample.get('where', 'gym sample')}: metadata.server must name one of {sorted(self.servers)}")
            return next(iter(self.servers.values()))
        if name not in self.servers:
            raise ValueError(f"{sample.get('where', 'gym sample')}: metadata.server {name!r} is not configured; "
                             f"servers: {sorted(self.servers)}")
        return self.servers[name]

    async def _post(self, client, url: str, body: dict, cookies=None):
        import httpx

        for attempt in range(self.retries + 1):
            try:
                r = await client.post(url, json=body, cookies=cookies)
                if r.status_code in RETRY_STATUS:
                    raise _Transient(f"HTTP {r.status_code} from {url}: {r.text[:200]}")
                if r.status_code >= 400:
                    raise RuntimeError(f"HTTP {r.status_code} from {url}: {r.text[:300]}")
                return r
            except (httpx.TransportError, _Transient) as e:
                if attempt == self.retries:
                    raise RuntimeError(f"{url}: failed after {attempt + 1} attempts: {type(e).__name__}: {e}") from None
                await asyncio.sleep(self.backoff_s * (2 ** attempt) * (0.5 + random.random()))

    async def averify(self, sample: Mapping[str, Any], completion: str) -> Verdict:
        base = self._url(sample)
        meta = sample.get("metadata") or {}
        body = {"responses_create_params": sample_to_create_params(sample, meta.get("tools")),
                "response": completion_to_response(completion), **dict(meta.get("fields") or {})}
        client, sem = self._client()
        async with sem:
            cookies = None
            if self.seed_session:
                seeded = await self._post(client, f"{base}/seed_session", {})
                cookies = seeded.cookies
            reply = (await self._post(client, f"{base}/verify", body, cookies=cookies)).json()
        if not isinstance(reply, dict) or "reward" not in reply:
            raise ValueError(f"{base}/verify answered without a 'reward': {str(reply)[:200]}")
        comps = reply.get("reward_components") or {}
        info = {k: reply[k] for k in ("mask_sample", "failure_kind", "failure_reason") if reply.get(k) is not None}
        return Verdict(float(reply["reward"]), {str(k): float(v) for k, v in comps.items()}, {"server": base, **info})
