"""Shared helpers: deterministic random models (no downloads), a network guard, memory hygiene."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import socket

import pytest
import torch
import torchvision
from torch import nn


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a network connection fails the test: everything must work offline.

    Loopback stays open for the tests that serve a page on this machine and drive a browser at it.
    """

    connect = socket.socket.connect

    def refuse(self: socket.socket, address: object) -> None:
        host = address[0] if isinstance(address, tuple) else None
        loopback = isinstance(host, str) and (host in ("localhost", "::1") or host.startswith("127."))
        if self.family != socket.AF_UNIX and not loopback:
            raise AssertionError(f"test tried to reach the network: {address}")
        connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(autouse=True, scope="module")
def give_memory_back():
    """After each module: drop its models and hand freed memory back to the kernel.

    ``retain_freed_memory()`` (called by the pipeline, so by in-process snapshot checks) keeps every
    freed block in the heap for the rest of the process; the suite's peak would then be the sum of the
    modules' working sets instead of the largest one. The thresholds go back to where glibc's dynamic
    defaults settle for large tensors (mmap above 32 MiB, trim above 64 MiB).
    """
    yield
    gc.collect()
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim"):
        # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, M_TOP_PAD
        for parameter, value in ((-3, 32 << 20), (-1, 64 << 20), (-2, 128 << 10)):
            libc.mallopt(parameter, value)
        libc.malloc_trim(0)


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


class NarrowVGG16(nn.Module):
    """VGG16's thirteen 3x3 convolutions and five max pools (torchvision's layers and names) under a
    narrow classifier: the architecture the seed targets, without the 120M-parameter dense layers that
    only cost memory in a test."""

    def __init__(self, classes: int = 10, hidden: int = 64) -> None:
        super().__init__()
        self.features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
        self.avgpool = nn.AdaptiveAvgPool2d(2)
        self.classifier = nn.Sequential(
            nn.Linear(512 * 2 * 2, hidden),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(hidden, hidden),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(hidden, classes),
        )
        for module in self.modules():  # torchvision's VGG initialisation keeps activations at scale
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def random_biases(model: nn.Module, seed: int = 2, scale: float = 0.1) -> nn.Module:
    """Non-zero biases everywhere (torchvision initialises conv and linear biases to zero), so a rule
    that should drop or keep the bias visibly does."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d | nn.Linear) and module.bias is not None:
                module.bias.copy_(
                    torch.randn(module.bias.shape, generator=g, dtype=module.bias.dtype) * scale
                )
    return model


def random_batchnorm(model: nn.Module) -> nn.Module:
    """Non-trivial batch-norm statistics so folding matters. eps=0 because Zennit 0.5's merged batch
    norm keeps dividing by sqrt(1 + eps), a 5e-6 scale error of its own."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g, dtype=m.running_mean.dtype) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g, dtype=m.running_var.dtype) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g, dtype=m.weight.dtype) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g, dtype=m.bias.dtype) * 0.1)
            m.eps = 0.0
    return model


@pytest.fixture(scope="session")
def chrome():
    """Headless Debian Chromium driven by Selenium through the system chromedriver (.ci/run installs
    both). The flags keep it off the network; the fake media device stands in for a webcam.
    Console messages are collected: ``chrome.get_log("browser")``."""
    import shutil
    import tempfile

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    assert binary and driver_path, "install Debian's chromium and chromium-driver (see .ci/run)"
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    profile = tempfile.mkdtemp(prefix="lrp-chrome-")
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        "--allow-file-access-from-files",
        "--window-size=1280,900",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
