"""The ``per_layer`` sharing scheme: no weight sharing, and every logical layer is its own routed step.

Mixture-of-Depths routes individual layers of a vanilla stack. In the engine's terms each layer is then a
recursion step of one layer with its own weights: the router decides per step (per layer) which tokens run
it, and the KV policy per step what it caches. A router that routes only some steps (``mod``'s default:
every other one) leaves the others dense.
"""

from __future__ import annotations

from adaptive import ComponentConfig, DepthPlan, SharingScheme


class PerLayerConfig(ComponentConfig):
    """The per-layer scheme has no options."""


class PerLayer(SharingScheme):
    """Vanilla weights, each logical layer a routed step of its own (num_recursions must be 1).

    The plan Mixture-of-Depths routes on."""

    name = "per_layer"
    Config = PerLayerConfig

    def plan(self, num_layers: int, num_recursions: int) -> DepthPlan:
        if num_recursions != 1:
            raise ValueError(f"sharing 'per_layer' gives every layer its own weights and its own step, so there is "
                             f"no recursion: set model.num_recursions=1 (got {num_recursions}), or choose a recursive "
                             f"scheme such as middle_cycle")
        return DepthPlan(num_physical=num_layers, prelude=(), steps=tuple((layer,) for layer in range(num_layers)),
                         coda=())
