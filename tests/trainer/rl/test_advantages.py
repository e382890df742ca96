"""Group advantages against hand-computed values (GRPO, RLOO and DAPO's definitions), filters and dynamic sampling."""

import math

import pytest
import torch

from tandem.trainer.rl.advantages import (
    ADVANTAGE_ESTIMATORS, GroupAccumulator, advantage_metrics, compute_advantages, dynamic_sampling_filter,
)

S3 = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1]: mean 1/2, Σ(r − 1/2)² = 1, /(4 − 1) = 1/3
EPS = 1e-6


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=torch.float32), atol=tol, rtol=0)


def test_leave_one_out_by_hand():
    rewards = torch.tensor([[1.0, 0, 0, 1], [1, 0, 0, 0]])
    out = compute_advantages(rewards)  # the default estimator
    # group 0: b = [(0+0+1)/3, (1+0+1)/3, (1+0+1)/3, (1+0+0)/3] = [1/3, 2/3, 2/3, 1/3]
    #          r − b = [2/3, −2/3, −2/3, 2/3], divided by std = sqrt(1/3) (+1e-6)
    g0 = [2 / 3 / (S3 + EPS), -2 / 3 / (S3 + EPS), -2 / 3 / (S3 + EPS), 2 / 3 / (S3 + EPS)]
    # group 1: b = [0/3, 1/3, 1/3, 1/3], r − b = [1, −1/3, −1/3, −1/3];
    #          mean 1/4, Σ(r − 1/4)² = 9/16 + 3/16 = 3/4, /3 = 1/4 → std 1/2
    g1 = [1 / (0.5 + EPS), -1 / 3 / (0.5 + EPS), -1 / 3 / (0.5 + EPS), -1 / 3 / (0.5 + EPS)]
    close(out.advantages, [g0, g1])
    assert g0[0] == pytest.approx(1.154699, abs=1e-5) and g1[0] == pytest.approx(2.0, abs=1e-5)
    assert out.loss_mask.all()
    close(out.std, [[S3], [0.5]])


def test_group_mean_and_no_std_by_hand():
    rewards = torch.tensor([[1.0, 0, 0, 0]])
    # TRL: (r − 1/4) / (1/2 + eps)
    close(compute_advantages(rewards, estimator="group_mean").advantages,
          [[0.75 / (0.5 + EPS), -0.25 / (0.5 + EPS), -0.25 / (0.5 + EPS), -0.25 / (0.5 + EPS)]])
    # Dr. GRPO: r − 1/4
    close(compute_advantages(rewards, estimator="no_std").advantages, [[0.75, -0.25, -0.25, -0.25]])
    assert {"leave_one_out", "group_mean", "no_std"} <= set(ADVANTAGE_ESTIMATORS)


@pytest.mark.parametrize("estimator", ["leave_one_out", "group_mean", "no_std"])
def test_zero_variance_and_size_one_groups_give_zero(estimator):
    same = torch.tensor([[1.0, 1, 1, 1], [0.3, 0.3, 0.3, 0.3]])
    out = compute_advantages(same, estimator=estimator)
    assert torch.equal(out.advantages, torch.zeros_like(same))
    single = torch.tensor([[1.0], [0.0]])
    assert torch.equal(compute_advantages(single, estimator=estimator).advantages, torch.zeros_like(single))


def test_overlong_filtering_keeps_truncated_reward_in_the_baseline():
    rewards = torch.tensor([[1.0, 0, 0, 1]])
    truncated = torch.tensor([[False, False, False, True]])
    out = compute_advantages(rewards, truncated=truncated, overlong_filtering=True)
    # the truncated rollout's reward 1 still enters b_0 = (0+0+1)/3 and the std sqrt(1/3): the others keep
    # the values of the unfiltered group; with it dropped from the group, A_0 would be 1/sqrt(1/3) = 1.732
    a = 2 / 3 / (S3 + EPS)
    close(out.advantages, [[a, -a, -a, 0.0]])
    assert out.loss_mask.tolist() == [[True, True, True, False]]
    # without the flag the mask is ignored
    assert compute_advantages(rewards, truncated=truncated).loss_mask.all()
    with pytest.raises(ValueError, match="truncated"):
        compute_advantages(rewards, overlong_filtering=True)


def test_advantage_clip_is_symmetric():
    rewards = torch.tensor([[1.0, 0, 0, 0], [0.0, 1, 1, 1]])
    out = compute_advantages(rewards, clip=1.0)
    # unclipped: [2, −2/3, −2/3, −2/3] and its mirror [−2, 2/3, 2/3, 2/3]
    close(out.advantages, [[1.0, -1 / 3 / (0.5 + EPS)] + [-1 / 3 / (0.5 + EPS)] * 2,
                           [-1.0, 1 / 3 / (0.5 + EPS)] + [1 / 3 / (0.5 + EPS)] * 2])
    with pytest.raises(ValueError):
        compute_advantages(rewards, clip=0.0)


def test_metrics():
    rewards = torch.tensor([[1.0, 0, 0, 1], [1, 1, 1, 1]])
    out = compute_advantages(rewards, truncated=torch.tensor([[0, 0, 0, 1], [0, 0, 0, 0]]).bool(),
                             overlong_filtering=True)
    m = advantage_metrics(rewards, out)
    a = 2 / 3 / (S3 + EPS)
    assert float(m["frac_reward_zero_std"]) == 0.5
    assert float(m["reward_mean"]) == pytest.approx(0.75)
    assert float(m["reward_std"]) == pytest.approx(torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 1]).std().item())
    # kept advantages: [a, −a, −a, 0, 0, 0, 0] (7 of 8 rollouts)
    assert float(m["advantage_mean"]) == pytest.approx(-a / 7, abs=1e-5)
    assert float(m["advantage_min"]) == pytest.approx(-a, abs=1e-5)
    assert float(m["advantage_max"]) == pytest.approx(a, abs=1e-5)
    assert float(m["advantage_std"]) == pytest.approx(torch.tensor([a, -a, -a, 0, 0, 0, 0]).std().item(), abs=1e-5)
    assert float(m["frac_filtered"]) == 1 / 8


def test_dynamic_sampling_filter():
    rewards = torch.tensor([[1.0, 1], [0, 1], [0, 0], [1, 0]])
    f = dynamic_sampling_filter(rewards)
    assert f.keep.tolist() == [False, True, False, True]
    assert (f.num_kept, f.num_refill) == (2, 2)
    assert dynamic_sampling_filter(rewards, target=5).num_refill == 3


def test_group_accumulator_refills_until_target():
    acc = GroupAccumulator(target=3, max_rounds=3)
    assert acc.needed == 3 and not acc.done
    m0 = acc.add(torch.tensor([[1.0, 1], [0, 1], [0, 0], [1, 0]]))
    assert m0.tolist() == [False, True, False, True] and acc.needed == 1 and not acc.done
    m1 = acc.add(torch.tensor([[0.0, 0], [1, 0], [0, 1]]))  # two qualify, one is needed: the first is kept
    assert m1.tolist() == [False, True, False]
    assert acc.kept == [(0, 1), (0, 3), (1, 1)]
    assert acc.reached_target and acc.done and acc.rounds == 2 and acc.seen == 7
    with pytest.raises(RuntimeError):
        acc.add(torch.tensor([[0.0, 1]]))


def test_group_accumulator_gives_up_after_max_rounds():
    acc = GroupAccumulator(target=2, max_rounds=2)
    acc.add(torch.tensor([[1.0, 1], [0, 1]]))
    acc.add(torch.tensor([[0.0, 0], [1, 1]]))
    assert acc.done and not acc.reached_target and acc.kept == [(0, 1)] and acc.needed == 1
