"""Built-in plugin: the Mixture-of-Experts FFN (``moe``), a drop-in for ``swiglu`` in any recipe."""

from adaptive import hookimpl
from adaptive_moe.moe import MoE


@hookimpl
def register_ffns(register):
    register(MoE)
