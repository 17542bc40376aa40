"""The ``model`` section of a recipe: the Llama shape, the recursion depth, and the named components."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from adaptive.registry import ComponentSpec

# SmolLM shapes (SPEC §2) and small shapes that train on a 2-core CPU.
PRESETS: dict[str, dict[str, int]] = {
    "micro": dict(num_layers=5, d_model=64, num_heads=4, num_kv_heads=2, d_ffn=172, vocab_size=512, max_seq_len=128),
    "tiny": dict(num_layers=8, d_model=128, num_heads=4, num_kv_heads=2, d_ffn=344, vocab_size=2048, max_seq_len=256),
    "smollm-135m": dict(num_layers=30, d_model=576, num_heads=9, num_kv_heads=3, d_ffn=1536, vocab_size=49152, max_seq_len=2048),
    "smollm-360m": dict(num_layers=32, d_model=960, num_heads=15, num_kv_heads=5, d_ffn=2560, vocab_size=49152, max_seq_len=2048),
    "smollm-730m": dict(num_layers=26, d_model=1536, num_heads=24, num_kv_heads=8, d_ffn=4096, vocab_size=49152, max_seq_len=2048),
    "smollm-1.7b": dict(num_layers=24, d_model=2048, num_heads=32, num_kv_heads=32, d_ffn=8192, vocab_size=49152, max_seq_len=2048),
}
class RopeScaling(BaseModel):
    """Llama 3 RoPE frequency scaling (``rope_scaling`` of Llama 3.1/3.2): wavelengths longer than
    ``original_max_position_embeddings / low_freq_factor`` are stretched by ``factor``, those shorter than
    ``original_max_position_embeddings / high_freq_factor`` are kept, and the band between is interpolated."""

    model_config = ConfigDict(extra="forbid")

    rope_type: Literal["llama3"] = Field(description="the scaling rule; only llama3 is implemented")
    factor: float = Field(ge=1, description="how much the low frequencies are stretched")
    low_freq_factor: float = Field(gt=0, description="original context / low_freq_factor: longest kept-as-is band edge")
    high_freq_factor: float = Field(gt=0, description="original context / high_freq_factor: shortest wavelength scaled")
    original_max_position_embeddings: int = Field(gt=0, description="the context length the model was pretrained on")

    @model_validator(mode="after")
    def _ordered(self) -> "RopeScaling":
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"high_freq_factor={self.high_freq_factor} must exceed low_freq_factor={self.low_freq_factor}")
        return self


SHAPE_KEYS = ("num_layers", "d_model", "num_heads", "num_kv_heads", "d_ffn", "vocab_size", "max_seq_len")


class ModelConfig(BaseModel):
    """Shape of a Llama-style decoder plus the components that make it adaptive.

    ``preset`` fills any shape key left unset; ``vocab_size`` may be left to the tokenizer.
    """

    model_config = ConfigDict(extra="forbid")

    preset: str | None = Field(default=None, description=f"one of {', '.join(PRESETS)}")
    num_layers: int | None = Field(default=None, gt=0, description="logical layers, unrolled depth")
    d_model: int | None = Field(default=None, gt=0, description="hidden width")
    num_heads: int | None = Field(default=None, gt=0, description="query heads; must divide d_model")
    num_kv_heads: int | None = Field(default=None, gt=0, description="key/value heads (GQA); must divide num_heads")
    d_ffn: int | None = Field(default=None, gt=0, description="inner width of the feed-forward block")
    vocab_size: int | None = Field(default=None, gt=0, description="embedding rows; unset or the preset's value: the tokenizer's size; another value must be at least the tokenizer's size (the rest is padding)")
    max_seq_len: int | None = Field(default=None, gt=0, description="longest context (default KV-cache length)")
    rope_theta: float = Field(default=10000.0, gt=0, description="RoPE base")
    rope_scaling: RopeScaling | None = Field(default=None, description="Llama 3 frequency scaling {rope_type: llama3, "
                                             "factor, low_freq_factor, high_freq_factor, original_max_position_embeddings}")
    norm_eps: float = Field(default=1e-5, gt=0, description="RMSNorm epsilon")
    init_std: float = Field(default=0.02, gt=0, description="std of the normal init of every linear and embedding")
    tie_embeddings: bool = Field(default=True, description="LM head shares the embedding matrix")
    num_recursions: int = Field(default=1, ge=1, description="N_r, recursion steps of the shared block")
    per_step_norms: bool = Field(default=False, description="each recursion step gets its own RMSNorm weights")
    sharing: ComponentSpec = ComponentSpec(name="none")
    router: ComponentSpec = ComponentSpec(name="all")
    kv_policy: ComponentSpec = ComponentSpec(name="full")
    depth_scheduler: ComponentSpec = ComponentSpec(name="constant")
    attention: ComponentSpec = ComponentSpec(name="sdpa")
    ffn: ComponentSpec = ComponentSpec(name="swiglu")

    @model_validator(mode="before")
    @classmethod
    def _fill_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("preset") is None:
            return data
        if not isinstance(data["preset"], str) or data["preset"] not in PRESETS:
            return data  # reported on the preset key by _known_preset
        preset = data["preset"]
        return {**PRESETS[preset], **{k: v for k, v in data.items() if v is not None}}

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, preset: str | None) -> str | None:
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r} (valid: {', '.join(PRESETS)})")
        return preset

    @model_validator(mode="after")
    def _check_shape(self) -> "ModelConfig":
        missing = [k for k in SHAPE_KEYS if k != "vocab_size" and getattr(self, k) is None]
        if missing:
            raise ValueError(f"set {', '.join(missing)} or a preset ({', '.join(PRESETS)})")
        problems = []  # every shape problem at once
        if self.d_model % self.num_heads:
            problems.append(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            problems.append(f"num_heads={self.num_heads} is not divisible by num_kv_heads={self.num_kv_heads}")
        if not self.d_model % self.num_heads and (self.d_model // self.num_heads) % 2:
            problems.append(f"head dim d_model/num_heads={self.d_model // self.num_heads} must be even for RoPE")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads


# recipe key in ``model`` -> registry kind
MODEL_COMPONENTS = {
    "sharing": "sharing_scheme",
    "router": "router",
    "kv_policy": "kv_policy",
    "depth_scheduler": "depth_scheduler",
    "attention": "attention_backend",
    "ffn": "ffn",
}
