"""The model: Llama-style parts, the recursion engine, KV storage."""

from adaptive.model.cache import KVCache, KVStore
from adaptive.model.config import PRESETS, ModelConfig
from adaptive.model.transformer import AdaptiveLM, build_model, next_token_loss

__all__ = ["PRESETS", "AdaptiveLM", "KVCache", "KVStore", "ModelConfig", "build_model", "next_token_loss"]
