"""tandem's network: plain ``nn.Module``s on plain tensors (no process groups, no trainer imports)."""

from .cache import CacheBytes, HybridCache
from .config import LAYER_KINDS, PRESETS, HybridConfig
from .hybrid import HybridBlock, HybridLM, ParameterCount

__all__ = ["HybridConfig", "HybridCache", "CacheBytes", "HybridLM", "HybridBlock", "ParameterCount", "LAYER_KINDS", "PRESETS"]
