"""The model to train: any model ``load_model`` can build, with a new head sized to the classes and
optionally a frozen backbone."""

from __future__ import annotations

from torch import nn

from ..models import NO_WEIGHTS, LoadedModel, ModelError, load_model


def replace_head(module: nn.Module, classes: int) -> str:
    """Give ``module`` a freshly initialised classifier with ``classes`` outputs; return its name.

    timm models reset their own classifier; for the rest the head is the last ``nn.Linear`` registered
    (torchvision's ``fc``, ``classifier.N``, ``heads.head``, ...). The same architecture always gets the
    same head, which is how a checkpoint's weights find their place again."""
    if callable(getattr(module, "reset_classifier", None)) and callable(
        getattr(module, "get_classifier", None)
    ):
        module.reset_classifier(classes)
        head = module.get_classifier()
        name = next((n for n, m in module.named_modules() if m is head and n), None)
        if name is not None:
            return name
    linears = [(name, m) for name, m in module.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ModelError(
            f"{type(module).__name__} has no nn.Linear classifier to resize to {classes} classes; give a "
            "package.module:factory whose model ends in nn.Linear"
        )
    name, old = linears[-1]
    parent_name, _, attribute = name.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    setattr(parent, attribute, nn.Linear(old.in_features, classes, bias=old.bias is not None))
    return name


def head_parameters(module: nn.Module, head: str) -> set[str]:
    return {name for name, _ in module.named_parameters() if name.startswith(f"{head}.")}


def freeze_backbone(module: nn.Module, head: str) -> None:
    """Only the head's parameters learn."""
    trainable = head_parameters(module, head)
    for name, parameter in module.named_parameters():
        parameter.requires_grad_(name in trainable)


def train_mode(module: nn.Module, head: str, frozen: bool) -> None:
    """Training mode; with a frozen backbone its batch norms stay in evaluation mode, so their running
    statistics stay those of the weights it came with."""
    module.train()
    if frozen:
        for name, child in module.named_modules():
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and not name.startswith(head):
                child.eval()


def build(model: str, weights: str | None, pretrained: bool, classes: int) -> tuple[LoadedModel, str]:
    """The model with its weights (``pretrained``: ``weights`` or the model's published ones; else the
    random initialisation) and a new head; returns it and the head's name."""
    loaded = load_model(model, weights if pretrained else NO_WEIGHTS)
    head = replace_head(loaded.module, classes)
    return loaded, head
