"""Rollout back-ends (trainer/inference/backends.py): the ``engine`` back-end through the registry is the
engine itself; the ``vllm`` back-end's mappings (sampling parameters → vLLM request arguments, vLLM outputs →
GenerationResult, HF-key weight streaming for the refit) and its refit / offload / generate sequence against a
stand-in ``vllm`` module; the config refusals at start; the real vLLM path where vllm and CUDA exist."""

import importlib.util
import json
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tandem.data_pipelines import rl_synthetic
from tandem.model import HybridConfig, HybridLM
from tandem.model.checkpoint_io import checkpoint_items
from tandem.trainer.config import ConfigError
from tandem.trainer.inference import vllm_backend as vb
from tandem.trainer.inference.backends import ROLLOUT_BACKENDS, EngineBackend, build_backend
from tandem.trainer.inference.engine import GenerationEngine, SamplingParams, ThinkTokens
from tandem.trainer.parallel import DistInfo
from tandem.trainer.stages import GRPOStage

from .conftest import compose_recipe, run_cli

RUN = ["model.preset=tiny", "model.init_from=null", "data.seq_len=64", "stage.steps=1", "stage.micro_batch=2",
       "stage.eval_every=0", "stage.eval_batches=0", "stage.save_every=0", "stage.grpo.prompts_per_step=2",
       "stage.grpo.generations_per_prompt=2", "stage.grpo.max_new_tokens=4", "logger.progress_bar=false"]
PROMPTS = [[5, 9, 2, 7], [3, 3], [8, 1, 4, 4, 6, 2]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return HybridLM(HybridConfig.preset("tiny")).eval()


@pytest.fixture(scope="module")
def rl_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("rl") / "train.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rl_synthetic.prompts(16, seed=0)))
    return p


def _fields(results):
    return [(r.tokens, r.logprobs, r.forced, r.finish_reason, r.stop_token, r.reasoning_tokens) for r in results]


# --- engine back-end --------------------------------------------------------------------------------
def test_engine_backend_through_the_registry_is_the_engine(model):
    assert {"engine", "vllm"} <= set(ROLLOUT_BACKENDS)
    backend = build_backend("engine", model, max_batch=2, max_len=64)
    assert isinstance(backend, EngineBackend) and backend.engine.model is model
    params = SamplingParams(max_new_tokens=6, temperature=0.9, top_p=0.8, seed=3, stop_token_ids=(11,))
    backend.refit(model)  # no-ops: the engine reads the live parameters
    got = backend.generate(PROMPTS, params)
    backend.offload()
    want = GenerationEngine(model, max_batch=2).generate(PROMPTS, params)
    assert _fields(got) == _fields(want)
    assert len({tuple(r.tokens) for r in got}) > 1  # sampled, not a constant


def test_grpo_stage_generates_through_the_configured_backend(rl_file):
    cfg = compose_recipe("grpo", [*RUN, f"data.rl.train=[{rl_file}]", "run.dir=unused"])
    stage = GRPOStage(cfg.data, cfg.stage)
    m = HybridLM(HybridConfig.preset("tiny"))
    stage.bind(m, DistInfo(0, 1, 0, torch.device("cpu")))
    assert isinstance(stage.backend, EngineBackend) and stage.engine is stage.backend.engine and stage.engine.model is m


# --- vllm back-end: pure mappings -----------------------------------------------------------------
def test_logprobs_mode_matches_the_engine_rule_or_refuses():
    assert vb.logprobs_mode(1.0, 0.9, top_k=5, greedy=True) == "raw_logprobs"  # log_softmax(logits) at T = 1
    assert vb.logprobs_mode(0.7, 1.0) == "processed_logprobs"  # after temperature, nothing renormalised
    for kw in ({"top_p": 0.9}, {"top_p": 1.0, "top_k": 4}, {"top_p": 1.0, "greedy": True}):
        with pytest.raises(ValueError):
            vb.logprobs_mode(0.7, **kw)


def test_sampling_params_map_to_vllm_request_kwargs():
    p = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=7, seed=5, stop_token_ids=(2, 3))
    kws = vb.sampling_kwargs(p, "raw_logprobs", 3)
    assert len(kws) == 3
    k = kws[0]
    assert (k["n"], k["max_tokens"], k["temperature"], k["top_p"], k["top_k"]) == (1, 12, 1.0, 0.9, 7)
    assert k["stop_token_ids"] == [2, 3] and k["ignore_eos"] and k["logprobs"] == 0 and not k["detokenize"]
    seeds = [k["seed"] for k in kws]
    assert len(set(seeds)) == 3 and seeds == [k["seed"] for k in vb.sampling_kwargs(p, "raw_logprobs", 3)]
    assert seeds != [k["seed"] for k in vb.sampling_kwargs(SamplingParams(seed=6, top_p=0.9), "raw_logprobs", 3)]
    assert all(k["seed"] is None for k in vb.sampling_kwargs(SamplingParams(), "raw_logprobs", 2))
    g = vb.sampling_kwargs(SamplingParams(greedy=True, top_p=0.5), "raw_logprobs", 1)[0]
    assert (g["temperature"], g["top_p"], g["top_k"]) == (0.0, 1.0, -1)
    assert vb.sampling_kwargs(SamplingParams(temperature=0.5), "processed_logprobs", 1)[0]["temperature"] == 0.5
    for bad, mode in ((SamplingParams(thinking_budget=4), "raw_logprobs"), (SamplingParams(temperature=0.5), "raw_logprobs"),
                      (SamplingParams(temperature=0.5, top_p=0.9), "processed_logprobs"),
                      (SamplingParams(greedy=True), "processed_logprobs"), (SamplingParams(), "raw_logits")):
        with pytest.raises(ValueError):
            vb.sampling_kwargs(bad, mode, 1)


class _Logprob:  # vllm.sequence.Logprob's fields the mapping reads
    def __init__(self, logprob):
        self.logprob, self.rank, self.decoded_token = logprob, 1, None


def _vllm_like(result, stop_ids):
    """The CompletionOutput vLLM returns for what the engine generated (logprobs=0: the chosen token only)."""
    stopped = result.finish_reason == "stop"
    return SimpleNamespace(token_ids=tuple(result.tokens), logprobs=[{t: _Logprob(lp)} for t, lp in zip(result.tokens, result.logprobs)],
                           finish_reason="stop" if stopped else "length", stop_reason=result.stop_token if stopped else None)


def test_vllm_outputs_map_to_the_engines_results(model):
    think = ThinkTokens(think_start=20, think_end=21, newline_ids=frozenset({22}), newline=(22,))
    prompts = [[20, *p] for p in PROMPTS] * 4  # reasoning open in the prompt: reasoning_tokens counted
    free = GenerationEngine(model, max_batch=4).generate(prompts, SamplingParams(max_new_tokens=10, seed=1))
    stop = (free[0].tokens[3], 10_000)  # a token row 0 samples: it stops there (or before), others run to length
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=1, stop_token_ids=stop)
    want = GenerationEngine(model, max_batch=4).generate(prompts, params, think_ids=think)
    reasons = {r.finish_reason for r in want}
    assert reasons == {"stop", "length"}, reasons  # both paths of the mapping are exercised
    got = [vb.to_result(p, _vllm_like(r, stop), stop, think) for p, r in zip(prompts, want)]
    assert _fields(got) == _fields(want) and [r.prompt_ids for r in got] == prompts
    assert any(r.reasoning_tokens for r in got)
    stop = (13, 17)
    plain = SimpleNamespace(token_ids=[4, 5], logprobs=[{4: -0.5}, {5: -1.5}], finish_reason="length", stop_reason=None)
    assert vb.to_result([1], plain, stop).logprobs == [-0.5, -1.5]
    for bad in (SimpleNamespace(token_ids=[4, 13], logprobs=[{4: 0.0}, {13: 0.0}], finish_reason="stop", stop_reason="</s>"),
                SimpleNamespace(token_ids=[4, 5], logprobs=[{4: 0.0}, {5: 0.0}], finish_reason="stop", stop_reason=13),
                SimpleNamespace(token_ids=[4, 5], logprobs=None, finish_reason="length", stop_reason=None)):
        with pytest.raises(ValueError):
            vb.to_result([1], bad, stop)
    with pytest.raises(RuntimeError, match="abort"):
        vb.to_result([1], SimpleNamespace(token_ids=[4], logprobs=[{4: 0.0}], finish_reason="abort", stop_reason=None), stop)


def test_refit_streams_hf_keys_one_view_at_a_time(model):
    items = vb.hf_weights(model)
    assert isinstance(items, types.GeneratorType)  # lazy: one tensor at a time
    got = list(items)
    want = list(checkpoint_items(model.state_dict()))  # the keys save_pretrained writes
    assert [k for k, _ in got] == [k for k, _ in want] and any(".experts.0.up_proj.weight" in k for k, _ in got)
    storages = {p.untyped_storage().data_ptr() for p in model.state_dict().values()}
    for (_, a), (_, b) in zip(got, want):
        assert torch.equal(a, b) and a.untyped_storage().data_ptr() in storages  # views of the model, no copy


# --- vllm back-end: refit / offload / generate against a stand-in vllm module --------------------
class _FakeLLM:
    """What VLLMBackend calls on vllm.LLM, recorded; the 'model' is a dict filled by load_weights."""

    def __init__(self, **kwargs):
        self.kwargs, self.calls, self.weights = kwargs, [], {}
        runner = SimpleNamespace(model=SimpleNamespace(load_weights=self._load))
        self.worker = SimpleNamespace(model_runner=runner)

    def _load(self, weights):
        for k, t in weights:
            self.weights[k] = t.clone()
        self.calls.append("load")

    def collective_rpc(self, fn):
        return [fn(self.worker)]

    def sleep(self, level):
        self.calls.append(f"sleep{level}")

    def wake_up(self, tags=None):
        self.calls.append(f"wake:{','.join(tags)}")

    def reset_prefix_cache(self):
        self.calls.append("reset")

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.calls.append("generate")
        out = []
        for p, sp in zip(prompts, sampling_params):
            toks = [p["prompt_token_ids"][-1], sp.kw["stop_token_ids"][0]]
            out.append(SimpleNamespace(outputs=[SimpleNamespace(token_ids=toks, logprobs=[{t: _Logprob(-1.0)} for t in toks],
                                                                finish_reason="stop", stop_reason=toks[-1])]))
        return out


def test_vllm_backend_refits_offloads_and_generates(model, monkeypatch):
    fake = types.ModuleType("vllm")
    fake.LLM = _FakeLLM
    fake.SamplingParams = lambda **kw: SimpleNamespace(kw=kw)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    cfg = SimpleNamespace(vllm_gpu_memory_utilization=0.3, temperature=1.0, top_p=0.9)
    m = HybridLM(HybridConfig.preset("tiny"))
    backend = build_backend("vllm", m, max_batch=2, max_len=64, grpo=cfg, seed=4)
    llm = backend.llm
    kw = llm.kwargs
    assert (kw["load_format"], kw["gpu_memory_utilization"], kw["max_model_len"], kw["logprobs_mode"]) == ("dummy", 0.3, 64, "raw_logprobs")
    assert kw["enable_sleep_mode"] and kw["skip_tokenizer_init"] and kw["tensor_parallel_size"] == 1
    hf = json.loads((Path(kw["model"]) / "config.json").read_text())
    assert hf["architectures"] == ["NemotronHForCausalLM"]
    assert llm.calls == ["load", "reset"] and llm.weights.keys() == dict(checkpoint_items(m.state_dict())).keys()
    res = backend.generate([[5, 6], [7]], SamplingParams(stop_token_ids=(9,), seed=1))
    assert [(r.tokens, r.finish_reason, r.stop_token) for r in res] == [([6, 9], "stop", 9), ([7, 9], "stop", 9)]
    backend.offload()
    with pytest.raises(RuntimeError, match="refit"):
        backend.generate([[5]], SamplingParams(stop_token_ids=(9,)))
    with torch.no_grad():
        m.lm_head.weight.add_(1.0)  # an optimizer step
    backend.refit(m)
    assert llm.calls[2:] == ["generate", "sleep2", "wake:weights", "load", "wake:kv_cache", "reset"]
    assert torch.equal(llm.weights["lm_head.weight"], m.lm_head.weight)


def test_engine_modes_through_the_registry(model):
    """``stage.grpo.rollout_engine``: static and compiled engines behind the same back-end; greedy tokens
    equal the eager engine's (the static step computes the same maths)."""
    params = SamplingParams(max_new_tokens=5, greedy=True, stop_token_ids=(11,))
    want = GenerationEngine(model, max_batch=2).generate(PROMPTS, params)
    for mode in ("static", "compiled"):
        backend = build_backend("engine", model, max_batch=2, max_len=64, grpo=SimpleNamespace(rollout_engine=mode))
        assert backend.engine.static and backend.engine.compiled == (mode == "compiled")
        got = backend.generate(PROMPTS, params)
        assert [r.tokens for r in got] == [r.tokens for r in want], mode


def test_compiled_rollouts_refused_on_several_ranks(rl_file, tmp_path):
    cfg = compose_recipe("grpo", [*RUN, f"data.rl.train=[{rl_file}]", f"run.dir={tmp_path / 'r'}",
                                  "stage.grpo.rollout_engine=compiled"])
    with pytest.raises(ConfigError, match="stage.grpo.rollout_engine=compiled runs on one process"):
        GRPOStage(cfg.data, cfg.stage, rank=0, world_size=2)
    assert not (tmp_path / "r").exists()
    stage = GRPOStage(cfg.data, cfg.stage)  # one process: the stage's rollouts run the compiled engine
    stage.bind(HybridLM(HybridConfig.preset("tiny"), init_seed=0), DistInfo(0, 1, 0, torch.device("cpu")))
    assert stage.engine.compiled and stage.engine.static


# --- config refusals ----------------------------------------------------------------------------------
def test_backend_config_errors_name_the_key(rl_file, tmp_path):
    from tandem.trainer.run import validate

    for bad, key in ((["stage.grpo.rollout_backend=nope"], "stage.grpo.rollout_backend"),
                     (["stage.grpo.rollout_engine=fast"], r"stage.grpo.rollout_engine must be one of \['eager', 'static', 'compiled'\]"),
                     (["stage.grpo.rollout_backend=vllm", "stage.grpo.rollout_engine=static"],
                      "stage.grpo.rollout_engine applies to rollout_backend=engine only"),
                     (["stage.grpo.vllm_gpu_memory_utilization=1.5"], "stage.grpo.vllm_gpu_memory_utilization"),
                     (["stage.grpo.rollout_backend=vllm", "stage.grpo.temperature=0.7", "stage.grpo.top_p=0.9"],
                      "stage.grpo.temperature"),
                     (["stage.grpo.rollout_backend=vllm", "stage.grpo.thinking_budget=16"],
                      "stage.grpo.thinking_budget=16 with stage.grpo.rollout_backend=vllm"),
                     (["stage.grpo.rollout_backend=vllm", "stage.grpo.environments=[{task: math, thinking_budget: 8}]"],
                      r"stage.grpo.environments.0.thinking_budget=8 with stage.grpo.rollout_backend=vllm")):
        with pytest.raises(ConfigError, match=key):
            validate(compose_recipe("grpo", [*RUN, f"data.rl.train=[{rl_file}]", f"run.dir={tmp_path / 'r'}", *bad]))


def test_vllm_refused_at_start_on_a_machine_without_it(rl_file, tmp_path):
    """No vllm or no CUDA: exit 2 at start with how to install it, the run directory never created."""
    run_dir = tmp_path / "r"
    if importlib.util.find_spec("vllm") is not None and torch.cuda.is_available():
        return  # this machine can run vLLM: the start-time machine refusal does not apply
    res = run_cli("-cn", "grpo", *RUN, f"data.rl.train=[{rl_file}]", f"run.dir={run_dir}", "stage.grpo.rollout_backend=vllm")
    assert res.returncode == 2, res.stderr[-2000:]
    assert "pip install 'tandem[vllm]'" in res.stderr and "stage.grpo.rollout_backend" in res.stderr, res.stderr[-2000:]
    assert not run_dir.exists()


# --- the real vLLM path ------------------------------------------------------------------------------
@pytest.mark.gpu
def test_vllm_backend_on_gpu():
    """vLLM generates what the engine generates from the same weights, and again after a sleep / refit cycle
    with changed weights (greedy at temperature 1: the first tokens equal, logprobs close in bf16)."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip(f"vllm is not installed ({vb.INSTALL_HINT})")
    torch.manual_seed(0)
    m = HybridLM(HybridConfig.preset("tiny")).to("cuda", torch.bfloat16)
    backend = build_backend("vllm", m, max_batch=4, max_len=64,
                            grpo=SimpleNamespace(vllm_gpu_memory_utilization=0.3, temperature=1.0, top_p=1.0))
    params = SamplingParams(max_new_tokens=6, greedy=True, stop_token_ids=(0,))
    engine = GenerationEngine(m, max_batch=4)
    for rnd in range(2):
        got, want = backend.generate(PROMPTS, params), engine.generate(PROMPTS, params)
        for g, w in zip(got, want):
            assert g.tokens[:2] == w.tokens[:2], (rnd, g.tokens, w.tokens)
            assert abs(g.logprobs[0] - w.logprobs[0]) < 0.1, (rnd, g.logprobs, w.logprobs)
        backend.offload()
        with torch.no_grad():
            m.lm_head.weight.mul_(-1.0)  # different weights: different tokens unless the refit landed
        backend.refit(m)
