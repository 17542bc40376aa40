"""The ``data``, ``tokenizer`` and ``train`` sections of a recipe."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from adaptive.registry import ComponentSpec


DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: ComponentSpec = Field(default=ComponentSpec(name="wiki_offline"),
        description="a registered dataset (adaptive components dataset)")
    seq_len: int = Field(default=128, gt=1, description="tokens per training sequence")
    validation_fraction: float = Field(default=0.05, gt=0, lt=1,
        description="share of documents held out for validation")
    respect_doc_boundaries: bool = Field(default=True,
        description="attention and routing never cross documents in a packed sequence")
    cache_dir: str | None = Field(default=None,
        description="where trained tokenizers and token arrays are cached "
        "(default $ADAPTIVE_CACHE, else ~/.cache/adaptive)")


class TokenizerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["bpe", "file"] = Field(default="bpe",
        description="bpe: train a byte-level BPE on the training split; file: load `path`")
    vocab_size: int = Field(default=2048, ge=260,
        description="byte-level BPE vocabulary, trained on the training split")
    path: str | None = Field(default=None, description="a tokenizers JSON file, with kind=file")

    @model_validator(mode="after")
    def _path_with_file(self) -> "TokenizerConfig":
        if self.kind == "file" and not self.path:
            raise ValueError("kind=file needs tokenizer.path (a tokenizers JSON file), or use kind=bpe")
        return self


class DistributedConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    strategy: Literal["auto", "none", "ddp", "fsdp2"] = Field(
        default="auto", description="auto: ddp when launched by torchrun with more than one process, else none")
    backend: Literal["auto", "nccl", "gloo"] = Field(default="auto", description="auto: nccl on CUDA, gloo on CPU")


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: int | None = Field(default=300, gt=0,
        description="optimizer steps; the run stops at the first of steps/tokens/flop_budget that is set")
    tokens: int | None = Field(default=None, gt=0, description="stop after this many training tokens")
    flop_budget: float | None = Field(default=None, gt=0,
        description="stop after this many training FLOPs (accountant)")
    batch_size: int = Field(default=16, gt=0,
        description="sequences per optimizer step, summed over processes and accumulation micro-steps")
    grad_accum: int = Field(default=1, gt=0,
        description="micro-steps per optimizer step (each runs batch_size/(grad_accum*processes) sequences)")
    lr: float = Field(default=3e-3, gt=0, description="peak learning rate")
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1, description="final learning rate as a fraction of lr")
    schedule: Literal["wsd", "cosine", "constant"] = Field(default="wsd",
        description="warmup-stable-decay, cosine, or constant after warmup")
    warmup_fraction: float = Field(default=0.05, ge=0, lt=1, description="share of the steps spent in linear warmup")
    decay_fraction: float = Field(default=0.2, ge=0, le=1,
        description="wsd: share of the steps spent in the final linear decay")
    weight_decay: float = Field(default=0.1, ge=0,
        description="AdamW decoupled weight decay (matrices only; norms and biases get none)")
    betas: tuple[float, float] = Field(default=(0.9, 0.95), description="AdamW betas")
    grad_clip: float | None = Field(default=1.0, gt=0,
        description="clip the global gradient norm to this (null: no clipping)")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(default="auto",
        description="autocast dtype; auto: bfloat16 on CUDA, float32 on CPU")
    compile: bool = Field(default=False, description="torch.compile the model")
    device: str = Field(default="auto", description="auto, cpu, cuda or cuda:N")
    out_dir: str | None = Field(default=None, description="run directory (default runs/<recipe name>-<timestamp>)")
    init_from: str | None = Field(default=None, description="initialise the model from these weights at step 0: a "
        "converted or uptrained model directory (`adaptive convert ... --recipe R --init ...` sets it), a "
        "checkpoint directory, or a run directory (its latest checkpoint); every tensor must match the recipe's "
        "model; a resumed run ignores it")
    log_every: int = Field(default=10, gt=0, description="steps between metrics.jsonl records and progress updates")
    eval_every: int = Field(default=100, gt=0,
        description="steps between validation-loss evaluations (and one at the end)")
    eval_batches: int = Field(default=8, gt=0,
        description="validation batches per evaluation (fixed batches, same every time)")
    checkpoint_every: int = Field(default=100, gt=0, description="steps between checkpoints (and one at the end)")
    keep_checkpoints: int = Field(default=2, gt=0, description="how many of the newest checkpoints to keep")
    tensorboard: bool = Field(default=True,
        description="also write TensorBoard events when the tensorboard package is installed")
    progress_bar: bool = Field(default=True, description="show a rich progress bar on a terminal")
    distributed: DistributedConfig = DistributedConfig()

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        if not DEVICE.fullmatch(device):
            raise ValueError(f"unknown device {device!r} (valid: auto, cpu, cuda, cuda:N, mps)")
        return device

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        problems = []
        if all(getattr(self, k) is None for k in ("steps", "tokens", "flop_budget")):
            problems.append("set train.steps, train.tokens or train.flop_budget (the run stops at the first reached)")
        if self.batch_size % self.grad_accum:
            problems.append(f"train.batch_size={self.batch_size} sequences do not divide evenly into "
                            f"train.grad_accum={self.grad_accum} micro-steps")
        if problems:
            raise ValueError("; ".join(problems))
        return self
