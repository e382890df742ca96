"""RLHF comparison maths on hand-made tables: pairings (circular vs all pairs), the tie-break, per-rollout
means, group shaping."""

import pytest
import torch

from tandem.trainer.rl.genrm import (
    comparison_pairs, length_penalty, parse_judgement, rollout_rewards, shortest_top_bonus, with_default,
)


@pytest.mark.parametrize("G,circular,all_pairs", [(1, 0, 0), (2, 2, 1), (3, 3, 3), (4, 4, 6), (8, 8, 28), (16, 16, 120)])
def test_pair_counts(G, circular, all_pairs):
    c, a = comparison_pairs(G, "circular"), comparison_pairs(G, "all")
    assert c.shape == (circular, 2) and a.shape == (all_pairs, 2)
    if G >= 3:  # every rollout is compared twice (circular) or with every other one (all pairs)
        assert torch.bincount(c.flatten(), minlength=G).tolist() == [2] * G
        assert torch.bincount(a.flatten(), minlength=G).tolist() == [G - 1] * G
        assert len({tuple(sorted(p)) for p in a.tolist()}) == all_pairs and all(i != j for i, j in a.tolist())


def test_pairings_by_name():
    assert comparison_pairs(4, "circular").tolist() == [[0, 1], [1, 2], [2, 3], [3, 0]]
    assert comparison_pairs(3, "all").tolist() == [[0, 1], [0, 2], [1, 2]]
    with pytest.raises(ValueError, match="pairing must be one of"):
        comparison_pairs(3, "random")


def test_tie_break_and_means_on_a_hand_table():
    pairs = comparison_pairs(3, "circular")  # (0,1) (1,2) (2,0)
    # verdicts per comparison: (score_1, score_2, ranking); group 2 = the same pairs judged differently
    s1 = torch.tensor([[5.0, 3.0, 4.0], [1.0, 2.0, 3.0]])
    s2 = torch.tensor([[2.0, 3.0, 4.0], [1.0, 5.0, 3.0]])
    rk = torch.tensor([[1.0, 2.0, 3.5], [6.0, 6.0, 4.0]])
    r = rollout_rewards(s1, s2, rk, pairs, G=3)
    # group 1: (1,2) is a tie with ranking 2 → adj 1.5 → 4.5 / 1.5; (2,0) ties at the default 3.5 → no change
    assert r[0].tolist() == [(5 + 4) / 2, (2 + 4.5) / 2, (1.5 + 4) / 2]
    # group 2: (0,1) ties with ranking 6 → adj −2.5 → −1.5 / 3.5; (2,0) ties with ranking 4 → adj −0.5 → 2.5 / 3.5
    assert r[1].tolist() == [(-1.5 + 3.5) / 2, (3.5 + 2) / 2, (5 + 2.5) / 2]
    plain = rollout_rewards(s1, s2, rk, pairs, G=3, tie_break=False)
    assert plain[0].tolist() == [(5 + 4) / 2, (2 + 3) / 2, (3 + 4) / 2]


def test_all_pairs_means_and_repeated_judge_samples():
    pairs = comparison_pairs(3, "all")  # (0,1) (0,2) (1,2)
    s1, s2, rk = torch.tensor([[5.0, 4.0, 2.0]]), torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[1.0, 2.0, 5.0]])
    assert rollout_rewards(s1, s2, rk, pairs, G=3)[0].tolist() == [4.5, 1.5, 2.5]
    # two judge samples of each pair = the pairs twice; the mean is over all of a rollout's comparison scores
    twice = torch.cat([pairs, pairs])
    s1b, s2b = torch.tensor([[4.0, 5.0, 1.0]]), torch.tensor([[2.0, 1.0, 5.0]])  # a second sample, no ties
    r = rollout_rewards(torch.cat([s1, s1b], 1), torch.cat([s2, s2b], 1), torch.cat([rk, rk], 1), twice, G=3)
    assert r[0].tolist() == [(5 + 4 + 4 + 5) / 4, (1 + 2 + 2 + 1) / 4, (2 + 3 + 1 + 5) / 4]


def test_failed_parses_enter_as_the_neutral_default():
    j = with_default(parse_judgement("garbage"))
    r = rollout_rewards(*(torch.tensor([[v]]) for v in j), comparison_pairs(2, "all"), G=2)
    assert r.tolist() == [[3.0, 3.0]]


def test_group_shaping():
    rewards = torch.tensor([[4.0, 4.0, 2.0, 4.0], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    lengths = torch.tensor([[10, 5, 1, 5], [7, 7, 7, 7]])
    bonus = shortest_top_bonus(rewards, lengths, 0.5)
    assert bonus.tolist() == [[4.0, 4.5, 2.0, 4.5], [1.5, 1.5, 1.5, 1.5]]  # the short wrong one (2.0) gets none
    pen = length_penalty(rewards, torch.tensor([[10, 30, 20, 20], [7, 7, 7, 7]]), 0.2)
    assert pen.sum(1).tolist() == pytest.approx(rewards.sum(1).tolist())  # zero-centred per group
    assert (pen - rewards)[0].tolist() == pytest.approx([0.1, -0.1, 0.0, 0.0]) and pen[1].tolist() == rewards[1].tolist()
