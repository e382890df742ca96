"""GenRM training as GRPO: the verifiable reward by hand, the genrm environment and its options, preference
rows (schema errors with file:line), the position-swap conversion and the checkable synthetic set."""

import json

import pytest

from tandem.data_pipelines.preferences import (
    STYLES, judge_rows, load_preferences, main as prefs_main, ranking_from_scores, synthetic_preferences,
)
from tandem.data_pipelines.readers import BadRecordError
from tandem.data_pipelines.rl_prompts import load_rl_prompts
from tandem.trainer.rl.environments import ENVIRONMENTS, get_environment, score_batch
from tandem.trainer.rl.genrm import Judgement, format_error_reward, genrm_reward, parse_judgement

V = '{{"score_1": {}, "score_2": {}, "ranking": {}}}'


@pytest.mark.parametrize("pred,label,c1,c2,want", [
    ((4, 2, 2), (4, 2, 2), 10, 1, 0.0),
    ((5, 2, 1), (4, 2, 2), 10, 1, -2.0),          # |5-4| + 0 + 1·|1-2|
    ((1, 5, 6), (5, 1, 1), 10, 1, -13.0),         # 4 + 4 + 5: the worst parseable verdict
    ((3, 3, 4), (5, 1, 1), 10, 2, -2 - 2 - 6.0),  # C2 = 2
    ((3, 3, 4), (5, 1, 1), 0, 0, -4.0),
])
def test_reward_by_hand(pred, label, c1, c2, want):
    assert genrm_reward(Judgement(*map(float, pred)), label, c1, c2) == want


def test_format_error_is_below_every_parseable_verdict():
    assert format_error_reward() == -10 - 4 - 4 - 5 == -23
    assert format_error_reward(c1=1, c2=2) == -1 - 8 - 10
    assert genrm_reward(parse_judgement("no verdict"), (3, 3, 3)) == -23
    assert genrm_reward(parse_judgement("no verdict"), (3, 3, 3)) < genrm_reward(Judgement(1, 5, 6), (5, 1, 1))


def test_environment_scores_completions_and_takes_options():
    assert "genrm" in ENVIRONMENTS
    sample = {"task": "genrm", "answer": [4, 2, 2], "metadata": {}, "where": "j.jsonl:3"}
    env = get_environment("genrm", c1=5, c2=2)
    v = env.verify(sample, "<think>\nresponse 1 is right</think>" + V.format(4, 1, 3))
    assert v.reward == -1 - 2 * 1
    assert v.components == {"format_error": 0.0, "score_error": 1.0, "ranking_error": 1.0, "agree": 1.0}
    v = env.verify(sample, "<think>\nhmm " + V.format(4, 2, 2))  # reasoning never closed
    assert v.reward == -5 - 8 - 10 and v.components["format_error"] == 1.0 and "unclosed" in v.info["message"]
    v = env.verify(sample, V.format(2, 4, 5))
    assert v.components["agree"] == 0.0 and v.reward == -2 - 2 - 2 * 3
    for bad in ({"c1": -1}, {"c2": "x"}, {"c1": True}):
        with pytest.raises(ValueError, match="genrm option"):
            get_environment("genrm", **bad)
    with pytest.raises(TypeError):
        get_environment("genrm", c3=1)
    with pytest.raises(ValueError, match=r"j.jsonl:3: answer ranking must be a number in 1-6"):
        env.verify({**sample, "answer": [4, 2, 9]}, V.format(4, 2, 2))
    verdicts, stats = score_batch([(sample, V.format(4, 2, 2)), ({**sample, "answer": "x"}, "")], envs={"genrm": env})
    assert verdicts[0].reward == 0.0 and stats.errors == 1  # a bad label is a counted environment error


def test_ranking_from_scores():
    assert [ranking_from_scores(a, b) for a, b in ((5, 1), (5, 3), (4, 3), (3, 4), (3, 5), (1, 5))] == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError):
        ranking_from_scores(3, 3)


def test_compact_instructions_and_style_subsets(tmp_path):
    from tandem.data_pipelines.preferences import JUDGE_TEMPLATES, judge_prompt_text

    conv = [{"role": "user", "content": "Which is larger, 3 or 8?"}]
    full, compact = (judge_prompt_text(conv, "The answer is 8.", "The answer is 3.", name) for name in ("full", "compact"))
    assert full.startswith(JUDGE_TEMPLATES["full"]) and compact.startswith(JUDGE_TEMPLATES["compact"])
    assert full.split("\n\n", 1)[1] == compact.split("\n\n", 1)[1]  # the same conversation and responses
    assert len(compact) < len(full) / 2 and all(k in compact for k in ("score_1", "score_2", "ranking"))
    with pytest.raises(ValueError, match="unknown judge instructions 'terse'"):
        judge_prompt_text(conv, "a", "b", "terse")
    rows = synthetic_preferences(40, seed=1, styles=("correct_concise", "correct_rambling"))
    assert {tuple(sorted(r["metadata"]["styles"])) for r in rows} == {("correct_concise", "correct_rambling")}
    assert {r["ranking"] for r in rows} == {2, 5}  # 5 vs 3: "better", either slot
    with pytest.raises(ValueError, match="at least two of"):
        synthetic_preferences(4, styles=("correct_concise",))
    with pytest.raises(SystemExit, match="--styles"):
        prefs_main(["--synthetic", "4", "--out", str(tmp_path / "p.jsonl"), "--styles", "correct_concise,polite"])
    assert not (tmp_path / "p.jsonl").exists()
    prefs_main(["--synthetic", "4", "--out", str(tmp_path / "p.jsonl"), "--judge-out", str(tmp_path / "j.jsonl"),
                "--instructions", "compact", "--styles", "correct_concise,correct_rambling"])
    judged = load_rl_prompts(tmp_path / "j.jsonl")
    assert len(judged) == 8 and all(JUDGE_TEMPLATES["compact"] in p.messages[0]["content"] for p in judged)


def test_synthetic_preferences_are_checkable_and_seeded():
    rows = synthetic_preferences(200, seed=3)
    assert rows == synthetic_preferences(200, seed=3) and rows != synthetic_preferences(200, seed=4)
    for r in rows:
        a, b = r["metadata"]["styles"]
        correct = [STYLES[s][0] for s in (a, b)]
        preferred = 0 if r["ranking"] <= 3 else 1
        final = [t.rsplit("</think>", 1)[-1] for t in (r["response_1"], r["response_2"])]
        if correct[0] != correct[1]:
            assert correct[preferred]  # the correct answer wins
            assert f"The answer is {r['metadata']['answer']}." in final[preferred]
        else:
            assert len(final[preferred]) < len(final[1 - preferred])  # both right (or wrong): the concise one
    assert any(len(r["messages"]) == 3 for r in rows) and any("<think>" in r["response_1"] for r in rows)
    assert {r["ranking"] for r in rows} <= set(range(1, 7)) and len({r["ranking"] for r in rows}) >= 4


def test_cli_writes_preferences_and_swapped_judge_prompts(tmp_path):
    prefs, judge = tmp_path / "prefs.jsonl", tmp_path / "judge.jsonl"
    prefs_main(["--synthetic", "20", "--seed", "1", "--out", str(prefs), "--judge-out", str(judge)])
    rows = load_preferences(prefs)
    prompts = load_rl_prompts(judge, tasks=["genrm"])
    assert len(rows) == 20 and len(prompts) == 40
    for p, (a, b) in zip(rows, zip(prompts[0::2], prompts[1::2])):
        assert a.metadata == {"pair": p["id"], "swapped": False} and b.metadata == {"pair": p["id"], "swapped": True}
        assert a.answer == [p["score_1"], p["score_2"], p["ranking"]]
        assert b.answer == [p["score_2"], p["score_1"], 7 - p["ranking"]]
        text_a, text_b = a.messages[0]["content"], b.messages[0]["content"]
        r1, r2 = (p[k].rsplit("</think>", 1)[-1].strip() for k in ("response_1", "response_2"))
        assert text_a.endswith(f"[Response 1]\n{r1}\n\n[Response 2]\n{r2}")
        assert text_b.endswith(f"[Response 1]\n{r2}\n\n[Response 2]\n{r1}")
        assert "<think>" not in text_a and "checked" not in text_a  # reasoning of responses and history dropped
    prefs_main(["--in", str(prefs), "--judge-out", str(judge), "--no-swap"])
    assert len(load_rl_prompts(judge, tasks=["genrm"])) == 20


GOOD = {"messages": [{"role": "user", "content": "q"}], "response_1": "a", "response_2": "b",
        "score_1": 4, "score_2": 2, "ranking": 2}


@pytest.mark.parametrize("change,message", [
    ({"messages": None}, "missing field 'messages'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "ends with an assistant"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "t"}]}, "must end with a user turn"),
    ({"messages": [{"role": "robot", "content": "q"}]}, "messages[0].role"),
    ({"response_2": ""}, "'response_2' is empty"),
    ({"response_1": 3}, "'response_1' must be a string"),
    ({"score_1": 6}, "'score_1' must be in 1-5"),
    ({"score_2": 2.5}, "'score_2' must be an integer"),
    ({"ranking": True}, "'ranking' must be an integer"),
    ({"ranking": 0}, "'ranking' must be in 1-6"),
    ({"id": [1]}, "'id' must be a string or integer"),
    ({"metadata": "m"}, "'metadata' must be an object"),
])
def test_bad_preference_rows_name_file_line_and_key(tmp_path, change, message):
    row = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(BadRecordError) as e:
        load_preferences(path)
    assert str(e.value).startswith(f"{path}:2") and message in str(e.value)


def test_warmup_conversations_teach_the_format_at_the_given_accuracy():
    from tandem.data_pipelines.preferences import warmup_conversations
    from tandem.data_pipelines.sft import validate_conversation

    prefs = synthetic_preferences(30, seed=2)
    rows = judge_rows(prefs)
    for acc in (1.0, 0.0):
        convs = warmup_conversations(prefs, accuracy=acc, seed=0)
        assert len(convs) == 60 and all(c["enable_thinking"] is False for c in convs)
        for c, r in zip(convs, rows):
            assert c["messages"][:-1] == r["messages"]
            validate_conversation(c)  # the SFT schema
            j = parse_judgement(c["messages"][-1]["content"])
            s1, s2, rank = r["answer"]
            assert (j.score_1, j.score_2, j.ranking) == ((s1, s2, rank) if acc else (s2, s1, 7 - rank))
    half = warmup_conversations(prefs, accuracy=0.5, seed=0)
    right = sum(parse_judgement(c["messages"][-1]["content"]).ranking == r["answer"][2] for c, r in zip(half, rows))
    assert 15 <= right <= 45
    with pytest.raises(ValueError, match="accuracy"):
        warmup_conversations(prefs, accuracy=2)


def test_judge_metrics_by_hand():
    from tandem.trainer.rl.judge_eval import judge_metrics

    prefs = [{**GOOD, "id": "a"}, {**GOOD, "id": "b", "score_1": 1, "score_2": 5, "ranking": 6}]
    rows = judge_rows(prefs)  # a, a swapped (2, 4, 5), b (1, 5, 6), b swapped (5, 1, 1)
    outputs = [V.format(4, 2, 2), V.format(2, 4, 5),      # a: right both ways
               V.format(4, 2, 2), "no verdict"]            # b: wrong, then a format error
    m = judge_metrics(rows, outputs)
    assert m["pairs"] == 2 and m["agreement"] == 0.5 and m["swap_consistency"] == 0.5
    assert m["format_error_frac"] == 0.25 and m["reward_mean"] == (0 + 0 - (3 + 3 + 4) - 23) / 4
    with pytest.raises(ValueError, match="two orders"):
        judge_metrics(rows[:3], outputs[:3])


def test_judge_eval_cli_on_a_tiny_checkpoint(tmp_path, capsys):
    from tandem.model import HybridConfig, HybridLM
    from tandem.trainer.rl.judge_eval import main as eval_main

    HybridLM(HybridConfig.preset("tiny"), init_seed=0).save_pretrained(tmp_path / "judge")
    prefs = tmp_path / "p.jsonl"
    prefs.write_text(json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "ranking": 5}) + "\n")
    eval_main(["--judge", str(tmp_path / "judge"), "--prefs", str(prefs), "--max-new-tokens", "2",
               "--out", str(tmp_path / "m.json")])
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["pairs"] == 2 and m["judgements"] == 4 and 0 <= m["agreement"] <= 1
    assert json.loads(capsys.readouterr().out) == m


def test_same_style_pairs_score_alike_and_agree_on_ties(tmp_path):
    """--same-style: a share of pairs of one style, equal scores, ranking 3 or 4 ("slightly", the 1–6 scale's
    nearest to a tie); agreement on such a label means scoring both alike, not picking its arbitrary side."""
    from tandem.data_pipelines.preferences import main as prefs_main, synthetic_preferences
    from tandem.trainer.rl.environments.genrm import GenRMEnv
    from tandem.trainer.rl.genrm import agrees

    rows = synthetic_preferences(400, seed=3, kinds=("copy",), styles=("correct_concise", "correct_rambling"),
                                 same_style_frac=0.3)
    same = [r for r in rows if r["metadata"]["styles"][0] == r["metadata"]["styles"][1]]
    assert 0.2 < len(same) / len(rows) < 0.4
    assert all(r["score_1"] == r["score_2"] and r["ranking"] in (3, 4) for r in same)
    assert all(r["score_1"] != r["score_2"] for r in rows if r not in same)
    # without the option the draws are what they always were
    assert synthetic_preferences(50, seed=3) == synthetic_preferences(50, seed=3, same_style_frac=0.0)
    with pytest.raises(ValueError, match="same_style_frac"):
        synthetic_preferences(4, same_style_frac=1.5)
    with pytest.raises(SystemExit, match="--same-style must be in"):
        prefs_main(["--synthetic", "4", "--out", str(tmp_path / "p.jsonl"), "--same-style", "2"])

    assert agrees(5, 5, 3, (5, 5, 4)) and agrees(3, 3, 4, (5, 5, 3))  # a tie scored as a tie
    assert not agrees(5, 3, 2, (5, 5, 3))  # the label's "slightly 1" is no preference to agree with
    assert agrees(4, 2, 2, (5, 3, 2)) and not agrees(2, 4, 5, (5, 3, 2))
    assert agrees(4, 4, 1, (4, 4, 1)) and not agrees(4, 4, 6, (4, 4, 1))  # equal scores, a strong ranking: a preference
    env = GenRMEnv()
    v = env.verify({"answer": [5, 5, 4]}, '{"score_1": 5, "score_2": 5, "ranking": 3}')
    assert v.components["agree"] == 1.0 and v.reward == -1.0  # only the ranking is one off
