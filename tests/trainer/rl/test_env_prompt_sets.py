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
