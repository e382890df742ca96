import torch

from tandem.model import HybridConfig, HybridLM
from tandem.trainer.parallel.expert_balance import ExpertBalancer, moe_layers


def test_expert_bias_moves_toward_balance_on_skewed_input():
    torch.manual_seed(0)
    model = HybridLM(HybridConfig.preset("tiny", hybrid_override_pattern="E"), init_seed=0).train()
    moe = moe_layers(model)[0]
    with torch.no_grad():  # diverse scores, but a bias that sends every token to experts 0 and 1
        moe.gate.weight.normal_(std=0.3)
        moe.gate.e_score_correction_bias.copy_(torch.tensor([1.0, 1.0, 0, 0, 0, 0, 0, 0]))
    assert moe.tokens_per_expert_acc.sum() == 0
    balancer = ExpertBalancer(model, rate=0.05)
    ids = torch.randint(0, 512, (4, 32))
    loads = []
    for step in range(40):
        with torch.no_grad():
            model(ids)
        bias_before = moe.gate.e_score_correction_bias.clone()
        counts = moe.tokens_per_expert_acc.clone()
        metrics = balancer(finite=True)
        loads.append(metrics["moe/max_load"])
        delta = moe.gate.e_score_correction_bias - bias_before
        torch.testing.assert_close(delta, 0.05 * torch.sign(counts.mean() - counts).float())
        assert moe.tokens_per_expert_acc.sum() == 0  # reset after every step
    assert loads[0] == 4.0 and max(loads[-10:]) < 2.0, loads  # all tokens on 2 of 8 experts → balanced
    assert moe.gate.e_score_correction_bias.requires_grad is False


def test_skipped_step_does_not_move_the_bias():
    model = HybridLM(HybridConfig.preset("tiny", hybrid_override_pattern="E"), init_seed=0).train()
    moe = moe_layers(model)[0]
    model(torch.randint(0, 512, (2, 8)))
    ExpertBalancer(model, rate=0.1)(finite=False)
    assert moe.gate.e_score_correction_bias.abs().sum() == 0 and moe.tokens_per_expert_acc.sum() == 0
