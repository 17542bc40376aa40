"""Export a model as a Hugging Face Llama directory (``adaptive export hf-llama RUN OUT``).

A vanilla model maps one to one. A recursive model whose every token runs the full depth (router ``all``,
and a KV policy under which each step attends first to its own slot, which then holds every token: ``full``,
``recursion_wise``, ``hybrid``) computes what a Llama of its unrolled depth computes, so it is written unrolled: each
logical layer gets a copy of its physical layer's weights (shared weights are copied, not aliased) and of
the norms it uses. A routed model is refused: its tokens take different depths, which a Llama cannot
express. The output holds ``config.json`` (``LlamaForCausalLM``), ``model.safetensors`` and, when the run
has one, ``tokenizer.json``; ``transformers`` loads it without this package.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from adaptive.errors import CheckpointError

Tensor = torch.Tensor

_LAYER_NAMES = {  # ours (below engine.layers.{p}) -> HF (below model.layers.{l})
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "ffn.gate.weight": "mlp.gate_proj.weight",
    "ffn.up.weight": "mlp.up_proj.weight",
    "ffn.down.weight": "mlp.down_proj.weight",
}
_NORM_NAMES = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight"}


def exportable(model) -> str | None:
    """Why ``model`` cannot be written as a Llama, or None when it can."""
    cfg = model.config
    if cfg.ffn.name != "swiglu":
        return f"model.ffn is {cfg.ffn.name!r}; a Llama has a SwiGLU feed-forward block ('swiglu')"
    if model.plan.steps and cfg.router.name != "all":
        return (f"model.router is {cfg.router.name!r}: a routed model gives tokens different depths, which a Llama "
                "cannot express (only router 'all', every token through every step, unrolls to a Llama)")
    policy = model.engine.kv_policy
    for step in range(model.plan.num_steps):  # every token runs every step: its own slot must hold them all
        reads = tuple(policy.reads(step))
        if policy.writes(step) == "none" or reads[:1] != (step,):
            return (f"model.kv_policy is {cfg.kv_policy.name!r}: recursion step {step} attends to keys and values "
                    f"another step wrote (reads {reads}, writes {policy.writes(step)!r}), which an unrolled Llama "
                    "cannot express")
    return None


def hf_llama_state(model) -> dict[str, Tensor]:
    """The HF Llama state dict of ``model`` unrolled to its logical depth (every tensor its own copy)."""
    ours = model.state_dict()
    engine = model.engine
    state = {"model.embed_tokens.weight": ours["embed.weight"], "model.norm.weight": ours["final_norm.weight"]}
    if not model.config.tie_embeddings:
        state["lm_head.weight"] = ours["lm_head.weight"]
    for logical, physical in enumerate(engine.physical_of):
        for suffix, hf in _LAYER_NAMES.items():
            state[f"model.layers.{logical}.{hf}"] = ours[f"engine.layers.{physical}.{suffix}"]
        for suffix, hf in _NORM_NAMES.items():
            state[f"model.layers.{logical}.{hf}"] = ours[f"engine.norms.{engine.norm_index[logical]}.{suffix}"]
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in state.items()}


def hf_llama_config(model) -> dict:
    cfg = model.config
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "vocab_size": model.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ffn,
        "num_hidden_layers": model.plan.num_logical, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "initializer_range": cfg.init_std, "torch_dtype": "float32",
    }
    if cfg.rope_scaling is not None:
        config["rope_scaling"] = cfg.rope_scaling.model_dump()
    return config


def export_hf_llama(run: str | Path, out: str | Path, registry=None) -> Path:
    """Write the model of a run, checkpoint or converted directory as an HF Llama directory ``out``."""
    from safetensors.torch import save_file

    from adaptive.serving.loading import load_run

    if registry is None:
        from adaptive.plugins import get_registry

        registry = get_registry()
    loaded = load_run(run, registry)
    reason = exportable(loaded.model)
    if reason is not None:
        raise CheckpointError(f"{run}: cannot export as a Llama: {reason}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.float() if v.is_floating_point() else v for k, v in hf_llama_state(loaded.model).items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_llama_config(loaded.model), indent=2) + "\n")
    shutil.copyfile(loaded.tokenizer.source, out / "tokenizer.json")
    return out
