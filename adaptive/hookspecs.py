"""The plugin hooks. Each gets a ``register`` callback; the host validates what is registered."""

from pluggy import HookimplMarker, HookspecMarker

hookspec = HookspecMarker("adaptive")
hookimpl = HookimplMarker("adaptive")


@hookspec
def register_sharing_schemes(register):
    """Register SharingScheme classes: which physical layer serves at each logical depth."""


@hookspec
def register_routers(register):
    """Register Router classes: which tokens continue at each recursion step, and with what gate."""


@hookspec
def register_kv_policies(register):
    """Register KVPolicy classes: what each recursion step caches and what its queries attend to."""


@hookspec
def register_depth_schedulers(register):
    """Register DepthScheduler classes: how step capacities change over training and at inference."""


@hookspec
def register_attention_backends(register):
    """Register AttentionBackend classes: the kernel that computes masked softmax attention."""


@hookspec
def register_ffns(register):
    """Register FFN classes: the feed-forward part of each block (SwiGLU, mixtures of experts)."""


@hookspec
def register_datasets(register):
    """Register DataSource classes: named text corpora a recipe's ``data`` section can use."""


@hookspec
def register_commands(cli):
    """Add sub-commands to the ``adaptive`` typer application."""
