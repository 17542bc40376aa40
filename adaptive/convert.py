"""Import Hugging Face Llama checkpoints, and initialise a recursive model from a vanilla one.

``adaptive convert hf-llama DIR OUT`` reads a local HF Llama directory (``config.json`` plus
``model.safetensors`` or a sharded ``model.safetensors.index.json``; pickled ``.bin`` files are refused)
and writes our format: ``OUT/model.safetensors`` (our parameter names; tied weights stored once, with the
alias recorded in the metadata as the trainer's checkpoints do) and ``OUT/recipe.yaml`` (a recipe whose
``model`` section is the resolved vanilla shape, ``sharing: none``). A ``tokenizer.json`` next to the
weights is copied and named in the recipe (``tokenizer: {kind: file}``); without one, a warning. Every
tensor's shape is checked against ``config.json`` (a CheckpointError names the tensor).

The two models compute the same function: RMSNorm in float32 with the checkpoint's ``rms_norm_eps``,
RoPE in the rotate-half layout HF stores q/k in, ``rope_theta`` and llama3 ``rope_scaling`` from the
config, attention scaled by ``head_dim ** -0.5``, SwiGLU with SiLU. Configs we cannot reproduce exactly
(biases, another activation, another RoPE scaling, a head_dim that is not hidden_size /
num_attention_heads) are refused with the key named.

With ``--recipe R --init select|average`` the output is R's recursive or MoR model, its shape taken from the
checkpoint and its recursion and components from R, initialised from the vanilla weights
(``init_recursive_from_vanilla``); the saved ``recipe.yaml`` is R with that model section.

``init_recursive_from_vanilla`` fills a recursive model of the same unrolled depth from a vanilla state:

* ``average``: each physical layer (and, with shared norms, its norms) is the mean of the vanilla
  layers at the logical depths it serves;
* ``select`` (stepwise): prelude/coda layers take the vanilla layer at their depth; the i-th of the P
  physical layers of the recursion block, which spans n logical depths starting at a, takes vanilla
  layer ``a + floor(i * n / P)``, evenly spaced over the block (for Cycle: every N_r-th layer, the
  "stepwise" initialisation of Relaxed Recursive Transformers; for Sequence: the first of each group).

With ``per_step_norms`` every logical layer takes the norms of the vanilla layer at its own depth (both
methods). Embeddings, the final norm and an untied head are copied; parameters with no vanilla
counterpart (routers) keep their initialisation.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Literal

import torch

from adaptive.errors import CheckpointError
from adaptive.interfaces import DepthPlan
from adaptive.model.config import ModelConfig, RopeScaling

Tensor = torch.Tensor

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_LAYER_PARTS = {
    "self_attn.q_proj.weight": "engine.layers.{i}.attn.q_proj.weight",
    "self_attn.k_proj.weight": "engine.layers.{i}.attn.k_proj.weight",
    "self_attn.v_proj.weight": "engine.layers.{i}.attn.v_proj.weight",
    "self_attn.o_proj.weight": "engine.layers.{i}.attn.o_proj.weight",
    "mlp.gate_proj.weight": "engine.layers.{i}.ffn.gate.weight",
    "mlp.up_proj.weight": "engine.layers.{i}.ffn.up.weight",
    "mlp.down_proj.weight": "engine.layers.{i}.ffn.down.weight",
    "input_layernorm.weight": "engine.norms.{i}.attn_norm.weight",
    "post_attention_layernorm.weight": "engine.norms.{i}.ffn_norm.weight",
}
_TOP = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "final_norm.weight", "lm_head.weight": "lm_head.weight"}
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")  # a buffer some old checkpoints saved


# ---------------------------------------------------------------------------------------------- HF Llama


def hf_config_to_model(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """A vanilla ModelConfig with the shape of an HF Llama ``config.json``; refuses what we cannot match."""
    problems = []
    if hf.get("model_type") != "llama":
        problems.append(f"model_type: {hf.get('model_type')!r} is not 'llama'")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act: {hf['hidden_act']!r} (only 'silu', SwiGLU, is supported)")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            problems.append(f"{key}: true (Llama layers here have no biases)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else rope
    if rope_type not in (None, "default", "llama3"):
        problems.append(f"{rope_key}.rope_type: {rope_type!r} (supported: 'default', 'llama3')")
    theta = (rope.get("rope_theta") if isinstance(rope, dict) else None) or hf.get("rope_theta", 10000.0)
    scaling = None
    if rope_type == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        try:
            scaling = RopeScaling(rope_type="llama3", **{k: rope.get(k) for k in keys})
        except ValueError as exc:
            problems.append(f"{rope_key}: not a valid llama3 scaling ({' '.join(str(exc).split())})")
    hidden, heads = hf.get("hidden_size"), hf.get("num_attention_heads")
    required = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size")
    missing = [k for k in required if k not in hf]
    problems += [f"{k}: required key is missing" for k in missing]
    if not missing and hf.get("head_dim") not in (None, hidden // heads):
        problems.append(f"head_dim: {hf['head_dim']} differs from hidden_size/num_attention_heads={hidden // heads}")
    if problems:
        raise CheckpointError(f"{source}: cannot convert this checkpoint:\n" + "\n".join(f"  {p}" for p in problems))
    try:
        return ModelConfig(
            num_layers=hf["num_hidden_layers"], d_model=hidden, num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads, d_ffn=hf["intermediate_size"],
            vocab_size=hf["vocab_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
            rope_theta=float(theta), rope_scaling=scaling, norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            init_std=float(hf.get("initializer_range", 0.02)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise CheckpointError(f"{source}: the shape is not a valid model: {exc}") from None


def _read_safetensors(directory: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        found = ", ".join(sorted(p.name for p in directory.iterdir())) or "nothing"
        raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json (found: {found}); "
                              "pickled .bin checkpoints are not loaded (re-save with safe_serialization=True)")
    tensors: dict[str, Tensor] = {}
    for name in files:
        try:
            tensors.update(load_file(str(directory / name)))
        except Exception as exc:  # safetensors raises its own error types, OSError and ValueError
            raise CheckpointError(f"{directory / name}: not a readable safetensors file ({exc})") from None
    return tensors


def load_hf_llama(directory: str | Path) -> tuple[ModelConfig, dict[str, Tensor]]:
    """The ModelConfig and our-format state dict of a local HF Llama checkpoint (safetensors only)."""
    directory = Path(directory)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{directory}: no config.json (expected a Hugging Face model directory)")
    try:
        hf = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_file}: not valid JSON ({exc})") from None
    cfg = hf_config_to_model(hf, str(config_file))
    state: dict[str, Tensor] = {}
    sources: dict[str, str] = {}
    unknown = []
    for name, tensor in _read_safetensors(directory).items():
        if _IGNORED.search(name):
            continue
        layer = _LAYER.match(name)
        target = _LAYER_PARTS.get(layer.group(2), "").format(i=layer.group(1)) if layer else _TOP.get(name)
        if not target:
            unknown.append(name)
            continue
        state[target], sources[target] = tensor, name
    if unknown:
        raise CheckpointError(f"{directory}: unexpected tensors {', '.join(sorted(unknown)[:8])}"
                              + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else ""))
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
        if "embed.weight" in state:
            state["lm_head.weight"] = state["embed.weight"]
    expected = _expected_names(cfg)
    missing = sorted(expected - set(state))
    if missing:
        raise CheckpointError(f"{directory}: missing tensors for {', '.join(missing[:8])}"
                              + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    _check_shapes(cfg, state, sources, config_file)
    return cfg, state


def _check_shapes(cfg: ModelConfig, state: dict[str, Tensor], sources: dict[str, str], config_file: Path) -> None:
    """A CheckpointError naming each tensor whose shape is not what ``config.json`` describes."""
    from adaptive.model import build_model
    from adaptive.plugins import get_registry

    with torch.device("meta"):
        expected = build_model(cfg, get_registry()).state_dict()
    wrong = [f"{sources.get(k, k)} is {tuple(state[k].shape)}, config.json implies {tuple(like.shape)}"
             for k, like in expected.items() if k in state and tuple(state[k].shape) != tuple(like.shape)]
    if wrong:
        more = f" and {len(wrong) - 5} more" if len(wrong) > 5 else ""
        raise CheckpointError(f"{config_file}: the tensors do not match its sizes (hidden_size, intermediate_size, "
                              f"num_attention_heads, num_key_value_heads, vocab_size): {'; '.join(wrong[:5])}{more}")


def _expected_names(cfg: ModelConfig) -> set[str]:
    names = {"embed.weight", "final_norm.weight", "lm_head.weight"}
    for i in range(cfg.num_layers):
        names |= {pattern.format(i=i) for pattern in _LAYER_PARTS.values()}
    return names


# ---------------------------------------------------------------------------------------------- our format


def save_pretrained(out_dir: str | Path, model_cfg: ModelConfig, state: dict[str, Tensor], *,
                    name: str = "converted", tokenizer_file: str | Path | None = None, recipe=None) -> Path:
    """Write ``model.safetensors`` and ``recipe.yaml`` (and a tokenizer, if given) into ``out_dir``."""
    from safetensors.torch import save_file

    from adaptive.recipe import Recipe
    from adaptive.train.config import TokenizerConfig

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    kept, aliases = {}, {}
    for key in sorted(state):
        tensor = state[key]
        twin = next((k for k, t in kept.items() if t.data_ptr() == tensor.data_ptr() and t.shape == tensor.shape), None)
        if twin is not None and tensor.numel():
            aliases[key] = twin
        else:
            kept[key] = tensor.detach().to("cpu").contiguous()
    save_file(kept, str(out / "model.safetensors"), metadata={"aliases": json.dumps(aliases)})
    if recipe is None:
        recipe = Recipe(name=name, model=model_cfg)
        recipe.data.seq_len = min(recipe.data.seq_len, model_cfg.max_seq_len)  # a valid recipe for short contexts
    else:
        recipe = recipe.model_copy(deep=True)
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, out / "tokenizer.json")
        recipe.tokenizer = TokenizerConfig(kind="file", path=str((out / "tokenizer.json").resolve()))
    (out / "recipe.yaml").write_text(recipe.to_yaml())
    return out


def convert_hf_llama(src: str | Path, out: str | Path, recipe: str | Path | None = None,
                     init: Literal["average", "select"] = "select", registry=None) -> Path:
    """``adaptive convert hf-llama SRC OUT [--recipe R --init select|average]``: import an HF Llama directory
    into our format; with a recipe, as the recipe's recursive or MoR model initialised from it (uptraining)."""
    src = Path(src)
    if not src.is_dir():
        raise CheckpointError(f"{src}: no such directory")
    cfg, state = load_hf_llama(src)
    tokenizer = _source_tokenizer(src, cfg.vocab_size)
    name = src.resolve().name or "converted"
    if recipe is None:
        return save_pretrained(out, cfg, state, name=name, tokenizer_file=tokenizer)
    from adaptive.model import build_model
    from adaptive.plugins import get_registry

    registry = registry or get_registry()
    target = uptraining_recipe(recipe, cfg, registry)
    vanilla_plan = registry.build("sharing_scheme", cfg.sharing).plan(cfg.num_layers, 1)
    model = build_model(target.model, registry)
    try:
        init_recursive_from_vanilla(state, vanilla_plan, model, init)
    except ValueError as exc:
        raise CheckpointError(f"--init: {exc}") from None
    target.train.init_from = str(Path(out).resolve())  # `adaptive train OUT/recipe.yaml` starts from these weights
    return save_pretrained(out, target.model, model.state_dict(), name=target.name, tokenizer_file=tokenizer,
                           recipe=target)


def _source_tokenizer(src: Path, vocab_size: int) -> Path | None:
    """The source's ``tokenizer.json`` (checked to fit the embedding), or None with a warning."""
    path = src / "tokenizer.json"
    if not path.is_file():
        warnings.warn(f"{src}: no tokenizer.json; the converted model has none, so generate and eval cannot "
                      "read text with it (copy the tokenizer.json of the model into the output directory)")
        return None
    from tokenizers import Tokenizer

    try:
        size = Tokenizer.from_file(str(path)).get_vocab_size()
    except Exception as exc:  # tokenizers raises plain Exceptions for a malformed file
        raise CheckpointError(f"{path}: not a readable tokenizers JSON file ({' '.join(str(exc).split())[:200]})") from None
    if size > vocab_size:
        raise CheckpointError(f"{path}: the tokenizer has {size} tokens but the model's embedding has "
                              f"{vocab_size} rows (config.json vocab_size)")
    return path


UPTRAIN_KEEPS = ("num_recursions", "per_step_norms", "sharing", "router", "kv_policy", "depth_scheduler",
                 "attention", "ffn")


def uptraining_recipe(recipe: str | Path, vanilla: ModelConfig, registry):
    """The recipe with its model's shape taken from the pretrained ``vanilla`` config: the recursion and
    components (``UPTRAIN_KEEPS``) come from the recipe, every shape key from the checkpoint."""
    from adaptive import recipe as recipes

    loaded = recipes.load(recipe, registry=registry)
    wanted = loaded.model.model_dump(include=set(UPTRAIN_KEEPS))
    shape = vanilla.model_dump(exclude=set(UPTRAIN_KEEPS) | {"preset"})
    try:
        model = ModelConfig.model_validate({**shape, **wanted})
    except ValueError as exc:
        raise CheckpointError(f"{recipe}: its model section does not fit the checkpoint's shape: {exc}") from None
    try:
        registry.build("sharing_scheme", model.sharing).plan(model.num_layers, model.num_recursions)
    except ValueError as exc:
        raise CheckpointError(f"{recipe}: model.sharing {model.sharing.name!r} with num_recursions="
                              f"{model.num_recursions} does not fit the checkpoint's {model.num_layers} layers: "
                              f"{' '.join(str(exc).split())}") from None
    data = loaded.data.model_copy(update={"seq_len": min(loaded.data.seq_len, model.max_seq_len)})
    return loaded.model_copy(update={"model": model, "data": data})


def load_pretrained(directory: str | Path, registry=None):
    """The AdaptiveLM stored in ``directory`` (``recipe.yaml`` + ``model.safetensors``), in eval mode."""
    from adaptive import recipe as recipes
    from adaptive.model import build_model
    from adaptive.train.checkpoint import load_weights

    directory = Path(directory)
    if registry is None:
        from adaptive.plugins import get_registry

        registry = get_registry()
    recipe = recipes.load(directory / "recipe.yaml", registry=registry)
    model = build_model(recipe.model, registry)
    _load_strict(model, load_weights(directory), str(directory))
    return model.eval()


def _load_strict(model: torch.nn.Module, state: dict[str, Tensor], source: str) -> None:
    from adaptive.train.checkpoint import check_fit

    check_fit(model, state, source)  # names every missing, unexpected or differently-shaped tensor
    model.load_state_dict(state, strict=True)


# ---------------------------------------------------------------------------------------------- recursive init


def vanilla_source_layers(vanilla_plan: DepthPlan, recursive_plan: DepthPlan,
                          method: Literal["average", "select"]) -> dict[int, list[int]]:
    """For each recursive physical layer, the vanilla logical depths its weights are taken from
    (averaged when more than one)."""
    if vanilla_plan.num_logical != recursive_plan.num_logical:
        raise CheckpointError(f"the vanilla model has {vanilla_plan.num_logical} logical layers and the recursive one "
                              f"{recursive_plan.num_logical}: initialisation needs the same unrolled depth")
    if method not in ("average", "select"):
        raise ValueError(f"method must be 'average' or 'select', got {method!r}")
    phys = recursive_plan.logical_to_physical
    users = {p: [l for l, q in enumerate(phys) if q == p] for p in range(recursive_plan.num_physical)}
    if method == "average":
        return users
    first = len(recursive_plan.prelude)
    span = sum(len(step) for step in recursive_plan.steps)
    block = list(dict.fromkeys(p for step in recursive_plan.steps for p in step))
    sources = {}
    for p, logical in users.items():
        if p in block and all(first <= l < first + span for l in logical):
            sources[p] = [first + block.index(p) * span // len(block)]
        else:  # outside the recursion block (or used both in and out of it): its first depth
            sources[p] = [logical[0]]
    return sources


@torch.no_grad()
def init_recursive_from_vanilla(vanilla_state: dict[str, Tensor], vanilla_plan: DepthPlan, recursive_model,
                                method: Literal["average", "select"] = "average"):
    """Fill ``recursive_model`` (an AdaptiveLM) from a vanilla state dict of the same unrolled depth; see
    the module docstring for the two methods. Returns the model."""
    plan = recursive_model.plan
    sources = vanilla_source_layers(vanilla_plan, plan, method)
    num_vanilla_norms = len({k.split(".")[2] for k in vanilla_state if k.startswith("engine.norms.")})
    per_logical_norms = num_vanilla_norms == vanilla_plan.num_logical != vanilla_plan.num_physical

    def vanilla_layer(l: int, suffix: str) -> Tensor:
        return _take(vanilla_state, f"engine.layers.{vanilla_plan.logical_to_physical[l]}.{suffix}")

    def vanilla_norm(l: int, suffix: str) -> Tensor:
        return _take(vanilla_state, f"engine.norms.{l if per_logical_norms else vanilla_plan.logical_to_physical[l]}.{suffix}")

    state = recursive_model.state_dict()
    for key in list(state):
        parts = key.split(".")
        if key.startswith("engine.layers."):
            p, suffix = int(parts[2]), ".".join(parts[3:])
            state[key] = _mean([vanilla_layer(l, suffix) for l in sources[p]], key, state[key])
        elif key.startswith("engine.norms."):
            n, suffix = int(parts[2]), ".".join(parts[3:])
            if recursive_model.config.per_step_norms:
                state[key] = _mean([vanilla_norm(n, suffix)], key, state[key])  # per-step norms: own depth
            else:
                state[key] = _mean([vanilla_norm(l, suffix) for l in sources[n]], key, state[key])
        elif key in vanilla_state and not key.startswith("engine."):
            state[key] = _mean([vanilla_state[key]], key, state[key])
    recursive_model.load_state_dict(state, strict=True)
    return recursive_model


def _take(state: dict[str, Tensor], key: str) -> Tensor:
    if key not in state:
        raise CheckpointError(f"the vanilla state has no {key!r}")
    return state[key]


def _mean(tensors: list[Tensor], key: str, like: Tensor) -> Tensor:
    if any(t.shape != like.shape for t in tensors):
        raise CheckpointError(f"{key}: vanilla shape {tuple(tensors[0].shape)} does not match {tuple(like.shape)}")
    return torch.stack([t.to(torch.float64) for t in tensors]).mean(0).to(like.dtype)
