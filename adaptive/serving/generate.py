"""Decoding with the KV policy's cache: prefill the (left-padded) prompts, then one token per step.

Every router decides with its causal inference rule here, so cached decoding equals the full forward,
and a token that exits early really skips the deeper recursion steps (the engine does not call the
block for a step that no token of the batch reaches, and gathers only the tokens that continue).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from adaptive.model.transformer import AdaptiveLM

Tensor = torch.Tensor


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    greedy: bool = False
    temperature: float = 1.0
    top_k: int | None = 50
    eos_id: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.greedy and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (or use greedy), got {self.temperature}")


@dataclass
class Generation:
    tokens: list[list[int]]  # generated ids per prompt (stopping at eos, which is kept)
    depths: list[list[int]] = field(default_factory=list)  # recursion steps each generated token's input ran


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Token ids, validity mask and position ids (restarting after the padding) for a ragged batch."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    tokens_BT = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    valid_BT = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):  # host-side batch assembly, once per request, not in the model
        tokens_BT[row, width - len(prompt):] = torch.tensor(prompt)
        valid_BT[row, width - len(prompt):] = True
    position_ids_BT = (valid_BT.long().cumsum(1) - 1).clamp(min=0)
    return tokens_BT.to(device), valid_BT.to(device), position_ids_BT.to(device)


def sample(logits_BV: Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> Tensor:
    if cfg.greedy:
        return logits_BV.argmax(-1)
    logits_BV = logits_BV.float() / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < logits_BV.shape[-1]:
        kth_B1 = logits_BV.topk(cfg.top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    probs_BV = torch.softmax(logits_BV, dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: AdaptiveLM, prompts: list[list[int]], cfg: SamplingConfig, pad_id: int = 0) -> Generation:
    """Continue each prompt by up to ``cfg.max_new_tokens`` tokens."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.seed is not None else None
    tokens_BT, valid_BT, position_ids_BT = left_pad(prompts, pad_id, device)
    B, T = tokens_BT.shape
    cache = model.new_cache(B, T + cfg.max_new_tokens)
    out = model(tokens_BT, position_ids_BT=position_ids_BT, valid_BT=valid_BT, cache=cache)
    next_B = sample(out.logits_BTV[:, -1], cfg, generator)
    position_B = position_ids_BT[:, -1]
    steps_B_list, depth_B_list = [next_B], []
    done_B = torch.zeros(B, dtype=torch.bool, device=device)
    for _ in range(cfg.max_new_tokens - 1):
        if cfg.eos_id is not None:
            done_B = done_B | (next_B == cfg.eos_id)
            if bool(done_B.all()):  # host sync once per generated token, outside the model
                break
        position_B = position_B + 1
        out = model(next_B[:, None], position_ids_BT=position_B[:, None], cache=cache)
        if out.stats.depth_BT is not None:
            depth_B_list.append(out.stats.depth_BT[:, 0])
        next_B = sample(out.logits_BTV[:, -1], cfg, generator)
        steps_B_list.append(next_B)
    model.train(was_training)
    return Generation(_cut_at_eos(torch.stack(steps_B_list, 1).tolist(), cfg.eos_id),
                      torch.stack(depth_B_list, 1).tolist() if depth_B_list else [])


def _cut_at_eos(rows: list[list[int]], eos_id: int | None) -> list[list[int]]:
    if eos_id is None:
        return rows
    return [row[: row.index(eos_id) + 1] if eos_id in row else row for row in rows]
