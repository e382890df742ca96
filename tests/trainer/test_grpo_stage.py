"""The GRPO stage in the shared loop: packed rollouts (seq_idx, completion-only targets, forced tokens
masked), advantages per token, exact resume, 2 ranks == 1 rank, bad prompt files.  held-out reward rising on a
task the tiny CPU model can learn."""

import json
import shutil

import pytest
import torch

from tandem.data_pipelines import rl_synthetic
from tandem.model import HybridConfig, HybridLM
from tandem.trainer.config import ConfigError
from tandem.trainer.parallel import DistInfo
from tandem.trainer.rl.advantages import compute_advantages
from tandem.trainer.rl.environments import ENVIRONMENTS, Environment, Verdict, register_environment
from tandem.trainer.run import run
from tandem.trainer.stages import GRPOStage
from tandem.trainer.stages.grpo import Rollout, pack_rollouts

from .conftest import compose_recipe, read_records, run_cli, run_torchrun

TASK = "grpo_test_has_e"
if TASK not in ENVIRONMENTS:
    @register_environment(TASK)
    class HasE(Environment):
        """Reward 1 when the answer text contains an "e": a fresh tiny model gets it about half the time."""

        def verify(self, sample, completion):
            return Verdict(float("e" in completion.rsplit("</think>", 1)[-1]))

GRPO_RUN = [
    "model.preset=tiny", "model.init_from=null", "data.seq_len=64", "stage.steps=4", "stage.micro_batch=2",
    "stage.eval_every=0", "stage.eval_batches=0", "stage.save_every=0", "stage.grpo.prompts_per_step=4",
    "stage.grpo.generations_per_prompt=4", "stage.grpo.max_new_tokens=8", "optim.lr=1e-3", "optim.warmup_steps=0",
    "optim.schedule=constant", "logger.log_every=1", "logger.progress_bar=false",
]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    d = tmp_path_factory.mktemp("rl")
    rows = rl_synthetic.prompts(200, seed=0)
    (d / "stub.jsonl").write_text("".join(json.dumps({**r, "task": TASK}) + "\n" for r in rows))
    return d / "stub.jsonl"


def _cfg(prompts, run_dir, *extra):
    return compose_recipe("grpo", [*GRPO_RUN, f"data.rl.train=[{prompts}]", f"run.dir={run_dir}", *extra])


def _bound_stage(prompts, *extra):
    cfg = _cfg(prompts, "unused", *extra)
    stage = GRPOStage(cfg.data, cfg.stage)
    torch.manual_seed(0)
    stage.bind(HybridLM(HybridConfig.preset("tiny")), DistInfo(0, 1, 0, torch.device("cpu")))
    return stage


def test_packing_targets_completion_tokens_only_and_masks_forced():
    a = Rollout([10, 11, 12], [20, 21, 22, 4], [-1.0, -2.0, -3.0, -4.0], [False, True, False, False], 0.5)
    b = Rollout([30, 31], [40, 41], [-5.0, -6.0], [False, False], -1.5)
    c = Rollout([50], [60, 61], [-7.0, -8.0], [False, False], 2.0, keep=False)  # overlong-filtered
    batch = pack_rollouts([a, b, c], seq_len=12, pad_id=2)
    assert batch["input_ids"].shape == (2, 12)  # 7 + 4 tokens share a row, 3 go to the next
    ids, lab, m, f, s = (batch[k] for k in ("input_ids", "labels", "loss_mask", "forced_mask", "seq_idx"))
    assert ids[0, :11].tolist() == [10, 11, 12, 20, 21, 22, 4, 30, 31, 40, 41]
    assert s[0].tolist() == [0] * 7 + [1] * 4 + [2]  # padding is a document of its own
    # position t predicts t+1: targets are the generated tokens of kept rollouts, never a prompt token
    assert m[0].tolist() == [0, 0, 1, 1, 1, 1, 0, 0, 1, 1, 0, 0]
    assert torch.equal(lab[0, m[0] > 0], torch.tensor([20, 21, 22, 4, 40, 41]))
    assert f[0].tolist() == [False, False, False, True] + [False] * 8  # 21 was forced
    assert GRPOStage.target_tokens(None, batch) == 5.0  # 6 completion tokens of kept rollouts − 1 forced
    assert batch["advantages"][0, 2:6].tolist() == [0.5] * 4 and batch["advantages"][0, 8:10].tolist() == [-1.5] * 2
    assert batch["advantages"][0, [0, 1, 6, 7, 10, 11]].abs().sum() == 0
    assert batch["logp_gen"][0, 2:6].tolist() == [-1.0, -2.0, -3.0, -4.0]
    assert m[1].sum() == 0 and batch["valid"][1].sum() == 3  # the filtered rollout is packed but not trained
    assert batch["valid"][0].sum() == 11 and (lab[~batch["valid"]] == -100).all()
    with pytest.raises(ValueError, match="does not fit"):
        pack_rollouts([a], seq_len=6, pad_id=2)


def test_rollout_advantages_reach_every_completion_token(prompts):
    """Rescoring each packed completion independently and recomputing the group advantages gives exactly
    the per-token advantages of the batch; old logprobs are the policy's (ratio 1 before the update)."""
    stage = _bound_stage(prompts)
    batches = stage.batches_for_step(0)
    G, env = 4, ENVIRONMENTS[TASK]()
    docs = []  # (advantage on its target tokens, reward of its decoded completion), in packing order
    for b in batches:
        for r in range(b["input_ids"].shape[0]):
            for d in b["seq_idx"][r][b["valid"][r]].unique().tolist():
                at = (b["seq_idx"][r] == d) & (b["loss_mask"][r] > 0)
                adv = b["advantages"][r][at]
                assert adv.numel() > 0 and torch.all(adv == adv[0])
                text = "<think></think>" + stage.tokenizer.decode([t for t in b["labels"][r][at].tolist() if t != 4])
                docs.append((round(float(adv[0]), 5), env.verify({}, text).reward))
    assert len(docs) == 4 * G
    # regroup: rollouts of a prompt are generated together, so the rewards multiset per group is known
    # from the stage's own rewards; compare the two views
    rewards = torch.tensor([r for _, r in docs])
    assert 0 < rewards.mean() < 1  # the stub task has signal
    expected = sorted(round(float(x), 5) for x in compute_advantages(stage.last_rewards).advantages.flatten())
    assert sorted(a for a, _ in docs) == expected
    assert sorted(rewards.tolist()) == sorted(stage.last_rewards.flatten().tolist())
    out = stage.loss(stage.model, batches[0])
    m = batches[0]["loss_mask"].sum()
    assert abs(float(out.metrics["grpo/ratio_mean"]) / float(m) - 1) < 1e-6
    assert float(out.num_tokens) == stage.target_tokens(batches[0])


def test_config_errors_name_the_key(prompts, tmp_path):
    from tandem.trainer.run import validate

    for bad, key in (("stage.grpo.eps_low=1.5", "eps_low"), ("stage.grpo.generations_per_prompt=1", "generations_per_prompt"),
                     ("stage.grpo.advantage=nope", "advantage"), ("stage.grpo.kl_beta=0.1", "kl_reference")):
        with pytest.raises(ConfigError, match=f"stage.grpo.{key}"):
            validate(_cfg(prompts, tmp_path / "r", bad))
    with pytest.raises(ConfigError, match="multiple of the data-parallel size"):
        cfg = _cfg(prompts, tmp_path / "r", "stage.grpo.prompts_per_step=3")
        GRPOStage(cfg.data, cfg.stage, 0, 2)


def test_grpo_resumes_exactly(prompts, tmp_path):
    """Rollouts are a function of (weights, seeds, step): a run stopped and resumed at step 2 regenerates
    the same rollouts and reproduces every metric of the straight run."""
    run(_cfg(prompts, tmp_path / "straight"))
    run(_cfg(prompts, tmp_path / "split", "stage.save_every=2"))
    ckpts = tmp_path / "split" / "checkpoints"
    shutil.rmtree(ckpts / "step_00000004")
    (ckpts / "latest").write_text("step_00000002\n")
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()[:2]
    (tmp_path / "split" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    run(_cfg(prompts, tmp_path / "split", "stage.save_every=2"))
    a, b = read_records(tmp_path / "straight"), read_records(tmp_path / "split")
    keys = ["loss", "grad_norm", "grpo/reward_mean", "grpo/advantage_std", "grpo/response_length_mean",
            "grpo/ratio_mean", "grpo/entropy", "target_tokens"]
    assert len(a) == len(b) == 4
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
    assert any(r["loss"] != 0 for r in a) and len({r["grpo/reward_mean"] for r in a}) > 1
    assert a[0]["stage"] == "grpo" and abs(a[0]["grpo/ratio_mean"] - 1) < 1e-6


def test_bad_prompt_file_exits_2_naming_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    rows = [json.dumps(r) for r in rl_synthetic.prompts(5)]
    rows.insert(2, json.dumps({"prompt": "hi", "task": "math"}))  # no answer
    bad.write_text("\n".join(rows) + "\n")
    res = run_cli("-cn", "grpo", *GRPO_RUN, f"data.rl.train=[{bad}]", f"run.dir={tmp_path / 'r'}")
    assert res.returncode == 2, res.stderr[-2000:]
    assert f"{bad}:3" in res.stderr and "answer" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "r").exists()
    res = run_cli("-cn", "grpo", *GRPO_RUN, f"data.rl.train=[{bad}]", "stage.grpo.top_p=0", f"run.dir={tmp_path / 'r'}")
    assert res.returncode == 2 and "stage.grpo.top_p" in res.stderr, res.stderr[-2000:]


# --- an SFT-warm tiny model on a verifiable task -------------------------------------------------------

KINDS = ("copy", "max")


def _warm_up(d, kinds, sft_steps):
    """A tiny model SFT'd on answers that are right half the time ("The answer is X."): it knows the format,
    not which number to give. Train / held-out prompts of the same tasks, scored by the math environment."""
    rl_synthetic.write_warmup(d / "warmup.jsonl", 2000, seed=1, accuracy=0.5, kinds=kinds)
    rl_synthetic.write_prompts(d / "train.jsonl", 1000, seed=2, kinds=kinds)
    rl_synthetic.write_prompts(d / "valid.jsonl", 64, seed=3, kinds=kinds)
    run(compose_recipe("smoke_sft", [
        "model.preset=tiny", "model.init_from=null", f"data.chat.train=[{d / 'warmup.jsonl'}]", "data.seq_len=64",
        f"stage.steps={sft_steps}", "stage.global_batch=8", "stage.micro_batch=8", "stage.eval_batches=0",
        "stage.save_every=0", "optim.lr=3e-3", "optim.min_lr=3e-4", "optim.warmup_steps=10", "logger.progress_bar=false",
        "logger.log_every=50", f"run.dir={d / 'sft'}"]))
    return d


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """150 warm-up steps on copy and max prompts (the 2-rank comparison needs real gradients, not learning)."""
    return _warm_up(tmp_path_factory.mktemp("warm"), KINDS, 150)


@pytest.fixture(scope="module")
def warm_max(tmp_path_factory):
    """600 warm-up steps on "Which is larger, a or b?" alone: the model picks one of the two numbers (about
    1/3 right held out), a task the tiny model can learn in minutes (copying is not)."""
    return _warm_up(tmp_path_factory.mktemp("warm_max"), ("max",), 600)


def _warm_args(d, *extra):
    return [f"model.init_from={d / 'sft'}", f"data.rl.train=[{d / 'train.jsonl'}]", f"data.rl.valid=[{d / 'valid.jsonl'}]",
            "data.seq_len=64", "stage.grpo.max_new_tokens=10", "stage.micro_batch=16", "stage.save_every=0", "logger.progress_bar=false",
            "optim.schedule=constant", "optim.warmup_steps=0", *extra]


@pytest.mark.slow
def test_two_ranks_match_one_rank(warm, tmp_path):
    """Each rank generates its share of the prompts (whole groups); the seeds name global slots, and the
    loop normalises by global target tokens: 2 gloo processes train like 1 with the same global batch."""
    args = ["-cn", "grpo", *_warm_args(warm, "stage.steps=3", "stage.grpo.prompts_per_step=4",
                                        "stage.grpo.generations_per_prompt=4", "stage.eval_every=0", "stage.eval_batches=1",
                                        "stage.grpo.eval_prompts=16", "optim.lr=1e-3", "logger.log_every=1")]
    single = run_cli(*args, f"run.dir={tmp_path / 'single'}")
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = run_torchrun(*args, "parallel=ddp_gloo", f"run.dir={tmp_path / 'ddp'}")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = read_records(tmp_path / "single"), read_records(tmp_path / "ddp")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        for k in ("grpo/reward_mean", "grpo/rollouts", "grpo/pass@G", "target_tokens", "grpo/response_length_mean"):
            assert x[k] == y[k], (k, x[k], y[k])
        for k in ("loss", "grpo/policy_loss", "grpo/ratio_mean", "grad_norm"):
            assert abs(x[k] - y[k]) <= 1e-5 * max(abs(x[k]), 1.0), (k, x[k], y[k])
        # measured: loss and grad norm bitwise equal, the entropy diagnostic 1.3e-4 apart at step 3 (its
        # vocabulary sum runs on differently shaped micro-batches); see the report in docs/RL.md
        assert abs(x["grpo/entropy"] - y["grpo/entropy"]) <= 1e-3 * x["grpo/entropy"]
        assert x["grpo/ratio_max"] == pytest.approx(y["grpo/ratio_max"], abs=1e-5)
    assert any(abs(r["loss"]) > 1e-4 for r in a)  # the comparison saw real gradients
    assert a[-1]["grpo/val_reward"] == b[-1]["grpo/val_reward"] and b[-1]["grpo/val_prompts"] == 16


@pytest.mark.slow
def test_grpo_raises_held_out_reward(warm_max, tmp_path):
    """60 GRPO steps (8 prompts × 8 rollouts) on the SFT-warm model raise the held-out reward (64 prompts,
    one sampled rollout each, the same seeds at every evaluation) by at least 0.15 over its start.
    Measured on the 2-core dev machine: 0.344 → 0.469 → 0.469 → 0.484 → 0.563 → 0.594 → 0.609 (+0.27)."""
    run(compose_recipe("grpo", _warm_args(warm_max, "stage.steps=60", "stage.grpo.prompts_per_step=8",
                                          "stage.grpo.generations_per_prompt=8", "stage.eval_every=10",
                                          "stage.eval_batches=1", "stage.grpo.eval_prompts=64", "optim.lr=1e-3",
                                          "optim.min_lr=1e-3", "logger.log_every=1", f"run.dir={tmp_path / 'run'}")))
    records = read_records(tmp_path / "run")
    start = records[0]["grpo/initial_val_reward"]
    curve = [start] + [r["grpo/val_reward"] for r in records if "grpo/val_reward" in r]
    assert len(curve) == 7 and records[-1]["grpo/val_prompts"] == 64, curve
    assert 0.1 < start < 0.8, curve  # partial accuracy to begin with: the warm-up taught the format
    assert curve[-1] >= start + 0.15, curve
