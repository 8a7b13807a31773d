"""Which functions, methods and modules the engine knows, by the family of rule that explains them.

Functions appear as themselves, tensor methods by name (``"softmax"``); in-place spellings
(``add_``, ``operator.iadd``) are replayed out of place.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .decompositions import MASKS


def _optional(module: str, *names: str) -> list[Any]:
    """Objects of an optional package (timm, torchvision) that exist in the installed version."""
    try:
        imported = __import__(module, fromlist=list(names))
    except ImportError:
        return []
    return [getattr(imported, name) for name in names if hasattr(imported, name)]


def _timm_activations() -> tuple[list[type[nn.Module]], list[Callable[..., Any]]]:
    modules: list[type[nn.Module]] = []
    functions: list[Callable[..., Any]] = []
    for source in ("timm.layers.activations", "timm.layers.activations_me"):
        try:
            imported = __import__(source, fromlist=["*"])
        except ImportError:
            continue
        for name, value in vars(imported).items():
            if getattr(value, "__module__", None) != source or name.startswith("_"):
                continue
            if isinstance(value, type) and issubclass(value, nn.Module):
                modules.append(value)
            elif callable(value) and not isinstance(value, type):
                functions.append(value)
    return modules, functions


TIMM_ACTIVATION_MODULES, TIMM_ACTIVATION_FUNCTIONS = _timm_activations()

# --- element-wise maps: the identity rule --------------------------------------------------------

NONNEGATIVE_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.Sigmoid,
    nn.Hardsigmoid,
    nn.Softplus,
)
GATE_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.Sigmoid,
    nn.Hardsigmoid,
    *(m for m in TIMM_ACTIVATION_MODULES if "Sigmoid" in m.__name__),
)
IDENTITY_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.AlphaDropout,
    *_optional("timm.layers", "DropPath"),
)
ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    *NONNEGATIVE_ACTIVATIONS,
    *IDENTITY_MODULES,
    *TIMM_ACTIVATION_MODULES,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Mish,
    nn.Tanh,
    nn.Hardtanh,
    nn.PReLU,
)

NONNEGATIVE_FUNCTIONS: set[Any] = {
    F.relu,
    torch.relu,
    F.relu6,
    torch.sigmoid,
    F.hardsigmoid,
    F.softplus,
    "relu",
    "sigmoid",
    *(f for f in TIMM_ACTIVATION_FUNCTIONS if "sigmoid" in f.__name__),
}
GATE_FUNCTIONS: set[Any] = {
    torch.sigmoid,
    F.hardsigmoid,
    "sigmoid",
    *(f for f in TIMM_ACTIVATION_FUNCTIONS if "sigmoid" in f.__name__),
}
ELEMENTWISE_FUNCTIONS: set[Any] = {
    *NONNEGATIVE_FUNCTIONS,
    *TIMM_ACTIVATION_FUNCTIONS,
    *_optional("torchvision.ops", "stochastic_depth"),
    *_optional("timm.layers", "drop_path"),
    F.hardtanh,
    F.leaky_relu,
    F.elu,
    F.selu,
    F.gelu,
    F.silu,
    F.hardswish,
    F.mish,
    operator.neg,
    torch.neg,
    "neg",
    operator.pow,  # a power of one activation (StarReLU's relu(x) ** 2) is element-wise too
    torch.pow,
    "pow",
    torch.square,
    "square",
    torch.sqrt,
    "sqrt",
    F.normalize,  # division by the input's own norm: the identity rule of normalisers
    torch.tanh,
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    "tanh",
    "gelu",
    "silu",
    "contiguous",
    "clone",
    "float",
    "double",
    "half",
    "bfloat16",
    "to",
    "type",
    "type_as",
    "detach",
}

# --- shape and routing ---------------------------------------------------------------------------

RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.unflatten}
RESHAPE_METHODS = {"flatten", "view", "reshape", "squeeze", "unsqueeze", "view_as", "reshape_as", "unflatten"}
CONCAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}
ROUTE_FUNCTIONS: set[Any] = {
    torch.permute,
    torch.transpose,
    torch.swapaxes,
    torch.movedim,
    F.pad,
    torch.split,
    torch.chunk,
    torch.stack,
    torch.flip,
    torch.roll,
    torch.unbind,
    torch.narrow,
    torch.where,
    torch.masked_fill,
    torch.gather,
    torch.index_select,
    torch.take_along_dim,
    torch.tile,
    torch.repeat_interleave,
    F.pixel_shuffle,
    F.pixel_unshuffle,
    F.unfold,
    F.fold,
    *MASKS,
}
ROUTE_METHODS = {
    "permute",
    "transpose",
    "swapaxes",
    "movedim",
    "split",
    "chunk",
    "expand",
    "expand_as",
    "flip",
    "roll",
    "narrow",
    "unbind",
    "repeat",
    "tile",
    "repeat_interleave",
    "masked_fill",
    "gather",
    "index_select",
    "unfold",
}
TRANSPOSE_ATTRIBUTES = {"T", "mT", "mH", "H"}

# --- linear maps of one activation ----------------------------------------------------------------

AVERAGING_FUNCTIONS: set[Any] = {
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.avg_pool1d,
    F.avg_pool2d,
    torch.mean,
    torch.sum,
    "mean",
    "sum",
}
INTERPOLATION_FUNCTIONS: set[Any] = {F.interpolate, F.upsample, F.upsample_bilinear, F.upsample_nearest}
MAX_POOL_FUNCTIONS: set[Any] = {
    F.max_pool1d,
    F.max_pool2d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    torch.amax,
    "amax",
}

# --- arithmetic, products, normalisation ----------------------------------------------------------

ARITHMETIC: dict[Any, str] = {
    operator.add: "add",
    torch.add: "add",
    "add": "add",
    operator.sub: "sub",
    torch.sub: "sub",
    "sub": "sub",
    operator.mul: "mul",
    torch.mul: "mul",
    "mul": "mul",
    operator.truediv: "div",
    torch.div: "div",
    "div": "div",
}
IN_PLACE_FUNCTIONS = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
}
PRODUCTS: set[Any] = {operator.matmul, torch.matmul, torch.bmm, torch.mm, torch.einsum, "matmul", "bmm", "mm"}
SOFTMAX: set[Any] = {F.softmax, torch.softmax, "softmax"}
LAYER_NORM_FUNCTIONS: set[Any] = {F.layer_norm, *_optional("timm.layers.fast_norm", "fast_layer_norm")}
GROUP_NORM_FUNCTIONS: set[Any] = {F.group_norm, *_optional("timm.layers.fast_norm", "fast_group_norm")}
RMS_NORM_FUNCTIONS: set[Any] = {
    *_optional("torch.nn.functional", "rms_norm"),
    *_optional("timm.layers.fast_norm", "rms_norm", "fast_rms_norm"),
}
RMS_NORM_2D_FUNCTIONS: set[Any] = {*_optional("timm.layers.fast_norm", "rms_norm2d", "fast_rms_norm2d")}
LINEAR_FUNCTIONS: set[Any] = {F.linear}
CONV_FUNCTIONS: set[Any] = {F.conv2d}
BATCH_NORM_FUNCTIONS: set[Any] = {F.batch_norm}

# --- values that carry no relevance ---------------------------------------------------------------

CASTS = {"to", "type", "type_as", "float", "double", "half", "bfloat16", "contiguous"}
"""Methods that change a tensor's dtype, device or layout but not its values."""
STATISTICS: set[Any] = {
    torch.norm,
    torch.linalg.vector_norm,
    torch.linalg.norm,
    torch.std,
    torch.var,
    "norm",
    "std",
    "var",
}
"""Statistics of an activation used to normalise it (global response norm, hand-written norms): held
constant, like the scale of a layer norm, so they carry no relevance."""
ADDCMUL: set[Any] = {torch.addcmul, "addcmul"}
METADATA_METHODS = {"size", "dim", "numel", "ndimension", "nelement", "get_device", "stride"}
METADATA_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout"}
NO_RELEVANCE: set[Any] = {
    *STATISTICS,
    operator.eq,
    operator.ne,
    operator.lt,
    operator.le,
    operator.gt,
    operator.ge,
    operator.not_,
    operator.invert,
    operator.and_,
    operator.or_,
    operator.floordiv,
    operator.mod,
    torch.eq,
    torch.ne,
    torch.lt,
    torch.le,
    torch.gt,
    torch.ge,
    torch.isnan,
    torch.isinf,
    torch.isfinite,
    torch.logical_and,
    torch.logical_or,
    torch.logical_not,
    torch.argmax,
    torch.argmin,
    torch.argsort,
    torch._assert,
    torch.zeros_like,
    torch.ones_like,
    torch.full_like,
    torch.empty_like,
    torch.rand_like,
    torch.randn_like,
    torch.zeros,
    torch.ones,
    torch.full,
    torch.arange,
    torch.empty,
    torch.eye,
    torch.linspace,
    torch.meshgrid,
    *_optional("torch.fx._symbolic_trace", "_assert_is_none"),
    *_optional("timm.layers", "_assert"),
    "eq",
    "ne",
    "lt",
    "le",
    "gt",
    "ge",
    "logical_not",
    "argmax",
    "argmin",
    "new_zeros",
    "new_ones",
    "new_full",
    "new_empty",
    "new_tensor",
    "bool",
    "long",
    "int",
}

LEAF_MODULES: tuple[type[nn.Module], ...] = (
    *TIMM_ACTIVATION_MODULES,
    *_optional("timm.layers", "BatchNormAct2d", "FrozenBatchNormAct2d", "Conv2dSame"),
)
"""Modules kept as one node although they are not in torch.nn: the engine has their rule."""
