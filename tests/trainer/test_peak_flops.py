"""MFU is measured against the peak of the format the GEMMs run in, or not reported."""

import pytest

from tandem.trainer.metrics import gemm_format, peak_flops_per_device


@pytest.mark.parametrize("precision,backend,device,peak", [
    ("auto", "emulate", "NVIDIA H100 80GB HBM3", 989e12),
    ("bf16", "emulate", "NVIDIA H200", 989e12),
    ("fp8_delayed", "te", "NVIDIA H100 80GB HBM3", 1979e12),  # Transformer Engine runs FP8 GEMMs
    ("fp8_delayed", "emulate", "NVIDIA H100 80GB HBM3", 989e12),  # emulated: quantise, then bf16 GEMMs
    ("nvfp4", "te", "NVIDIA B200", 9000e12),
    ("nvfp4", "te", "NVIDIA GB200", 10000e12),  # GB200, not B200's entry
    ("nvfp4", "te", "NVIDIA H100 80GB HBM3", None),  # Hopper has no FP4 tensor cores: absent, not bf16's
    ("fp8_current", "te", "NVIDIA A100-SXM4-80GB", None),
    ("fp32", "emulate", "NVIDIA H100 80GB HBM3", None),
    ("auto", "emulate", "Some Future GPU", None),
])
def test_peak_follows_the_gemm_format(precision, backend, device, peak):
    assert peak_flops_per_device(None, precision, backend, device_name=device) == peak


def test_override_wins_and_formats():
    assert peak_flops_per_device(123.0, "fp32", "emulate", device_name="cpu") == 123.0
    assert (gemm_format("mxfp8", "te"), gemm_format("mxfp8", "emulate")) == ("fp8", "bf16")
