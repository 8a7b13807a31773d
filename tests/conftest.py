"""Shared helpers: deterministic random models (no downloads) and a network guard."""

from __future__ import annotations

import socket

import pytest
import torch


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a network connection fails the test: everything must work offline."""

    connect = socket.socket.connect

    def refuse(self: socket.socket, address: object) -> None:
        if self.family != socket.AF_UNIX:
            raise AssertionError(f"test tried to reach the network: {address}")
        connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", refuse)


def bias_free(model: torch.nn.Module, size: int, seed: int = 0) -> torch.nn.Module:
    """Remove every bias and give batch norms data-derived scales, so conservation must be exact.

    Batch norm variances come from one training-mode pass over random data (keeping activations at a
    healthy scale), means and shifts are zero, so folded layers stay bias-free.
    """
    torch.manual_seed(seed)
    dtype = next(model.parameters()).dtype
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None
            module.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, size, size, dtype=dtype))
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.zero_()
                module.bias.zero_()
            elif isinstance(module, torch.nn.Conv2d | torch.nn.Linear) and module.bias is not None:
                module.bias.zero_()
    return model.eval()
