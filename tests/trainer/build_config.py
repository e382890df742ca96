"""The expert-dominated config of the build-memory tests (≈97% of its parameters are routed experts)."""

from tandem.model import HybridConfig

BUILD_CFG = HybridConfig.preset(
    "tiny", hybrid_override_pattern="E*EE", hidden_size=512, moe_intermediate_size=1024, n_routed_experts=64,
    num_experts_per_tok=2, moe_shared_expert_intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
    head_dim=64,
)
