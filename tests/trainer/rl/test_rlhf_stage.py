"""The rlhf stage: GRPO with the group-level scoring hook replaced by a frozen judge comparing rollouts in
pairs — scripted verdicts (retries, defaults, tie-break, means, swap consistency) and a real tiny judge
loaded from a checkpoint folder; config errors."""

import json

import pytest
import torch

from tandem.data_pipelines import rl_synthetic
from tandem.model import HybridConfig, HybridLM
from tandem.trainer.config import ConfigError
from tandem.trainer.inference.engine import GenerationResult
from tandem.trainer.parallel import DistInfo
from tandem.trainer.rl.genrm import comparison_pairs, rollout_rewards
from tandem.trainer.run import validate
from tandem.trainer.stages import STAGES, RLHFStage

from ..conftest import compose_recipe

CPU = DistInfo(0, 1, 0, torch.device("cpu"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("rlhf")
    (d / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rl_synthetic.prompts(20, seed=0, kinds=("max",))))
    torch.manual_seed(1)
    HybridLM(HybridConfig.preset("tiny"), init_seed=1).save_pretrained(d / "judge")
    return d


def _cfg(files, *extra):
    return compose_recipe("rlhf", ["model.preset=tiny", "model.init_from=null", f"data.rl.train=[{files / 'prompts.jsonl'}]",
                                   "data.rl.valid=[]", f"stage.rlhf.judge={files / 'judge'}", "stage.eval_batches=0",
                                   "stage.grpo.prompts_per_step=2", "stage.grpo.generations_per_prompt=2",
                                   "stage.grpo.max_new_tokens=4", "stage.rlhf.judge_max_new_tokens=6", *extra])


def _stage(files, *extra):
    cfg = _cfg(files, *extra)
    validate(cfg)
    stage = RLHFStage(cfg.data, cfg.stage)
    torch.manual_seed(0)
    stage.bind(HybridLM(HybridConfig.preset("tiny")), CPU)
    return stage


class ScriptedJudge:
    """Answers judge prompts from a script: call c gets outputs[c] (one text per prompt)."""

    def __init__(self, tokenizer, outputs):
        self.tok, self.outputs, self.calls = tokenizer, list(outputs), []

    def generate(self, prompts, params):
        self.calls.append((len(prompts), params.seed))
        texts = self.outputs.pop(0)
        assert len(texts) == len(prompts)
        return [GenerationResult(p, self.tok.encode(t)) for p, t in zip(prompts, texts)]


def test_registered_and_config_errors(files):
    assert STAGES["rlhf"] is RLHFStage
    with pytest.raises(ConfigError, match="stage.rlhf.judge must name"):
        validate(_cfg(files, "stage.rlhf.judge=null"))
    with pytest.raises(ConfigError, match="stage.rlhf.pairing must be one of"):
        validate(_cfg(files, "stage.rlhf.pairing=ring"))
    with pytest.raises(ConfigError, match="stage.rlhf.judge_samples must be >= 1"):
        validate(_cfg(files, "stage.rlhf.judge_samples=0"))
    with pytest.raises(ConfigError, match="stage.rlhf.length_penalty must be >= 0"):
        validate(_cfg(files, "stage.rlhf.length_penalty=-1"))
    with pytest.raises(ConfigError, match=r"stage.rlhf.judge_instructions must be one of \['compact', 'full'\]"):
        validate(_cfg(files, "stage.rlhf.judge_instructions=terse"))


def test_scripted_verdicts_become_rollout_rewards(files):
    stage = _stage(files)
    V = '{{"score_1": {}, "score_2": {}, "ranking": {}}}'
    # G = 2 circular: (0, 1) then (1, 0) per group; group 0 parses at once, group 1 needs a retry of one
    # verdict, and that retry fails again (→ default 3 / 3.5)
    judge = ScriptedJudge(stage.tokenizer, [
        [V.format(5, 2, 1), V.format(2, 5, 6)],               # group 0: consistent, rollout 0 preferred
        [V.format(3, 3, 2), "no verdict"],                    # group 1, attempt 0
        ["still nothing"],                                    # group 1, attempt 1 (the retry)
    ])
    stage.judge_engine = judge
    stage.batches_for_step(0)
    m = stage.after_step(0, True)
    want = rollout_rewards(torch.tensor([[5.0, 2.0], [3.0, 3.0]]), torch.tensor([[2.0, 5.0], [3.0, 3.0]]),
                           torch.tensor([[1.0, 6.0], [2.0, 3.5]]), comparison_pairs(2, "circular"), 2)
    assert want.tolist() == [[5.0, 2.0], [(4.5 + 3) / 2, (1.5 + 3) / 2]]
    assert stage.last_rewards.tolist() == want.float().tolist()
    assert [n for n, _ in judge.calls] == [2, 2, 1] and len({s for _, s in judge.calls}) == 3
    assert m["rlhf/judge_format_error_frac"] == 0.25 and m["rlhf/judge_retry_frac"] == 0.25
    assert m["rlhf/comparisons"] == 4.0 and m["rlhf/swap_consistency"] == 0.5  # group 1's default prefers nothing
    assert m["rlhf/judged_score_mean"] == pytest.approx(float(want.mean()))
    assert m["grpo/reward_mean"] == pytest.approx(float(want.mean()))


def test_real_tiny_judge_loads_and_judges_all_pairs(files):
    stage = _stage(files, "stage.grpo.generations_per_prompt=3", "stage.rlhf.pairing=all", "stage.rlhf.retries=0")
    assert isinstance(stage.judge, HybridLM) and not any(p.requires_grad for p in stage.judge.parameters())
    stage.batches_for_step(0)
    m = stage.after_step(0, True)
    assert m["rlhf/comparisons"] == 2 * 3  # 2 groups × 3 pairs
    assert stage.last_rewards.shape == (2, 3) and torch.isfinite(stage.last_rewards).all()
    # an untrained judge rarely writes a verdict: every failure is counted and scores the neutral 3
    fails = m["rlhf/judge_format_error_frac"]
    assert 0 <= fails <= 1 and (fails < 1 or stage.last_rewards.eq(3.0).all())


def test_judge_seeds_name_the_global_slot_not_the_rank_share(files):
    """A group's judge sampling depends on (seed, batch, global slot, attempt) only: the same whichever other
    groups share the rank (so 2 ranks judge like 1) and the same on a rerun (resume)."""
    stage = _stage(files)
    V = '{"score_1": 4, "score_2": 2, "ranking": 2}'
    group = [GenerationResult([1], stage.tokenizer.encode("The answer is 3.")) for _ in range(2)]
    alone = ScriptedJudge(stage.tokenizer, [[V, V]])
    stage.judge_engine = alone
    r_alone, _ = stage.score_groups(7, [(5, 0)], [group])
    shared = ScriptedJudge(stage.tokenizer, [[V, V], [V, V]])
    stage.judge_engine = shared
    r_shared, _ = stage.score_groups(7, [(4, 1), (5, 0)], [group, group])
    assert shared.calls[1] == alone.calls[0] and shared.calls[0] != alone.calls[0]
    assert r_shared[1].tolist() == r_alone[0].tolist() == [3.0, 3.0]  # (4 + 2) / 2 for both rollouts


@pytest.mark.slow
def test_two_ranks_fsdp_ep2_judge_like_one_rank(files, tmp_path):
    """Under ``parallel=fsdp_ep2`` the policy is FSDP2 × EP 2 and the judge EP 2 (each rank reads only its
    experts from the judge folder); every judge forward is a lockstep round (the ranks judge different groups
    and may re-sample different verdicts). 2 ranks judge and train like 1 with the same global batch: the
    same judge tokens (sampled at temperature 1 from an untrained judge: ~7% of its rows stop early, so a
    difference in its logits would change where they stop), verdict counts and losses. The untrained
    judge's verdicts never parse (every reward is the default 3, so the losses are 0 here): the token-exact
    EP judge is proven in tests/trainer/test_expert_parallel.py (``frozen``; its ``fsdp`` case runs bf16
    compute, the cluster's numerics), the verdict → reward maths by the scripted tests above."""
    from ..conftest import read_records, run_cli, run_torchrun

    args = ["-cn", "rlhf", "model.preset=tiny", "model.init_from=null", "model.init_seed=3",
            f"data.rl.train=[{files / 'prompts.jsonl'}]", "data.rl.valid=[]", f"stage.rlhf.judge={files / 'judge'}",
            "stage.eval_batches=0", "stage.steps=1", "stage.save_every=0", "stage.micro_batch=4",
            "stage.grpo.prompts_per_step=4", "stage.grpo.generations_per_prompt=2", "stage.grpo.max_new_tokens=6",
            "stage.rlhf.judge_max_new_tokens=24", "stage.rlhf.retries=1", "logger.progress_bar=false", "logger.log_every=1"]
    single = run_cli(*args, f"run.dir={tmp_path / 'single'}")
    assert single.returncode == 0, single.stderr[-3000:]
    two = run_torchrun(*args, "parallel=fsdp_ep2", "parallel.backend=gloo", f"run.dir={tmp_path / 'two'}")
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = read_records(tmp_path / "single"), read_records(tmp_path / "two")
    assert len(a) == len(b) == 1
    for x, y in zip(a, b):
        for k in ("rlhf/judge_tokens", "rlhf/comparisons", "rlhf/judge_format_error_frac", "rlhf/judge_retry_frac",
                  "rlhf/judged_score_mean", "grpo/reward_mean", "grpo/response_length_mean", "target_tokens"):
            assert x[k] == y[k], (k, x[k], y[k])
        for k in ("loss", "grad_norm"):
            assert abs(x[k] - y[k]) <= 1e-5 * max(abs(x[k]), 1.0), (k, x[k], y[k])
    assert a[0]["rlhf/comparisons"] == 4 * 2 and a[0]["rlhf/judge_tokens"] > 4 * 2


def test_bf16_judge_keeps_a_fp32_router_and_decodes_alike(files):
    """``stage.rlhf.judge_dtype=bf16`` (the default on CUDA): bf16 weights, the MoE router fp32, a bf16 KV
    cache; the static engine (rollout_engine=static) gives the eager engine's greedy tokens."""
    from tandem.trainer.inference.backends import engine_for
    from tandem.trainer.inference.engine import SamplingParams
    from tandem.trainer.stages.rlhf import judge_dtype, load_judge

    assert judge_dtype("auto", torch.device("cpu")) == torch.float32 and judge_dtype("auto", torch.device("cuda")) == torch.bfloat16
    judge = load_judge(str(files / "judge"), CPU, torch.bfloat16)
    routers = [m.weight.dtype for m in judge.modules() if hasattr(m, "e_score_correction_bias")]
    assert routers and set(routers) == {torch.float32} and judge.lm_head.weight.dtype == torch.bfloat16
    prompts, prm = [[5, 9, 2], [3, 3, 3, 3]], SamplingParams(max_new_tokens=6, greedy=True)
    eager, static = engine_for(judge, 2, "eager"), engine_for(judge, 2, "static")
    assert eager.dtype == torch.bfloat16
    assert [r.tokens for r in eager.generate(prompts, prm)] == [r.tokens for r in static.generate(prompts, prm)]


def test_judge_reads_and_writes_with_its_own_tokenizer(files, tmp_path):
    """A judge saved with a tokenizer of its own (another vocabulary than the policy's): its prompts are the
    policy's completions as text, encoded with the judge's tokenizer; its verdicts are decoded with it."""
    from tandem.data_pipelines.build_tokenizer import build
    from tandem.data_pipelines.tokenizer import SHIPPED_TOKENIZER_DIR, load_tokenizer
    from tandem.trainer.checkpoint.tokenizer_files import copy_tokenizer_files

    judge_dir = tmp_path / "judge"
    HybridLM(HybridConfig.preset("tiny", vocab_size=384), init_seed=2).save_pretrained(judge_dir)
    copy_tokenizer_files(build(tmp_path / "tok", vocab_size=384, seed=1), judge_dir)
    stage = _stage(files, f"stage.rlhf.judge={judge_dir}", "stage.rlhf.judge_enable_thinking=false")
    own = load_tokenizer(judge_dir)
    assert stage.judge_tokenizer.vocab_size == own.vocab_size == 384 != stage.tokenizer.vocab_size
    assert stage.judge_stop_ids == (own.token_to_id("<|im_end|>"),)

    class Recording(ScriptedJudge):
        def generate(self, prompts, params):
            self.prompts = prompts
            assert params.stop_token_ids == stage.judge_stop_ids
            return super().generate(prompts, params)

    V = '{"score_1": 5, "score_2": 2, "ranking": 1}'
    judge = Recording(own, [[V, V]])  # verdicts written in the judge's ids
    stage.judge_engine = judge
    answers = ["The answer is 7.", "The answer is 12."]
    group = [GenerationResult([1], stage.tokenizer.encode(a) + [stage.stop_ids[0]]) for a in answers]
    rewards, _ = stage.score_groups(0, [(0, 0)], [group])
    assert rewards[0].tolist() == [(5 + 2) / 2, (2 + 5) / 2]  # each rollout once preferred: parsed, not defaulted
    text = own.decode(judge.prompts[0])
    assert "[Response 1]\nThe answer is 7." in text and "[Response 2]\nThe answer is 12." in text
    assert judge.prompts[0] != stage.tokenizer.encode(stage.tokenizer.decode(judge.prompts[0]))  # not the policy's ids

    # a tokenizer named by the key wins; one that does not load is an error naming it
    named = _stage(files, f"stage.rlhf.judge_tokenizer={judge_dir}")
    assert named.judge_tokenizer.vocab_size == 384
    with pytest.raises(ConfigError, match="stage.rlhf.judge_tokenizer=/nonexistent"):
        _stage(files, "stage.rlhf.judge_tokenizer=/nonexistent")
    # a judge whose embedding is smaller than its tokenizer's vocabulary is refused
    with pytest.raises(ConfigError, match=r"its vocabulary \(384\) is smaller than its tokenizer's \(512"):
        _stage(files, f"stage.rlhf.judge={judge_dir}", f"stage.rlhf.judge_tokenizer={SHIPPED_TOKENIZER_DIR}")
