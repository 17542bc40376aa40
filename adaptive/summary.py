"""The one-screen summary that ``adaptive validate`` prints."""

from __future__ import annotations

from rich.table import Table

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
    table.add_row("depth plan", f"{plan.num_physical} unique layers; prelude {list(plan.prelude)}, "
                  f"{plan.num_steps} steps of {list(plan.steps[0]) if plan.steps else []}, coda {list(plan.coda)}")
    for path, (kind, spec) in recipe.component_specs().items():
        reg = registry.get(kind, spec.name)
        options = ", ".join(f"{k}={v}" for k, v in spec.options().items())
        table.add_row(path, f"{spec.name} ({reg.plugin})" + (f" {options}" if options else ""))
    t = recipe.train
    stop = ", ".join(f"{k}={getattr(t, k)}" for k in ("steps", "tokens", "flop_budget") if getattr(t, k) is not None)
    table.add_row("train", f"{stop}; batch {t.batch_size}x{recipe.data.seq_len} (accum {t.grad_accum}); lr {t.lr} {t.schedule}; {t.dtype}")
    return table
