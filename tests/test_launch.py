"""The cached kernel launch (rgs_engine.kernels.launch) against Taichi's own launch."""
import textwrap

import pytest
import taichi as ti
import torch

from rgs_engine.core.geometry import Geometry
from rgs_engine.kernels import launch, splat_forward
from rgs_engine.kernels.launch import kernel


@kernel
def _axpy(x: ti.types.ndarray(ndim=1), y: ti.types.ndarray(ndim=2), idx: ti.types.ndarray(dtype=ti.i32, ndim=1),
          a: ti.f32, k: ti.i32, flip: ti.template()):
    """y[i, j] = a * x[idx[i]] + k * j, negated when ``flip``."""
    for i, j in ti.ndrange(y.shape[0], y.shape[1]):
        v = a * x[idx[i]] + ti.cast(k * j, ti.f32)
        if ti.static(flip):
            v = -v
        y[i, j] = v


@kernel
def _affine(x: ti.types.ndarray(ndim=2), out: ti.types.ndarray(ndim=2), scale: ti.math.vec3,
            shift: ti.math.ivec3):
    """out[i] = x[i] * scale + shift, element by element (vector arguments)."""
    for i in range(x.shape[0]):
        for j in ti.static(range(3)):
            out[i, j] = x[i, j] * scale[j] + ti.cast(shift[j], ti.f32)


def _expected(x, idx, a, k, flip, cols):
    v = a * x[idx.long()][:, None] + k * torch.arange(cols, dtype=torch.float32)
    return -v if flip else v


def test_cached_launch_equals_the_definition_and_taichis_launch(device):
    assert launch.enabled(), "the cached launch is off for this Taichi version or RGS_TAICHI_LAUNCH"
    x = torch.linspace(-1, 1, 7, device=device)
    idx = torch.tensor([6, 0, 3, 3, 1], dtype=torch.int32, device=device)
    for flip in (False, True):
        outs = []
        for call in range(3):  # the first call goes through Taichi, the later ones are cached
            y = torch.full((5, 4), float("nan"), device=device)
            _axpy(x, y, idx, 2.5, 3 - call, flip)
            outs.append(y.cpu())
            torch.testing.assert_close(y.cpu(), _expected(x.cpu(), idx.cpu(), 2.5, 3 - call, flip, 4), rtol=0, atol=1e-6)
        assert any(k[-1] == (bool, flip) for k in _axpy._cache), "the call's key was not cached"
    y_taichi = torch.zeros(5, 4, device=device)
    _axpy.taichi(x, y_taichi, idx, 2.5, 1, True)
    torch.testing.assert_close(outs[-1], y_taichi.cpu(), rtol=0, atol=0)


def test_vector_arguments_are_cached_and_set_element_by_element(device):
    x = torch.arange(12, dtype=torch.float32, device=device).reshape(4, 3)
    for call, (scale, shift) in enumerate([((1.0, 2.0, 3.0), (0, 0, 0)), ((0.5, -1.0, 4.0), (7, -2, 1)),
                                           ((2.0, 0.25, -3.0), (-5, 9, 0))]):
        out = torch.full((4, 3), float("nan"), device=device)
        _affine(x, out, scale, shift)  # the first call goes through Taichi, the later ones are cached
        expected = x.cpu() * torch.tensor(scale) + torch.tensor(shift, dtype=torch.float32)
        torch.testing.assert_close(out.cpu(), expected, rtol=0, atol=1e-6)
    assert _affine._slots[2:] == [("vector", "float", 3), ("vector", "int", 3)]
    assert len(_affine._cache) == 1, "the vectors' values must not be part of the key"
    out_taichi = torch.zeros(4, 3, device=device)
    _affine.taichi(x, out_taichi, scale, shift)
    torch.testing.assert_close(out.cpu(), out_taichi.cpu(), rtol=0, atol=0)


def test_new_dtype_and_bad_arguments_go_through_taichi(device):
    x = torch.linspace(-1, 1, 7, device=device)
    idx = torch.tensor([1, 2], dtype=torch.int32, device=device)
    y = torch.zeros(2, 3, device=device)
    _axpy(x, y, idx, 1.0, 0, False)
    _axpy(x, y, idx, 1.0, 0, False)
    keys = len(_axpy._cache)
    # float64 arrays: another compiled kernel, its own key
    y64 = torch.zeros(2, 3, dtype=torch.float64, device=device)
    _axpy(x.double(), y64, idx, 1.0, 0, False)
    assert len(_axpy._cache) == keys + 1
    torch.testing.assert_close(y64.float().cpu(), y.cpu())
    # a non-contiguous tensor: Taichi's own error, nothing cached
    with pytest.raises(ValueError, match="contiguous"):
        _axpy(x, torch.zeros(3, 2, device=device).t(), idx, 1.0, 0, False)
    # an int32 array where the kernel wants one: Taichi's type check, nothing cached
    with pytest.raises(Exception):
        _axpy(x, y, idx.float(), 1.0, 0, False)
    assert len(_axpy._cache) == keys + 1


def test_environment_turns_it_off(monkeypatch):
    monkeypatch.setenv("RGS_TAICHI_LAUNCH", "taichi")
    assert not launch.enabled()
    monkeypatch.setenv("RGS_TAICHI_LAUNCH", "cached")
    assert launch.enabled()


def test_project_gaussians_cached_equals_taichi(device):
    """A real kernel (arrays, scalars and a template): the cached launch writes what Taichi's does."""
    torch.manual_seed(1)
    n = 300
    means = (torch.rand(n, 3) * 40 - 20).to(device)
    scales = (torch.rand(n, 3) * 3 + 0.5).to(device)
    quats = torch.randn(n, 4).to(device)
    dens = torch.rand(n).to(device)
    geo = Geometry.circular([0.0, 1.0, 2.5], dso=300.0, dsd=450.0, det_shape=(40, 48), pixel_size=1.5)
    table = geo.kernel_table(device)
    results = []
    for fn in (splat_forward.project_gaussians, splat_forward.project_gaussians,
               splat_forward.project_gaussians.taichi):
        params = torch.zeros(3, n, 8, device=device)
        counts = torch.zeros(3, n, dtype=torch.int32, device=device)
        fn(means, scales, quats, dens, table, params, counts, True, 3.0, 48, 40, 0, 0)
        results.append((params.cpu(), counts.cpu()))
    assert results[0][1].sum() > 0
    for params, counts in results[1:]:
        torch.testing.assert_close(params, results[0][0], rtol=0, atol=0)
        torch.testing.assert_close(counts, results[0][1], rtol=0, atol=0)


def _wrap_cases() -> list[str]:
    """Every line of the engine's kernel sources, a ``^^^`` hint under each as Taichi builds
    it (padded to the line's length), and edge cases around the 80-column width."""
    import pathlib

    from rgs_engine import kernels
    lines = [line for path in sorted(pathlib.Path(kernels.__file__).parent.glob("*.py"))
             for line in path.read_text().splitlines()]
    hints = [" " * (len(line) - len(line.lstrip())) + "^" * len(line.strip()) for line in lines]
    hints = [h + " " * (len(line) - len(h)) for h, line in zip(hints, lines)]
    edges = ["", " ", "   ", "x", " x ", "x" * 80, "x" * 81, " " * 79 + "x", "x" + " " * 90,
             "a\tb", "tab\t", "a\rb", "a\x0bb", "  a  b   ", "a -- b - c", "\xa0a\xa0 "]
    return lines + hints + edges


def test_source_info_wrapper_equals_textwrap():
    from rgs_engine.kernels.source_info import OneLineWrapper
    ours, theirs = OneLineWrapper(width=80), textwrap.TextWrapper(width=80)
    cases = _wrap_cases()
    assert len(cases) > 1000
    for text in cases:
        assert ours.wrap(text) == theirs.wrap(text), repr(text)


def test_source_info_is_installed_for_this_taichi_only(monkeypatch):
    from taichi.lang.ast import ast_transformer_utils

    from rgs_engine.kernels import source_info
    monkeypatch.setattr(ast_transformer_utils, "TextWrapper", ast_transformer_utils.TextWrapper)
    assert source_info.install() == launch.enabled()
    assert (ast_transformer_utils.TextWrapper is source_info.OneLineWrapper) == launch.enabled()
    monkeypatch.setenv("RGS_TAICHI_LAUNCH", "taichi")
    monkeypatch.setattr(ast_transformer_utils, "TextWrapper", textwrap.TextWrapper)
    assert not source_info.install()
    assert ast_transformer_utils.TextWrapper is not source_info.OneLineWrapper
