"""Built-in plugin: the vanilla and recursive-baseline parts every model can use.

Sharing schemes (none, cycle, sequence, middle_cycle, middle_sequence), the ``all`` router, the ``full``
KV policy, the ``constant`` depth schedule, attention backends (sdpa, flex, xformers), the SwiGLU FFN and the text
corpora (wiki_offline, pydoc_topics, files, hf_disk).
"""

from adaptive import hookimpl
from adaptive_base.attention import BACKENDS
from adaptive_base.baseline import AllTokens, Constant, FullKV
from adaptive_base.datasets import DATASETS
from adaptive_base.ffn import SwiGLU
from adaptive_base.sharing import SCHEMES


@hookimpl
def register_sharing_schemes(register):
    for scheme in SCHEMES:
        register(scheme)


@hookimpl
def register_routers(register):
    register(AllTokens)


@hookimpl
def register_kv_policies(register):
    register(FullKV)


@hookimpl
def register_depth_schedulers(register):
    register(Constant)


@hookimpl
def register_attention_backends(register):
    for backend in BACKENDS:
        register(backend)


@hookimpl
def register_ffns(register):
    register(SwiGLU)


@hookimpl
def register_datasets(register):
    for source in DATASETS:
        register(source)
