"""Every environment's generated prompt set: rows follow the RL prompt schema, are seeded, and each row's
own example completion scores 1 on its environment (so the sets are solvable and the verifiers agree)."""

import json

import pytest

from tandem.data_pipelines import rl_synthetic
from tandem.data_pipelines.rl_prompts import load_rl_prompts
from tandem.trainer.rl.environments import ENVIRONMENTS, score_batch
from tandem.trainer.rl.environments.code import CodeEnv
from tandem.trainer.rl.environments.sandbox import SandboxUnavailable

ENVS = ("math", "code", "instructions", "structured", "tools")


def test_sets_are_seeded_and_follow_the_schema(tmp_path):
    rows = rl_synthetic.env_prompts(12, seed=3, envs=ENVS)
    assert rows == rl_synthetic.env_prompts(12, seed=3, envs=ENVS) and rows != rl_synthetic.env_prompts(12, seed=4, envs=ENVS)
    assert sorted({r["task"] for r in rows}) == sorted(ENVS) and len(rows) == 60
    path = tmp_path / "mix.jsonl"
    rl_synthetic.main(["--out", str(path), "--envs", ",".join(ENVS), "--prompts", "12", "--seed", "3"])
    loaded = load_rl_prompts(path, tasks=sorted(ENVIRONMENTS))
    assert [p.task for p in loaded] == [r["task"] for r in rows]
    with pytest.raises(SystemExit, match="--envs must be"):
        rl_synthetic.main(["--out", str(path), "--envs", "chess"])


@pytest.mark.parametrize("task", ENVS)
def test_each_row_is_solved_by_its_example(task):
    n = 6 if task == "code" else 24  # code: one of each kind (each case is a sandboxed run)
    rows = rl_synthetic.ENV_SETS[task](n, 11)
    envs = {}
    if task == "code":
        try:
            envs["code"] = CodeEnv()
        except SandboxUnavailable as e:
            pytest.skip(f"no sandbox on this machine: {e}")
    pairs = [({**r, "where": f"row {i}"}, ("<think></think>" if task != "tools" else "") + r["metadata"]["example"])
             for i, r in enumerate(rows)]
    verdicts, stats = score_batch(pairs, envs=envs, timeout_s=30)
    assert stats.errors == 0 and stats.timeouts == 0, stats.first_errors
    bad = [(p[0]["prompt"], v) for p, v in zip(pairs, verdicts) if v.reward != 1.0]
    assert not bad, bad[:2]
    # and a wrong completion does not
    wrong, _ = score_batch([(pairs[0][0], "<think></think>I do not know.")], envs=envs, timeout_s=30)
    assert wrong[0].reward < 1.0


def test_mixed_recipe_step_scores_every_environment(tmp_path):
    """One GRPO step of the mixed smoke recipe (a fresh tiny model): all five environments are drawn,
    scored (the code sandbox and the multi-turn tool driver, max_turns=3, included) and get their
    per-environment reward metrics; nothing is counted as a verifier error; the tool world's tools are in
    its prompts' system block only."""
    import torch

    from tandem.model import HybridConfig, HybridLM
    from tandem.trainer.parallel import DistInfo
    from tandem.trainer.stages import GRPOStage

    from ..conftest import compose_recipe

    try:
        CodeEnv()
    except SandboxUnavailable as e:
        pytest.skip(f"no sandbox on this machine: {e}")
    path = tmp_path / "mix.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rl_synthetic.env_prompts(8, seed=0, envs=ENVS)))
    cfg = compose_recipe("smoke_grpo_mix", [
        "model.preset=tiny", "model.init_from=null", f"data.rl.train=[{path}]", f"run.dir={tmp_path / 'run'}",
        "stage.eval_batches=0", "stage.grpo.prompts_per_step=5", "stage.grpo.generations_per_prompt=2",
        "stage.grpo.max_new_tokens=8"])
    stage = GRPOStage(cfg.data, cfg.stage)
    assert stage.tasks == ["math", "code", "instructions", "structured", "tools"] and stage.turns["tools"] == 3
    drawn = {stage.train[i].task for step in range(4) for i in stage.prompts_for_step(step)}
    assert drawn == set(ENVS)  # the weighted draw reaches every environment within a few steps
    tools_prompt = stage.tokenizer.decode(stage.train.ids(stage.pools["tools"][0]))
    assert "# Tools" in tools_prompt and "kv_set" in tools_prompt  # the tool world's tools in the system block
    assert "# Tools" not in stage.tokenizer.decode(stage.train.ids(stage.pools["math"][0]))
    one_each = [stage.pools[t][0] for t in stage.tasks]
    stage.prompts_for_step = lambda step: one_each  # this step: one prompt of each environment (cheap, all five)
    torch.manual_seed(0)
    stage.bind(HybridLM(HybridConfig.preset("tiny")), DistInfo(0, 1, 0, torch.device("cpu")))
    stage.batches_for_step(0)
    m = stage.after_step(0, True)
    assert {k.split("/")[-1] for k in m if k.startswith("grpo/reward_mean/")} == set(ENVS)
    assert m["grpo/env_error_frac"] == 0.0 and m["grpo/env_timeout_frac"] == 0.0
    assert 0 < m["grpo/time_score_frac"] < 1 and m["grpo/rollouts"] == 10


def test_math_warmup_accuracy_and_rambling_share():
    from tandem.data_pipelines.rl_synthetic import is_rambling, problem, warmup_conversations

    convs = warmup_conversations(400, seed=5, accuracy=1.0, kinds=("copy",), ramble_frac=0.5)
    answers = [c["messages"][1]["content"] for c in convs]
    rambling = [is_rambling(a) for a in answers]
    assert 0.4 < sum(rambling) / len(answers) < 0.6
    for conv, text, r in zip(convs, answers, rambling):
        number = conv["messages"][0]["content"].rsplit(" ", 1)[1]
        assert f"The answer is {number}." in text  # right every time (accuracy 1), filler or not
        assert (text == f"The answer is {number}.") != r
    assert not any(is_rambling(c["messages"][1]["content"]) for c in warmup_conversations(50, seed=5))
    with pytest.raises(ValueError, match="ramble must be in"):
        warmup_conversations(2, ramble_frac=1.5)
