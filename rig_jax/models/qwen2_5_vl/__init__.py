"""Qwen2.5-VL in Flax Linen: vision tower, Qwen2 decoder with M-RoPE and KV cache, full model."""
from rig_jax.models.qwen2_5_vl.lm import CACHE_LOGICAL_AXES, TextConfig, TextModel, init_cache
from rig_jax.models.qwen2_5_vl.model import Qwen25VL, Qwen25VLConfig, dummy_inputs, scatter_image_features
from rig_jax.models.qwen2_5_vl.vision import VisionConfig, VisionTransformer, num_merged_tokens, vision_inputs

__all__ = [
    "CACHE_LOGICAL_AXES", "Qwen25VL", "Qwen25VLConfig", "TextConfig", "TextModel", "VisionConfig",
    "VisionTransformer", "dummy_inputs", "init_cache", "num_merged_tokens", "scatter_image_features",
    "vision_inputs",
]
