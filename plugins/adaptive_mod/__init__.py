"""Built-in plugin: Mixture-of-Depths (Raposo et al., 2024), the ``mod`` router and the ``per_layer`` scheme.

``per_layer`` makes every layer of a vanilla stack a step of its own; ``mod`` routes some of those steps
(every other one by default), each choosing its top-k tokens independently. On a recursive scheme
(``middle_cycle`` ...) the same router gives MoD-style independent skipping of recursion steps.
"""

from adaptive import hookimpl
from adaptive_mod.router import MoDRouter
from adaptive_mod.sharing import PerLayer


@hookimpl
def register_sharing_schemes(register):
    register(PerLayer)


@hookimpl
def register_routers(register):
    register(MoDRouter)
