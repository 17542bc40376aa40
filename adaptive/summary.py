"""The one-screen summary that ``adaptive validate`` prints."""

from __future__ import annotations

from rich.table import Table

from adaptive.interfaces import DepthPlan
from adaptive.recipe import Recipe
from adaptive.registry import Registry


def recipe_summary(recipe: Recipe, registry: Registry) -> Table:
    model = recipe.model
    plan = registry.build("sharing_scheme", model.sharing).plan(model.num_layers, model.num_recursions)
    table = Table(title=f"recipe {recipe.name}", show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    shape = f"{model.num_layers} layers x d{model.d_model}, {model.num_heads} heads / {model.num_kv_heads} kv, ffn {model.d_ffn}"
    table.add_row("model", shape)
    table.add_row("depth plan", _describe_plan(plan))
    for path, (kind, spec) in recipe.component_specs().items():
        reg = registry.get(kind, spec.name)
        options = ", ".join(f"{k}={v}" for k, v in spec.options().items())
        table.add_row(path, f"{spec.name} ({reg.plugin})" + (f" {options}" if options else ""))
    t = recipe.train
    stop = ", ".join(f"{k}={getattr(t, k)}" for k in ("steps", "tokens", "flop_budget") if getattr(t, k) is not None)
    table.add_row("train", f"{stop}; batch {t.batch_size}x{recipe.data.seq_len} (accum {t.grad_accum}); "
                  f"lr {t.lr} {t.schedule}; {t.dtype}")
    tok = recipe.tokenizer
    table.add_row("tokenizer", f"{tok.kind} {tok.path or ''}".strip() + f", vocab {tok.vocab_size}; seed {recipe.seed}")
    return table


def _describe_plan(plan: DepthPlan) -> str:
    if not plan.steps:
        return f"{plan.num_physical} unique layers, no recursion"
    return (f"{plan.num_physical} unique layers, {plan.num_logical} logical: prelude {list(plan.prelude)}, "
            f"{plan.num_steps} steps of {list(plan.steps[0])}, coda {list(plan.coda)}")
