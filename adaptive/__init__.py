"""adaptive: adaptive-computation language models built from registered parts.

The public API for plugin authors: ``hookimpl``, the interface base classes and the result types.
"""

from adaptive.errors import AdaptiveError, DataError, PluginError, RecipeError, UnknownComponentError
from adaptive.hookspecs import hookimpl
from adaptive.model.block import fused_projections, fused_weight
from adaptive.model.layers import Float32Buffers
from adaptive.interfaces import (
    FFN,
    AttentionBackend,
    Component,
    ComponentConfig,
    DataSource,
    DepthPlan,
    DepthScheduler,
    FFNOutput,
    KVPolicy,
    ModelOutput,
    RouteContext,
    RouteDecision,
    Router,
    RoutingStats,
    SharingScheme,
)

__version__ = "0.1.0"

__all__ = [
    "FFN", "AdaptiveError", "AttentionBackend", "Component", "ComponentConfig", "DataError", "DataSource",
    "DepthPlan", "DepthScheduler", "FFNOutput", "Float32Buffers", "KVPolicy", "ModelOutput", "PluginError", "RecipeError",
    "RouteContext", "RouteDecision", "Router", "RoutingStats", "SharingScheme", "UnknownComponentError",
    "fused_projections", "fused_weight", "hookimpl", "__version__",
]
