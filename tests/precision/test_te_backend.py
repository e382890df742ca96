"""The Transformer Engine backend against the emulation. Runs only where TE and a capable GPU exist;
on the CPU machines tandem is developed on it skips with the reason (it has not run on hardware yet)."""

import pytest
import torch

from tandem.kernels.quant import build_quantizers, quantized_linear
from tandem.model.precision import PrecisionSpec
from tandem.model.precision_te import te_unavailable_reason

pytestmark = pytest.mark.gpu


def _need(name):
    reason = te_unavailable_reason(name, torch.device("cuda")) if torch.cuda.is_available() else "no CUDA GPU"
    if reason:
        pytest.skip(f"TE backend for {name} not runnable here: {reason}")


@pytest.mark.parametrize("name,tol", [("fp8_current", 0.02), ("fp8_delayed", 0.05), ("fp8_block", 0.02),
                                      ("mxfp8", 0.02), ("nvfp4", 0.05)])
def test_te_linear_matches_emulation(name, tol):
    _need(name)
    from tandem.model.precision_te import TELinear, build_te_recipe

    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 128, bias=False, device="cuda", dtype=torch.bfloat16)
    te_lin = TELinear(lin, build_te_recipe(PrecisionSpec(name)))
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):  # delayed scaling needs a history
        y_te = te_lin(x)
    y_emu = quantized_linear(x.float(), lin.weight.float(), None, build_quantizers(name))
    err = (y_te.float() - y_emu).norm() / y_emu.norm()
    assert err < tol, f"{name}: TE vs emulation relative error {err:.4f}"
    assert list(te_lin.state_dict()) == ["weight"]
