"""How each kind of graph node runs forward and hands relevance back to its inputs, by op family."""

from .arithmetic import Arithmetic, Product
from .base import Constant, NoRelevance, Op, Passthrough, ShapeOf, UnsupportedOperationError, vjp
from .normalization import Normalization, Softmax
from .pooling import Pool, average_window, pool_average_of
from .routing import Concat, GetItem, Reshape, Route
from .subprogram import Subprogram
from .weighted import Weighted

__all__ = [
    "Arithmetic",
    "Concat",
    "Constant",
    "GetItem",
    "NoRelevance",
    "Normalization",
    "Op",
    "Passthrough",
    "Pool",
    "Product",
    "Reshape",
    "Route",
    "ShapeOf",
    "Softmax",
    "Subprogram",
    "UnsupportedOperationError",
    "Weighted",
    "average_window",
    "pool_average_of",
    "vjp",
]
