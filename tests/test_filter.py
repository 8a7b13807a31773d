"""The relevance filter: both algorithms against a plain kthvalue reference, and the accelerator path
shown batched and free of host reads (checked on the CPU, and with CUDA's sync guard where a GPU is)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torchvision
from torch.utils._python_dispatch import TorchDispatchMode

from lrp_cli.lrp import Explainer, relevance_filter
from lrp_cli.lrp import engine as engine_module
from lrp_cli.lrp import filter as filter_module
from lrp_cli.lrp.filter import filter_with_support
from lrp_cli.lrp.ops.pooling import average_window

FRACTIONS = (0.01, 0.05, 0.3, 0.999)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PATHS = {"sampled": False, "batched": True}


def _reference(r: torch.Tensor, fraction: float, renormalize: bool = False) -> torch.Tensor:
    """Per sample: keep every value >= the k-th largest (found by kthvalue), zero the rest."""
    flat = r.reshape(r.shape[0], -1)
    numel = flat.shape[1]
    k = max(1, int(fraction * numel))
    kth = flat.kthvalue(numel - k + 1, dim=1, keepdim=True).values
    kept = torch.where(flat >= kth, flat, torch.zeros_like(flat))
    if renormalize:
        before, after = flat.double().sum(dim=1, keepdim=True), kept.double().sum(dim=1, keepdim=True)
        scale = torch.where(after != 0, before / torch.where(after != 0, after, 1.0), 0.0)
        kept = (kept.double() * scale).to(r.dtype)
    return kept.reshape(r.shape)


def _stride(numel: int) -> int:
    """The filter's sampling stride for rows of ``numel`` entries."""
    return filter_module._prime_at_least(max(filter_module.MIN_STRIDE, numel // filter_module.SAMPLE_SIZE))


def _case(name: str, batch: int, dtype: torch.dtype, channels: int = 8, side: int = 24) -> torch.Tensor:
    """A batch of (batch, channels, side, side) maps; by default rows of 4608 entries."""
    g = torch.Generator().manual_seed(batch)
    shape = (batch, channels, side, side)
    if name == "random":
        r = torch.randn(shape, generator=g)
    elif name == "mostly zeros":  # after ReLUs and earlier filtering: fewer nonzeros than kept entries
        r = torch.rand(shape, generator=g) * (torch.rand(shape, generator=g) < 0.03)
        r[:, :, :2] *= -1  # a few negatives: the zeros are the threshold and the negatives go
    elif name == "mostly zeros, none negative":  # the threshold is the tie at zero and nothing goes
        r = torch.rand(shape, generator=g) * (torch.rand(shape, generator=g) < 0.03)
    elif name == "integer ties":
        r = torch.randint(-3, 4, shape, generator=g).float()
    elif name == "all zero":
        r = torch.zeros(shape)
    elif name == "all negative":
        r = -torch.rand(shape, generator=g) - 0.5
    elif name == "skewed channels":  # relevance in a few channels: a channel-aligned stride would miss it
        r = torch.rand(shape, generator=g).pow(6)
        r[:, ::4] *= 1000
    elif name == "sample overshoots":  # every sampled entry is huge: the bound is useless, full selection
        r = torch.rand(shape, generator=g)
        rows = r.permute(0, 2, 3, 1).reshape(batch, -1)
        rows[:, :: _stride(rows.shape[1])] += 10.0
        r = rows.reshape(batch, side, side, channels).permute(0, 3, 1, 2).contiguous()
    elif name == "sample overshoots, tied":  # every sampled entry the same large value: counted, sorted
        r = torch.rand(shape, generator=g)
        rows = r.permute(0, 2, 3, 1).reshape(batch, -1)
        rows[:, :: _stride(rows.shape[1])] = 10.0
        r = rows.reshape(batch, side, side, channels).permute(0, 3, 1, 2).contiguous()
    elif name == "sample sees only zeros":  # every sampled entry zero, the rest positive: counted, gathered
        r = torch.rand(shape, generator=g)
        rows = r.permute(0, 2, 3, 1).reshape(batch, -1)
        rows[:, :: _stride(rows.shape[1])] = 0.0
        r = rows.reshape(batch, side, side, channels).permute(0, 3, 1, 2).contiguous()
    elif name == "confined":  # relevance on the object, zeros around it: long stretches of zeros
        r = torch.zeros(shape)
        for i in range(batch):
            top, left = (5 * i) % (side // 2), (3 * i) % (side // 2)
            patch = r[i, :, top : top + side // 3, left : left + side // 3]
            patch.copy_(torch.randn(patch.shape, generator=g))
        r[:, :, -1, -1] = 1e-3  # a lone entry far from the object
    elif name == "minus infinity":  # the k-th largest is -inf: nothing lies below it
        r = torch.rand(shape, generator=g).masked_fill(torch.rand(shape, generator=g) < 0.999, -math.inf)
    elif name == "small rows":  # below EXACT_BELOW: one selection over the whole row
        r = torch.randn(batch, 3, 5, 7, generator=g)
    elif name == "single element":
        r = torch.randn(batch, 1, 1, 1, generator=g)
    else:
        raise AssertionError(name)
    return r.to(dtype)


CASES = (
    "random",
    "mostly zeros",
    "mostly zeros, none negative",
    "integer ties",
    "all zero",
    "all negative",
    "skewed channels",
    "sample overshoots",
    "sample overshoots, tied",
    "minus infinity",
    "small rows",
    "single element",
)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("case", CASES)
def test_filter_matches_kthvalue_reference(case, batch, layout, dtype, path):
    r = _case(case, batch, DTYPES[dtype])
    if layout == "channels_last":
        r = r.contiguous(memory_format=torch.channels_last)
    original = r.clone()
    for fraction in FRACTIONS:
        expected = _reference(r, fraction)
        got = relevance_filter(r, fraction, batched=PATHS[path])
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        assert got.stride() == r.stride()
    torch.testing.assert_close(r, original, rtol=0, atol=0)  # not in place: the input is untouched


LONG_ROW_CASES = (  # every way a long row's threshold is settled (rows longer than EXACT_BELOW)
    "random",  # entries above the bound gathered and selected among
    "skewed channels",
    "mostly zeros",  # the bound, tied at 0, is the answer; the negatives below it go
    "mostly zeros, none negative",  # the bound is the answer and nothing lies below it
    "integer ties",  # a tied bound with k or more entries above it: those are gathered
    "sample overshoots",  # fewer than k entries reach the bound: the row is sorted
    "sample overshoots, tied",  # the same with a tied bound, found by counting
    "sample sees only zeros",  # a tied bound the sample says is the answer: counted, then gathered
    "confined",  # blocks of zeros: nothing gathered there, and nothing zeroed
    "minus infinity",
)


@pytest.mark.parametrize("case", LONG_ROW_CASES)
def test_rows_of_an_engine_layer_match_reference(case):
    """(2, 64, 56, 56) channels-last maps, VGG16's conv2 at 112x112: 200 704 entries a row, two of the
    filter's blocks."""
    r = _case(case, 2, torch.float32, channels=64, side=56).contiguous(memory_format=torch.channels_last)
    assert r[0].numel() > filter_module.BLOCK
    for fraction in (0.01, 0.05, 0.2):
        for batched in PATHS.values():
            got = relevance_filter(r, fraction, batched=batched)
            torch.testing.assert_close(got, _reference(r, fraction), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("case", LONG_ROW_CASES)
def test_rows_of_many_blocks_match_reference(case, layout, dtype, monkeypatch):
    """Blocks of 512 entries, so every row runs through dozens of them: blocks without hits after
    blocks with hits and the reverse, blocks of zeros that are neither gathered nor zeroed, and spans
    of blocks joined for the zeroing."""
    monkeypatch.setattr(filter_module, "BLOCK", 512)
    r = _case(case, 3, DTYPES[dtype], channels=16, side=48)
    if layout == "channels_last":
        r = r.contiguous(memory_format=torch.channels_last)
    for fraction in (0.01, 0.05, 0.2):
        got = relevance_filter(r, fraction)
        torch.testing.assert_close(got, _reference(r, fraction), rtol=0, atol=0)


def test_long_rows_of_any_length_and_stride():
    """Long rows are gathered eight neighbours at a time where the row allows it: a row whose length is
    not a multiple of eight (its last block entry by entry) and a strided row (all of it) give the
    same result."""
    g = torch.Generator().manual_seed(7)
    odd = torch.randn(2, 3, 257, 257, generator=g).relu()
    assert odd[0].numel() % 8 and odd[0].numel() > filter_module.BLOCK
    strided = torch.randn(2, 8, 160, 320, generator=g).relu()[..., ::2]
    assert strided.reshape(2, -1).stride() == (strided.stride(0), 2)
    for r in (odd, strided):
        for fraction in (0.01, 0.05):
            expected = _reference(r, fraction)
            torch.testing.assert_close(relevance_filter(r, fraction), expected, rtol=0, atol=0)
            assert relevance_filter(r, fraction, in_place=True) is r
            torch.testing.assert_close(r, expected, rtol=0, atol=0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_renormalize_matches_reference_and_conserves(dtype, path):
    r = _case("random", 64, DTYPES[dtype]).abs()
    r[3] = 0  # an all-zero sample stays zero
    tolerance = {"fp32": 1e-5, "bf16": 2e-2}[dtype]
    for fraction in (0.05, 0.3):
        got = relevance_filter(r, fraction, renormalize=True, batched=PATHS[path])
        torch.testing.assert_close(got, _reference(r, fraction, True), rtol=tolerance, atol=0)
        torch.testing.assert_close(
            got.double().sum(dim=(1, 2, 3)), r.double().sum(dim=(1, 2, 3)), rtol=tolerance, atol=0
        )
        assert (got[3] == 0).all()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_in_place_writes_into_the_input(layout, path):
    r = _case("random", 8, torch.float32)
    if layout == "channels_last":
        r = r.contiguous(memory_format=torch.channels_last)
    expected = _reference(r, 0.05)
    got = relevance_filter(r, 0.05, in_place=True, batched=PATHS[path])
    assert got.data_ptr() == r.data_ptr()
    torch.testing.assert_close(r, expected, rtol=0, atol=0)


def test_other_layouts():
    """Neither contiguous nor channels-last: filtered through a copy (transposed maps) or in place on
    rows that are strided views (every other column)."""
    transposed = _case("random", 4, torch.float32).transpose(2, 3)
    wide = torch.randn(4, 8, 24, 48, generator=torch.Generator().manual_seed(5))
    for batched in PATHS.values():
        got = relevance_filter(transposed.clone(), 0.05, in_place=True, batched=batched)
        torch.testing.assert_close(got, _reference(transposed, 0.05), rtol=0, atol=0)
        r = wide.clone()[..., ::2]
        assert r.reshape(4, -1).stride() == (r.stride(0), 2)  # each row a view with stride 2
        expected = _reference(r, 0.05)
        assert relevance_filter(r, 0.05, in_place=True, batched=batched) is r
        torch.testing.assert_close(r, expected, rtol=0, atol=0)


def test_full_fraction_is_identity_and_bad_fractions_are_named():
    r = _case("random", 2, torch.float32)
    assert relevance_filter(r, 1.0) is r
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"topk fraction must be in \(0, 1\]"):
            relevance_filter(r, bad)


# --- the accelerator path: batched, and nothing read back to the host ------------------------------

# ops that read a device value on the host or whose output shape depends on the data (each a sync on CUDA)
DATA_DEPENDENT = {
    "aten._local_scalar_dense",
    "aten.index",  # boolean-mask indexing runs nonzero inside
    "aten.masked_scatter",
    "aten.nonzero",
    "aten.nonzero_static",
    "aten.masked_select",
    "aten.unique",
    "aten._unique",
    "aten._unique2",
    "aten.unique_consecutive",
    "aten.unique_dim",
    "aten.is_nonzero",
    "aten.equal",
    "aten.allclose",
    "aten.item",
}


class _Recorder(TorchDispatchMode):
    """Every aten op dispatched inside the block, by overload packet name, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _record(r: torch.Tensor, **options: object) -> list[str]:
    with _Recorder() as recorder:
        relevance_filter(r, 0.05, **options)
    return recorder.ops


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("fraction_side", ["largest", "smallest"])
def test_batched_path_has_no_host_reads_and_fixed_ops(fraction_side, layout, renormalize):
    """The batched path on CPU tensors (forced) and on meta tensors (chosen by default, as on a GPU):
    meta tensors hold no data, so any host read or data-dependent shape would fail outright."""
    fraction = 0.05 if fraction_side == "largest" else 0.9  # the two top-k directions
    runs = {}
    for device, batched in (("cpu", True), ("meta", None)):
        for batch in (1, 64):
            r = _case("random", batch, torch.float32).to(device)
            if layout == "channels_last":
                r = r.contiguous(memory_format=torch.channels_last)
            with _Recorder() as recorder:
                out = relevance_filter(r, fraction, renormalize, in_place=True, batched=batched)
            assert out.shape == r.shape and out.device.type == device
            runs[device, batch] = recorder.ops
    for ops in runs.values():
        assert not DATA_DEPENDENT & set(ops), ops
        assert "aten.topk" in ops
    # one sequence of ops (so of kernels) per layer, whatever the batch size, the same as on a device
    assert runs["cpu", 1] == runs["cpu", 64] == runs["meta", 1] == runs["meta", 64]


def test_device_picks_the_algorithm():
    """By default the CPU takes the sampled path (numpy does the work: no top-k among torch's ops) and
    any other device the batched one."""
    assert "aten.topk" not in _record(_case("random", 2, torch.float32))
    assert "aten.topk" in _record(_case("random", 2, torch.float32).to("meta"))
    assert "aten.topk" in _record(_case("random", 2, torch.float32), batched=True)


@pytest.fixture(scope="module")
def vgg():
    torch.manual_seed(0)
    return torchvision.models.vgg11().eval(), torch.randn(2, 3, 32, 32)


def test_engine_backward_with_the_batched_filter_is_sync_free_and_identical(vgg, monkeypatch):
    """A filtered backward pass with the filter forced onto the accelerator path: every filter call is
    free of host reads, and the heatmap is exactly the CPU path's (which skips the filters that the
    support shows would change nothing)."""
    model, x = vgg
    expected = Explainer(model, "seed", 0.05, renormalize=True)(x).relevance
    calls = []

    def recorded(relevance, *args, **kwargs):
        with _Recorder() as recorder:
            out = filter_with_support(relevance, *args, batched=True, **kwargs)
        calls.append(recorder.ops)
        assert out[1] is None  # the batched path reads nothing back, so it cannot tell support
        return out

    monkeypatch.setattr(engine_module, "filter_with_support", recorded)
    explainer = Explainer(model, "seed", 0.05, renormalize=True)
    got = explainer(x).relevance
    assert len(calls) == sum(step.op.filtered for step in explainer.program.steps) > 10
    assert all(not DATA_DEPENDENT & set(ops) for ops in calls)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("batch", [1, 64])
def test_filtered_backward_never_syncs_on_cuda(vgg, monkeypatch, batch):
    """Every filter call of a filtered pass runs with CUDA's guard on: a synchronisation would raise."""
    x = torch.randn(batch, 3, 32, 32, device="cuda")
    explainer = Explainer(copy.deepcopy(vgg[0]).cuda(), "seed", 0.05, renormalize=True)
    calls = []

    def guarded(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return filter_with_support(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            calls.append(True)

    monkeypatch.setattr(engine_module, "filter_with_support", guarded)
    relevance = explainer(x).relevance
    assert len(calls) == sum(step.op.filtered for step in explainer.program.steps)
    assert torch.isfinite(relevance).all() and (relevance != 0).any()


# --- support: what the filter tells the engine, and what it is told ---------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_support_counts_the_nonzeros_kept(case, dtype):
    """Per sample, the support is the exact number of nonzero entries kept, or None exactly where a
    kept entry is negative; long rows (the sampled selection) and short ones (sorted) alike. A sample
    too small to filter is not read, so its support stays unknown."""
    for channels, side in ((8, 24), (64, 56)):
        r = _case(case, 3, DTYPES[dtype], channels=channels, side=side)
        for fraction in (0.01, 0.05, 0.3):
            got, support = filter_with_support(r, fraction)
            torch.testing.assert_close(got, _reference(r, fraction), rtol=0, atol=0)
            rows = got.reshape(len(got), -1)
            if support is None:  # nothing to filter, so nothing read
                assert filter_module.kept_count(rows.shape[1], fraction) >= rows.shape[1]
                continue
            assert [None if (row < 0).any() else int(row.count_nonzero()) for row in rows] == list(support)


def test_rows_the_support_shows_unchanged_are_left_unread():
    """A sample whose support is at most k is returned as it is, unread: a false support, trusted,
    leaves a dense sample unfiltered, which shows nothing looked at it. Other samples are filtered."""
    r = _case("random", 4, torch.float32, channels=64, side=56)
    k = filter_module.kept_count(r[0].numel(), 0.05)
    out, support = filter_with_support(r, 0.05, support=(k, k, k, k))
    assert out is r and support == (k, k, k, k)
    got, support = filter_with_support(r.clone(), 0.05, in_place=True, support=(1, None, k + 1, 0))
    expected = _reference(r, 0.05)
    torch.testing.assert_close(got[[0, 3]], r[[0, 3]], rtol=0, atol=0)
    torch.testing.assert_close(got[[1, 2]], expected[[1, 2]], rtol=0, atol=0)
    assert support[0] == 1 and support[3] == 0
    # the batched path reads nothing back: it neither trusts nor reports support
    got, support = filter_with_support(r, 0.05, batched=True, support=(1, 1, 1, 1))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert support is None


def test_measured_support_and_a_dense_start(vgg, monkeypatch):
    """Counted support: None where an entry is negative. A softmax start (every class above zero) has
    all its entries nonzero: the output layer is filtered, not skipped."""
    r = torch.tensor([[0.0, 2.0, 0.0, 1.0], [0.0, -1.0, 0.0, 3.0], [0.0] * 4])
    assert filter_module.measured_support(r) == (2, None, 0)
    supports = []
    inner = filter_module.filter_with_support

    def recorded(relevance, *args, support=None, **kwargs):
        supports.append(support)
        return inner(relevance, *args, support=support, **kwargs)

    monkeypatch.setattr(engine_module, "filter_with_support", recorded)
    model, x = vgg
    Explainer(model, "seed", 0.05)(x, target="softmax")
    assert supports[0] == (1000, 1000)


def test_renormalized_support_is_unknown_where_the_total_was_negative():
    """Rescaled to a negative total, the kept (positive) entries turn negative: no support."""
    r = torch.full((2, 1000), -1.0)
    r[:, :10] = 2.0
    r[1] = r[1].abs()
    got, support = filter_with_support(r, 0.01, renormalize=True)
    assert (got[0, :10] < 0).all() and support[0] is None
    assert support[1] == 10 and (got[1] >= 0).all()


class _Fork(torch.nn.Module):
    """One activation pooled twice, each pool feeding its own convolution: the relevance of both pools
    meets at the activation, so supports are added."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.pool_a, self.pool_b = torch.nn.MaxPool2d(2), torch.nn.MaxPool2d(2)
        self.conv_a = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.conv_b = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.head = torch.nn.Linear(2 * 16 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        a, b = torch.relu(self.conv_a(self.pool_a(x))), torch.relu(self.conv_b(self.pool_b(x)))
        return self.head(torch.cat([a.flatten(1), b.flatten(1)], dim=1))


@pytest.mark.parametrize("composite", ["seed", "epsilon", "alpha2-beta1"])
@pytest.mark.parametrize("model_name", ["vgg11", "fork"])
def test_engine_support_is_a_true_bound_and_skipping_changes_nothing(vgg, model_name, composite, monkeypatch):
    """Every support the engine hands the filter bounds the sample's nonzero entries, none of them
    negative (carried past ReLUs, average pools and max pools, as themselves or as window averages,
    and added where relevance meets); the heatmap is exactly the one filtered without support; the output layer is
    skipped after a one-hot start, and in VGG the convolution after each pool (winner-takes-all pools,
    and the seed's window averages)."""
    torch.manual_seed(0)
    model, x = vgg if model_name == "vgg11" else (_Fork().eval(), torch.randn(2, 3, 16, 16))
    inner = filter_module.filter_with_support
    skipped = []

    def checked(relevance, fraction, *args, support=None, **kwargs):
        if support is not None:
            k = filter_module.kept_count(relevance[0].numel(), fraction)
            for row, bound in zip(relevance.reshape(len(relevance), -1), support):
                assert bound is None or ((row >= 0).all() and int(row.count_nonzero()) <= bound)
            skipped.append(all(bound is not None and bound <= k for bound in support))
        return inner(relevance, fraction, *args, support=support, **kwargs)

    monkeypatch.setattr(
        engine_module, "filter_with_support", lambda *a, **kw: inner(*a, **{**kw, "support": None})
    )
    expected = Explainer(model, composite, 0.05)(x).relevance
    monkeypatch.setattr(engine_module, "filter_with_support", checked)
    got = Explainer(model, composite, 0.05)(x).relevance
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # support reaches the output layer, each layer after a pool and (in VGG) the last max pool, past
    # the average pool (here 1x1 up to 7x7: each copy of a value is kept, so it is not skipped); the
    # output layer is skipped where the start is one-hot (the seed's start is the softmax)
    assert len(skipped) == (7 if model_name == "vgg11" else 2)
    after_pools = 5 if model_name == "vgg11" else (1 if composite != "seed" else 0)
    assert sum(skipped) == after_pools + (composite != "seed")


@pytest.mark.parametrize(
    "module, shape",
    [
        (torch.nn.AdaptiveAvgPool2d((7, 7)), (1, 2, 7, 7)),  # VGG's, at 224x224: the identity
        (torch.nn.AdaptiveAvgPool2d(1), (1, 2, 7, 7)),
        (torch.nn.AdaptiveAvgPool2d((3, 7)), (1, 2, 10, 5)),  # overlapping windows; upsampling
        (torch.nn.AdaptiveAvgPool2d((None, 2)), (1, 2, 5, 9)),
        (torch.nn.AdaptiveAvgPool1d(3), (1, 2, 10)),
        (torch.nn.AvgPool2d(3, stride=2, padding=1), (1, 2, 9, 9)),
        (torch.nn.AvgPool1d(4), (1, 2, 8)),
    ],
)
def test_average_window_is_the_largest_footprint(module, shape):
    """The window the support is multiplied by is the most inputs any one output is computed from,
    read off the pool's Jacobian."""
    jacobian = torch.autograd.functional.jacobian(module, torch.rand(shape))
    footprints = (jacobian.reshape(module(torch.rand(shape)).numel(), -1) != 0).sum(dim=1)
    assert average_window(module)(torch.Size(shape)) == int(footprints.max())
