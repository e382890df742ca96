"""The configs of the build-memory tests: expert-dominated (≈97% of its parameters are routed experts) and
dense (no MoE; no tensor above 6% of the model), each large enough that RSS measures it (~0.3–0.8 GB fp32)."""

from tandem.model import HybridConfig

BUILD_CFG = HybridConfig.preset(
    "tiny", hybrid_override_pattern="E*EE", hidden_size=512, moe_intermediate_size=1024, n_routed_experts=64,
    num_experts_per_tok=2, moe_shared_expert_intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
    head_dim=64,
)

BUILD_DENSE_CFG = HybridConfig.preset(
    "tiny", hybrid_override_pattern="M-M*M-M-M*M-M-", hidden_size=1024, intermediate_size=2048, num_attention_heads=8,
    num_key_value_heads=2, head_dim=128, mamba_num_heads=32, mamba_head_dim=64,
)
#: fewer experts than expert-data-parallel ranks: FSDP2 cuts each expert's rows (Shard(1)) instead of the experts
BUILD_FEW_EXPERTS_CFG = BUILD_CFG.replace(n_routed_experts=2, hidden_size=128, moe_intermediate_size=256)
CONFIGS = {"experts": BUILD_CFG, "dense": BUILD_DENSE_CFG, "few_experts": BUILD_FEW_EXPERTS_CFG}
