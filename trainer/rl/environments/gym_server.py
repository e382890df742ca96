"""``tandem serve-env``: tandem environments as a NeMo Gym style resources server (FastAPI + uvicorn).

    tandem serve-env --env math --env code --env tools --host 127.0.0.1 --port 8000
    app = make_app({"math": MathEnv()})            # the ASGI app, e.g. for your own uvicorn / tests

Routes (the protocol of :mod:`.gym`):

- ``POST /verify`` — a Gym ``BaseVerifyRequest``: ``responses_create_params``, ``response`` and task
  fields. The environment is the body's ``task`` field (default: the only one served, or ``--default``);
  the gold answer is ``answer`` or Gym's ``expected_answer``; ``metadata`` is passed through. The
  ``response`` output items become a tandem completion (:func:`.gym.response_to_completion`), scored by
  the dispatcher (its timeout; a failure or timeout scores 0). The answer is Gym's ``BaseVerifyResponse``:
  the request's fields plus ``reward`` and ``reward_components`` (the verdict's components); a verifier
  that failed or timed out gives ``reward: 0`` with ``mask_sample: true``, ``failure_kind``
  (``verifier_error`` / ``verifier_timeout``) and ``failure_reason``. A body that is not a verify request,
  or names an unknown task, is a 422 naming the field.
- ``POST /seed_session`` — starts a session for the tool routes: sets the ``tandem_session`` cookie and
  creates each served tool world's state from ``task_data.initial`` / ``initial`` (Gym's newer native body
  with ``resources_session_id`` is answered with that id, the older empty body with ``{}``).
- ``POST /close_session`` — drops the session's state (by ``resources_session_id`` or the cookie).
- ``POST /<tool>`` — one route per tool of a served environment that has tools (the ``tools`` world:
  ``/calculator``, ``/kv_get``, ``/kv_set``): the JSON body is the arguments, the answer the tool's result
  (``{"error": ...}`` for an invalid call), against the session's state.
- ``GET /`` — what is served (environments, tools).

Verification runs in worker threads (the dispatcher's ``thread`` backend), so the event loop keeps serving
while a code sandbox runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from typing import Any, Mapping

from fastapi import Body, FastAPI, HTTPException, Request, Response  # module level: FastAPI resolves annotations here

from .base import ENVIRONMENTS, Environment, ascore_batch
from .gym import response_to_completion, sample_from_request

__all__ = ["make_app", "serve_main", "RESERVED_ROUTES"]

RESERVED_ROUTES = frozenset({"verify", "seed_session", "close_session", "aggregate_metrics"})
COOKIE = "tandem_session"


def make_app(envs: Mapping[str, Environment], default_task: str | None = None, timeout_s: float = 30.0,
             max_workers: int = 8):
    """The FastAPI app serving ``envs`` (task name → environment instance)."""
    if not envs:
        raise ValueError("serve at least one environment")
    if default_task is None and len(envs) == 1:
        default_task = next(iter(envs))
    if default_task is not None and default_task not in envs:
        raise ValueError(f"default task {default_task!r} is not served; served: {sorted(envs)}")
    tool_owner: dict[str, str] = {}
    for task, env in envs.items():
        for tool in getattr(env, "tools", None) or []:
            name = tool.get("function", tool)["name"]
            if name in RESERVED_ROUTES or name in tool_owner:
                raise ValueError(f"tool {name!r} of {task!r} collides with a route of {tool_owner.get(name, 'the server')}")
            tool_owner[name] = task
    sessions: dict[str, dict[str, Any]] = {}  # session id -> task -> tool-world state
    app = FastAPI(title="tandem environments (NeMo Gym resources-server protocol)")

    @app.get("/")
    async def index():
        return {"environments": sorted(envs), "default_task": default_task, "tools": sorted(tool_owner)}

    @app.post("/seed_session")
    async def seed_session(response: Response, body: dict = Body(default_factory=dict)):
        sid = str(body.get("resources_session_id") or uuid.uuid4().hex)
        data = body.get("task_data") or body
        sessions[sid] = {task: envs[task].new_state({"metadata": {"initial": data.get("initial") or {}}})
                         for task in set(tool_owner.values())}
        response.set_cookie(COOKIE, sid)
        return {"resources_session_id": sid} if "resources_session_id" in body else {}

    @app.post("/close_session")
    async def close_session(request: Request, body: dict = Body(default_factory=dict)):
        sid = str(body.get("resources_session_id") or request.cookies.get(COOKIE) or "")
        sessions.pop(sid, None)
        return {"resources_session_id": sid} if "resources_session_id" in body else {}

    @app.post("/verify")
    async def verify(body: dict = Body(...)):
        for key in ("responses_create_params", "response"):
            if not isinstance(body.get(key), dict):
                raise HTTPException(422, f"verify request: field '{key}' must be an object")
        task = body.get("task", default_task)
        if task not in envs:
            raise HTTPException(422, f"verify request: field 'task' is {task!r}; served: {sorted(envs)}"
                                if task is not None else f"verify request: no 'task' field and no default; served: {sorted(envs)}")
        try:
            completion = response_to_completion(body["response"])
        except (AttributeError, TypeError) as e:
            raise HTTPException(422, f"verify request: field 'response' is not a Responses API object: {e}") from None
        sample = sample_from_request(body, task)
        (verdict,), _ = await ascore_batch([(sample, completion)], envs={task: envs[task]}, timeout_s=timeout_s,
                                           max_workers=max_workers)
        out = {**body, "reward": verdict.reward, "reward_components": verdict.components}
        if verdict.info.get("error") in ("timeout", "error"):
            out.update(mask_sample=True, failure_kind=f"verifier_{verdict.info['error']}",
                       failure_reason=verdict.info.get("message"))
        return json.loads(json.dumps(out, default=str))

    def tool_route(name: str, task: str):
        async def call(request: Request, body: dict = Body(default_factory=dict)):
            sid = request.cookies.get(COOKIE)
            if sid not in sessions:
                raise HTTPException(400, f"/{name}: no session; POST /seed_session first (cookie {COOKIE})")
            return envs[task].call_tool(sessions[sid][task], name, body)

        return call

    for name, task in tool_owner.items():
        app.post(f"/{name}")(tool_route(name, task))
    return app


def serve_main(argv: list[str]) -> int:
    """``tandem serve-env --env NAME [--env NAME ...] [--host H] [--port P]``; 0, or 2 on bad input."""

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            print(f"tandem serve-env: error: {message} (see --help)", file=sys.stderr)
            raise SystemExit(2)

    p = Parser(prog="tandem serve-env", description="Serve tandem environments as a NeMo Gym resources server.")
    p.add_argument("--env", action="append", required=True, metavar="NAME",
                   help=f"an environment to serve (repeatable); registered: {', '.join(sorted(ENVIRONMENTS))}")
    p.add_argument("--default", help="the task of requests without a 'task' field (default: the only one served)")
    p.add_argument("--options", default="{}", help='JSON {task: {constructor keyword: value}}, e.g. \'{"code": {"total_wall_s": 20}}\'')
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--timeout-s", type=float, default=30.0, help="per verification (scores 0 past it)")
    args = p.parse_args(argv)
    unknown = [e for e in args.env if e not in ENVIRONMENTS]
    if unknown:
        p.error(f"--env: no environment registered for {unknown}; registered: {sorted(ENVIRONMENTS)}")
    try:
        options = json.loads(args.options)
        if not isinstance(options, dict):
            raise ValueError("not an object")
    except ValueError as e:
        p.error(f"--options must be a JSON object of objects: {e}")
    try:
        envs = {e: ENVIRONMENTS[e](**dict(options.get(e) or {})) for e in args.env}
        app = make_app(envs, default_task=args.default, timeout_s=args.timeout_s)
    except Exception as e:  # noqa: BLE001 — a bad option or an environment that cannot start (no sandbox)
        p.error(f"{type(e).__name__}: {e}")
    import uvicorn

    print(f"tandem serve-env: {sorted(envs)} on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
