"""The ``data``, ``tokenizer`` and ``train`` sections of a recipe."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from adaptive.registry import ComponentSpec


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: ComponentSpec = ComponentSpec(name="wiki_offline")
    seq_len: int = Field(default=128, gt=1, description="tokens per training sequence")
    validation_fraction: float = Field(default=0.05, gt=0, lt=1)
    respect_doc_boundaries: bool = Field(default=True, description="attention and routing never cross documents in a packed sequence")


class TokenizerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["bpe", "file"] = "bpe"
    vocab_size: int = Field(default=2048, ge=260, description="byte-level BPE vocabulary, trained on the training split")
    path: str | None = Field(default=None, description="a tokenizers JSON file, with kind=file")


class DistributedConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    strategy: Literal["none", "ddp", "fsdp2"] = "none"
    backend: Literal["auto", "nccl", "gloo"] = "auto"


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: int | None = Field(default=300, gt=0)
    tokens: int | None = Field(default=None, gt=0, description="stop after this many training tokens")
    flop_budget: float | None = Field(default=None, gt=0, description="stop after this many training FLOPs (accountant)")
    batch_size: int = Field(default=16, gt=0)
    grad_accum: int = Field(default=1, gt=0)
    lr: float = Field(default=3e-3, gt=0)
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1)
    schedule: Literal["wsd", "cosine", "constant"] = "wsd"
    warmup_fraction: float = Field(default=0.05, ge=0, lt=1)
    decay_fraction: float = Field(default=0.2, ge=0, le=1)
    weight_decay: float = Field(default=0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = Field(default=1.0, gt=0)
    dtype: Literal["float32", "bfloat16"] = "float32"
    compile: bool = False
    device: str = "auto"
    out_dir: str | None = None
    log_every: int = Field(default=10, gt=0)
    eval_every: int = Field(default=100, gt=0)
    eval_batches: int = Field(default=8, gt=0)
    checkpoint_every: int = Field(default=100, gt=0)
    keep_checkpoints: int = Field(default=2, gt=0)
    distributed: DistributedConfig = DistributedConfig()
