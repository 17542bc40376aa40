"""Property checks for plugin authors: causality, cache consistency, batch and padding invariance, serving.

Each check takes a model or something to build one from (an AdaptiveLM, a ModelConfig, a ``model``
mapping, or a recipe path), runs it in float64 on the CPU and raises AssertionError saying what differed
where (row, position, recursion step). Routing decisions are compared exactly, before logits::

    from adaptive.testing import check_cache_consistency, check_causality, micro_config

    def test_my_router():
        config = micro_config({"sharing": "middle_cycle", "router": "my_router", "kv_policy": "recursion_wise"},
                              num_recursions=3)
        check_causality(config)          # the inference rule
        check_cache_consistency(config)

Hypothesis strategies and the ``ci``/``thorough`` profiles live in ``adaptive.testing.strategies``
(it needs hypothesis; the checks do not).
"""

from adaptive.testing.cache import check_cache_consistency
from adaptive.testing.causality import check_causality
from adaptive.testing.combos import Combination, combinations, micro_config, skip_reason
from adaptive.testing.compare import assert_same, assert_same_routing
from adaptive.testing.install import components_registered
from adaptive.testing.invariance import check_batch_invariance, check_padding_invariance
from adaptive.testing.models import FixedCapacities, Trace, as_model, run
from adaptive.testing.serving import Schedule, check_serving_consistency, decode_alone

__all__ = [
    "Combination", "FixedCapacities", "Trace", "as_model", "assert_same", "assert_same_routing",
    "check_all", "check_batch_invariance", "check_cache_consistency", "check_causality",
    "check_padding_invariance", "check_serving_consistency", "combinations", "components_registered",
    "decode_alone", "micro_config", "run", "Schedule", "skip_reason",
]


def check_all(model_or_config, *, seed: int = 0, **kwargs) -> None:
    """Every check with its defaults: causality of the inference rule (and of the training rule when the
    router declares ``causal_in_training``), cache consistency, batch and padding invariance, and serving
    consistency (the batched serving engine equals decoding each request alone)."""
    model = as_model(model_or_config, seed=seed, **kwargs)
    check_causality(model, seed=seed)
    if model.router.causal_in_training:
        check_causality(model, seed=seed, training_rule=True)
    check_cache_consistency(model, seed=seed)
    check_cache_consistency(model, seed=seed, left_pads=[3, 0])
    check_batch_invariance(model, seed=seed)
    check_padding_invariance(model, seed=seed)
    check_serving_consistency(model, seed=seed, schedule=Schedule(arrivals=[0, 1, 1], max_batch=2,
                                                                  max_tokens_per_iteration=5, block_size=2))
