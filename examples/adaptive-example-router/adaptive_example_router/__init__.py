"""An example third-party plugin: registers one router, ``linear_threshold``.

Installing the distribution is all it takes: its entry point (group ``adaptive``) names this module, the
host imports it and calls the hook below, and a recipe can then say ``router: {name: linear_threshold}``.
"""

from adaptive import hookimpl
from adaptive_example_router.router import LinearThresholdRouter

__all__ = ["LinearThresholdRouter"]


@hookimpl
def register_routers(register):
    register(LinearThresholdRouter)
