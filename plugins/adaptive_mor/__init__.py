"""Built-in plugin: Mixture-of-Recursions routers, KV policies and capacity schedules."""

from adaptive import hookimpl
from adaptive_mor.expert_choice import ExpertChoiceRouter
from adaptive_mor.kv import KV_POLICIES
from adaptive_mor.schedulers import CapacityWarmup
from adaptive_mor.token_choice import TokenChoiceRouter


@hookimpl
def register_kv_policies(register):
    for policy in KV_POLICIES:
        register(policy)


@hookimpl
def register_routers(register):
    register(ExpertChoiceRouter)
    register(TokenChoiceRouter)


@hookimpl
def register_depth_schedulers(register):
    register(CapacityWarmup)
