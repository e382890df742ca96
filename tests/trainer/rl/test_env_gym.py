"""NeMo Gym interoperability: tandem's environments served by ``make_app`` on a real uvicorn server and
called by the ``gym`` client environment (the round trip), recorded requests / responses that follow Gym's
published models, conversions between completions and Responses API objects, retries, timeouts,
the concurrency limit, tool routes with sessions, and ``tandem serve-env``'s bad input.

(The ``nemo-gym`` package itself needs Python >= 3.12; this project's 3.11 cannot import its server
classes, so the protocol is checked against JSON Schemas of its models, below.)"""

import asyncio
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import jsonschema
import pytest

from tandem.trainer.rl.environments import score_batch
from tandem.trainer.rl.environments.gym import GymEnv, completion_to_response, response_to_completion
from tandem.trainer.rl.environments.gym_server import make_app, serve_main
from tandem.trainer.rl.environments.instructions import InstructionsEnv
from tandem.trainer.rl.environments.math import MathEnv
from tandem.trainer.rl.environments.structured import StructuredEnv
from tandem.trainer.rl.environments.tools import ToolWorldEnv

EXAMPLES = Path(__file__).parent / "gym_examples"

# JSON Schemas of Gym's pydantic models (nemo_gym.base_resources_server / openai_utils): required fields, types
RESPONSE_OBJECT = {"type": "object", "required": ["id", "created_at", "model", "object", "output", "parallel_tool_calls",
                                                   "tool_choice", "tools"],
                   "properties": {"object": {"const": "response"}, "output": {"type": "array", "items": {
                       "type": "object", "required": ["type"],
                       "properties": {"type": {"enum": ["message", "reasoning", "function_call", "function_call_output"]}}}}}}
VERIFY_REQUEST = {"type": "object", "required": ["responses_create_params", "response"],
                  "properties": {"responses_create_params": {"type": "object", "required": ["input"]},
                                 "response": RESPONSE_OBJECT}}
VERIFY_RESPONSE = {"allOf": [VERIFY_REQUEST, {"type": "object", "required": ["reward"], "properties": {
    "reward": {"type": "number"}, "reward_components": {"type": "object", "additionalProperties": {"type": "number"}},
    "mask_sample": {"type": "boolean"}, "failure_kind": {"type": ["string", "null"]},
    "failure_reason": {"type": ["string", "null"]}}}]}

ENVS = {"math": MathEnv(), "instructions": InstructionsEnv(), "structured": StructuredEnv(), "tools": ToolWorldEnv()}


@pytest.fixture(scope="module")
def server():
    """make_app on a real uvicorn server on a free localhost port (in a thread)."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(make_app(ENVS, timeout_s=10), log_level="warning"))
    th = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert time.monotonic() < deadline and th.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    th.join(10)
    sock.close()


TOOL_TEXT = ('<think></think>Computing.\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "17*23"}}\n</tool_call>'
             '<|im_end|>\n<|im_start|>user\n<tool_response>\n{"result": 391}\n</tool_response><|im_end|>\n<|im_start|>assistant\n'
             '<think></think><tool_call>\n{"name": "kv_set", "arguments": {"key": "result", "value": 391}}\n</tool_call>'
             '<|im_end|>\n<|im_start|>user\n<tool_response>\n{"ok": true}\n</tool_response><|im_end|>\n<|im_start|>assistant\n'
             '<think></think>The value is 391.')


@pytest.mark.parametrize("text", [
    "<think></think>The answer is 42.",
    "<think>\nsix times seven\n</think>\nIt is \\boxed{42}.",
    TOOL_TEXT,
])
def test_completion_response_round_trip(text):
    resp = completion_to_response(text)
    jsonschema.validate(resp, RESPONSE_OBJECT)
    assert response_to_completion(resp) == text


# (task, sample fields, completion): right and wrong answers of four environments
CASES = [
    ("math", {"answer": "42"}, "<think></think>So \\boxed{42}."),
    ("math", {"answer": "42"}, "<think></think>So \\boxed{41}."),
    ("instructions", {"metadata": {"constraints": [{"type": "case", "mode": "lower"}, {"type": "words", "max": 3}]}},
     "<think></think>all lower here"),
    ("instructions", {"metadata": {"constraints": [{"type": "case", "mode": "lower"}, {"type": "words", "max": 3}]}},
     "<think></think>Not All Lower, And Long"),
    ("structured", {"metadata": {"schema": {"type": "object", "required": ["a"]}}}, '<think></think>{"a": 1}'),
    ("structured", {"metadata": {"schema": {"type": "object", "required": ["a"]}}}, "<think></think>{oops"),
    ("tools", {"answer": "391", "metadata": {"expect_state": {"result": 391}}}, TOOL_TEXT),
]


def _gym_sample(task, fields, server="local"):
    tandem_fields = {"task": task, "answer": fields.get("answer", ""), "metadata": fields.get("metadata", {})}
    return {"task": "gym", "answer": fields.get("answer", ""), "prompt": f"a {task} prompt",
            "metadata": {"server": server, "fields": tandem_fields}}


def test_round_trip_through_a_real_server(server):
    """The gym client environment, calling tandem's environments served over HTTP, gives each completion
    exactly the reward and components the environment gives it in process."""
    client = GymEnv(servers={"local": server}, timeout_s=10, max_concurrency=4)
    pairs = [(_gym_sample(t, f), c) for t, f, c in CASES]
    verdicts, stats = score_batch(pairs, envs={"gym": client}, timeout_s=20)
    assert stats.errors == 0 and stats.timeouts == 0, stats.first_errors
    direct = [ENVS[t].verify({"task": t, "answer": f.get("answer", ""), "metadata": f.get("metadata", {})}, c)
              for t, f, c in CASES]
    assert [v.reward for v in verdicts] == [d.reward for d in direct]
    assert [v.components for v in verdicts] == [d.components for d in direct]
    assert [v.reward for v in verdicts] == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    # a second batch (a new event loop): the client makes itself a new connection pool
    again, _ = score_batch(pairs[:2], envs={"gym": client}, timeout_s=20)
    assert [v.reward for v in again] == [1.0, 0.0]


@pytest.mark.parametrize("name, reward", [("verify_request_math.json", 1.0), ("verify_request_tool_call.json", 1.0)])
def test_recorded_gym_requests(server, name, reward):
    body = json.loads((EXAMPLES / name).read_text())
    jsonschema.validate(body, VERIFY_REQUEST)
    r = httpx.post(f"{server}/verify", json=body, timeout=20)
    assert r.status_code == 200, r.text
    out = r.json()
    jsonschema.validate(out, VERIFY_RESPONSE)
    assert {k: out[k] for k in body} == body  # every request field comes back unchanged
    assert out["reward"] == reward and "mask_sample" not in out


def test_bad_verify_requests_are_422(server):
    body = json.loads((EXAMPLES / "verify_request_math.json").read_text())
    r = httpx.post(f"{server}/verify", json={**body, "task": "chess"}, timeout=10)
    assert r.status_code == 422 and "field 'task' is 'chess'" in r.text
    r = httpx.post(f"{server}/verify", json={"response": body["response"]}, timeout=10)
    assert r.status_code == 422 and "responses_create_params" in r.text
    no_task = dict(body)
    no_task.pop("task")
    assert httpx.post(f"{server}/verify", json=no_task, timeout=10).status_code == 422  # several served: no default


def test_verifier_failure_is_masked_not_a_500(server):
    body = json.loads((EXAMPLES / "verify_request_math.json").read_text())
    bad = {**body, "task": "structured", "metadata": {"schema": {"type": "nonsense"}}}
    out = httpx.post(f"{server}/verify", json=bad, timeout=10).json()
    assert out["reward"] == 0.0 and out["mask_sample"] is True and out["failure_kind"] == "verifier_error"
    assert "not a valid JSON Schema" in out["failure_reason"]


def test_tool_routes_keep_session_state(server):
    with httpx.Client(base_url=server, timeout=10) as c:
        assert c.post("/calculator", json={"expression": "1+1"}).status_code == 400  # no session yet
        seeded = c.post("/seed_session", json={"resources_session_id": "s1", "task_data": {"initial": {"x": 5}}})
        assert seeded.json() == {"resources_session_id": "s1"}
        assert c.post("/kv_get", json={"key": "x"}).json() == {"value": 5}
        assert c.post("/calculator", json={"expression": "17*23"}).json() == {"result": 391}
        assert c.post("/kv_set", json={"key": "r", "value": 391}).json() == {"ok": True}
        assert c.post("/kv_get", json={"key": "r"}).json() == {"value": 391}
        assert "error" in c.post("/calculator", json={"expression": "open('/etc')"}).json()
        assert c.post("/close_session", json={"resources_session_id": "s1"}).json() == {"resources_session_id": "s1"}
        assert c.post("/kv_get", json={"key": "r"}).status_code == 400  # closed
    with httpx.Client(base_url=server, timeout=10) as other:  # another session starts from its own state
        assert other.post("/seed_session", json={}).json() == {}
        assert "error" in other.post("/kv_get", json={"key": "r"}).json()
    assert httpx.get(f"{server}/").json()["tools"] == ["calculator", "kv_get", "kv_set"]


def test_client_reads_a_recorded_gym_response():
    recorded = json.loads((EXAMPLES / "verify_response_math.json").read_text())
    jsonschema.validate(recorded, VERIFY_RESPONSE)
    seen = []

    def handler(request):
        seen.append(json.loads(request.content))
        return httpx.Response(200, json=recorded)

    env = GymEnv(servers="http://gym.invalid:9", transport=httpx.MockTransport(handler))
    sample = {"task": "gym", "answer": "42", "messages": [{"role": "user", "content": "What is 6 times 7?"}],
              "metadata": {"fields": {"expected_answer": "42"}}}
    (v,), stats = score_batch([(sample, "<think>\nmultiply\n</think>\n42")], envs={"gym": env})
    assert stats.errors == 0 and v.reward == 1.0 and v.components == {"correctness": 1.0, "format": 0.0}
    jsonschema.validate(seen[0], VERIFY_REQUEST)
    assert seen[0]["expected_answer"] == "42" and seen[0]["responses_create_params"]["input"][0]["content"] == "What is 6 times 7?"
    assert [o["type"] for o in seen[0]["response"]["output"]] == ["reasoning", "message"]


def test_retries_timeouts_and_concurrency():
    sample = {"task": "gym", "answer": "", "prompt": "p", "metadata": {}}
    attempts = []

    def flaky(request):
        attempts.append(1)
        return httpx.Response(503, text="busy") if len(attempts) < 3 else httpx.Response(200, json={"reward": 0.5})

    env = GymEnv(servers="http://x.invalid", retries=2, backoff_s=0.01, transport=httpx.MockTransport(flaky))
    (v,), stats = score_batch([(sample, "hi")], envs={"gym": env})
    assert v.reward == 0.5 and len(attempts) == 3 and stats.errors == 0

    attempts.clear()
    env = GymEnv(servers="http://x.invalid", retries=1, backoff_s=0.01,
                 transport=httpx.MockTransport(lambda r: attempts.append(1) or httpx.Response(400, text="bad body")))
    (v,), stats = score_batch([(sample, "hi")], envs={"gym": env})
    assert stats.errors == 1 and len(attempts) == 1 and "HTTP 400" in stats.first_errors[0]  # no retry on 4xx

    def down(request):
        attempts.append(1)
        raise httpx.ConnectTimeout("timed out", request=request)

    attempts.clear()
    env = GymEnv(servers="http://x.invalid", retries=2, backoff_s=0.01, transport=httpx.MockTransport(down))
    (v,), stats = score_batch([(sample, "hi")], envs={"gym": env})
    assert v.reward == 0.0 and stats.errors == 1 and len(attempts) == 3 and "after 3 attempts" in stats.first_errors[0]

    live, peak = [0], [0]

    async def slow(request):
        live[0] += 1
        peak[0] = max(peak[0], live[0])
        await asyncio.sleep(0.05)
        live[0] -= 1
        return httpx.Response(200, json={"reward": 1.0})

    env = GymEnv(servers="http://x.invalid", max_concurrency=2, transport=httpx.MockTransport(slow))
    verdicts, stats = score_batch([(sample, "hi")] * 8, envs={"gym": env}, max_workers=8)
    assert [v.reward for v in verdicts] == [1.0] * 8 and peak[0] == 2


def test_client_and_cli_bad_input():
    with pytest.raises(ValueError, match="needs options.servers"):
        GymEnv()
    with pytest.raises(ValueError, match="http"):
        GymEnv(servers={"a": "ftp://x"})
    env = GymEnv(servers={"a": "http://a", "b": "http://b"})
    with pytest.raises(ValueError, match="metadata.server must name one of"):
        env._url({"metadata": {}})
    with pytest.raises(ValueError, match="'c' is not configured"):
        env._url({"metadata": {"server": "c"}})
    for argv, msg in ((["--env", "chess"], "no environment registered"), (["--env", "gym"], "needs options.servers"),
                      (["--env", "math", "--options", "[1]"], "JSON object")):
        with pytest.raises(SystemExit) as e:
            serve_main(argv)
        assert e.value.code == 2


def test_stage_refuses_an_environment_that_cannot_start(tmp_path):
    """A configured environment is created when the GRPO stage starts: bad options (a gym environment
    without servers) or a bad max_turns stop the start naming the key (ConfigError: exit status 2)."""
    from tandem.trainer.config import ConfigError
    from tandem.trainer.run import validate
    from tandem.trainer.stages import GRPOStage

    from ..conftest import compose_recipe

    rows = tmp_path / "gym.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"6*7? ({i})", "task": "gym", "answer": "42"}) + "\n" for i in range(5)))
    base = ["model.preset=tiny", "model.init_from=null", f"data.rl.train=[{rows}]", f"run.dir={tmp_path / 'r'}"]
    cfg = compose_recipe("grpo", base)
    with pytest.raises(ConfigError, match="environment 'gym' cannot start: ValueError: the gym environment needs options.servers"):
        GRPOStage(cfg.data, cfg.stage)
    cfg = compose_recipe("grpo", [*base, "stage.grpo.environments=[{task: gym, options: {servers: 'http://h:1'}}]"])
    assert GRPOStage(cfg.data, cfg.stage).envs["gym"].servers == {"default": "http://h:1"}
    with pytest.raises(ConfigError, match=r"stage.grpo.environments.0.max_turns must be >= 1"):
        validate(compose_recipe("grpo", [*base, "stage.grpo.environments=[{task: gym, max_turns: 0}]"]))
