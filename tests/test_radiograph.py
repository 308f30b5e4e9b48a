"""Detector-like radiographs (rgs_engine.sim.radiograph): the display chain, the field-of-view
cut and the moved-patient pair, on synthetic line integrals and the 32^3 blob phantom."""
import numpy as np
import pytest
import torch
from scipy import ndimage

from blob_phantom import blob_phantom
from rgs_engine import VolumeGrid
from rgs_engine.core import rigid
from rgs_engine.core.errors import RgsInputError
from rgs_engine.core.geometry import Geometry
from rgs_engine.io.xrays import XRaySet
from rgs_engine.sim import radiograph as rad
from rgs_engine.sim import scan as sim

GRID = VolumeGrid.centred((32, 32, 32), 3.0)


def _ramp(v=2, h=40, w=48) -> torch.Tensor:
    """Line integrals rising along the columns (0 .. 4), different per view."""
    cols = torch.linspace(0, 4, w)
    rows = torch.linspace(0, 0.5, h)[:, None]
    return torch.stack([(cols + rows) * (1 + 0.1 * k) for k in range(v)]).float()


@pytest.fixture(scope="module")
def phantom(device):
    return blob_phantom(GRID)


def test_parse_reads_every_key_and_rejects_bad_items():
    spec = rad.DetectorSpec.parse("gamma=0.6, scatter=0.2,blur=1.2,collimation=14,label=AP")
    assert spec == rad.DetectorSpec(gamma=0.6, scatter=0.2, blur=1.2, collimation=14, label="AP")
    assert rad.DetectorSpec.parse("") == rad.DetectorSpec()
    assert rad.DetectorSpec.parse("unsharp=1.5,unsharp_sigma=4") == rad.DetectorSpec(unsharp=1.5, unsharp_sigma=4.0)
    for bad in ("gamma", "contrast=2", "collimation=1.5", "gamma=20", "scatter=0.95", "blur=-1", "unsharp=-1"):
        with pytest.raises(RgsInputError, match="detector"):
            rad.DetectorSpec.parse(bad)


def test_identity_spec_keeps_line_integrals():
    p = _ramp()
    assert rad.detector_images(p, rad.DetectorSpec()) is p


@pytest.mark.parametrize("gamma", [0.5, 0.8, 2.0])
def test_display_is_monotone_window_to_the_power_gamma(gamma):
    p = _ramp()
    y = rad.detector_images(p, rad.DetectorSpec(gamma=gamma))
    assert y.dtype == torch.float32 and y.shape == p.shape
    assert float(y.min()) == 0.0 and float(y.max()) == 1.0
    assert (y.diff(dim=-1) >= 0).all()  # bone (more attenuation) brighter
    q = p.double().numpy()  # no scatter, no blur: the log signal is the line integral
    lo, hi = (np.percentile(q, pct, axis=(1, 2), keepdims=True) for pct in rad.WINDOW_PERCENTILES)
    ref = np.clip((q - lo) / (hi - lo), 0, 1) ** gamma
    np.testing.assert_allclose(y.numpy(), ref, atol=1e-5)


def test_gaussian_filter_matches_scipy_and_keeps_constants():
    x = torch.rand(2, 30, 35, dtype=torch.float64)
    ours = rad.gaussian_filter(x, 1.5).numpy()
    ref = np.stack([ndimage.gaussian_filter(a, 1.5, mode="nearest", truncate=3.0) for a in x.numpy()])
    np.testing.assert_allclose(ours, ref, atol=2e-3)  # scipy's kernel radius rounds differently
    np.testing.assert_allclose(ours[:, 8:-8, 8:-8], ref[:, 8:-8, 8:-8], atol=1e-12)
    torch.testing.assert_close(rad.gaussian_filter(torch.full((1, 9, 9), 3.0), 2.0), torch.full((1, 9, 9), 3.0))


def test_scatter_lowers_contrast_and_blur_softens_edges():
    p = torch.zeros(1, 64, 64)
    p[:, :, 32:] = 3.0  # a step: open beam | attenuator
    clean = rad.detector_images(p, rad.DetectorSpec(blur=1e-3))  # the window alone
    scat = rad.detector_images(p, rad.DetectorSpec(scatter=0.3, blur=1e-3))
    # the window spans the step either way; scatter fills the attenuated side near the step
    assert float(scat[0, 32, 33]) < float(clean[0, 32, 33]) - 0.01
    soft = rad.detector_images(p, rad.DetectorSpec(blur=2.0))
    assert ((clean[0, 32] > 0.05) & (clean[0, 32] < 0.95)).sum() == 0
    assert ((soft[0, 32] > 0.05) & (soft[0, 32] < 0.95)).sum() >= 4


def test_unsharp_masking_overshoots_edges_and_is_not_monotone():
    p = torch.zeros(1, 64, 64)
    p[:, :, 24:40] = 3.0  # a bar: open beam | attenuator | open beam
    q = p[0, 32].double()
    y = rad.detector_images(p, rad.DetectorSpec(unsharp=1.0, unsharp_sigma=3.0))[0, 32].double()
    # edge enhancement: dark halos beside the bar and a brighter rim inside its edges, so
    # equal line integrals no longer give equal display values
    assert float(y[22]) < float(y[4]) - 0.05 and float(y[25]) > float(y[31]) + 0.05
    assert bool((q[[4, 22]] == q[4]).all()) and bool((q[[25, 31]] == q[25]).all())


def test_collimation_border_is_white_and_label_only_in_its_view():
    p = _ramp(h=96, w=96)
    spec = rad.DetectorSpec(collimation=10, label="AP", label_view=1)
    y = rad.detector_images(p, spec)
    border = torch.ones(96, 96, dtype=torch.bool)
    border[10:-10, 10:-10] = False
    assert bool((y[:, border] == 1).all())
    plain = rad.detector_images(p, rad.DetectorSpec(collimation=10))
    torch.testing.assert_close(y[0], plain[0])
    changed = (y[1] != plain[1]).nonzero()
    assert len(changed) > 10 and bool((y[1][y[1] != plain[1]] == 1).all())
    assert changed[:, 0].min() >= 10 and changed[:, 0].max() < 10 + 96 // 12 + 96 // 40 + 1
    with pytest.raises(RgsInputError, match="collimation"):
        rad.detector_images(p, rad.DetectorSpec(collimation=48))
    with pytest.raises(RgsInputError, match="label_view"):
        rad.detector_images(p, rad.DetectorSpec(label="L", label_view=2))


def test_text_mask_has_the_height_asked():
    m = rad.text_mask("LAT", 12)
    assert m.shape[0] == 12 and m.shape[1] > 12 and 0.05 < m.mean() < 0.8


def test_cut_field_of_view_is_calibrated(phantom):
    geo = Geometry.biplanar(300.0, 450.0, (48, 48), 1.5, isocentre=GRID.centre)
    full = sim.project_views(phantom, GRID, geo)
    xs = XRaySet(full, geo, ["ap", "lateral"], np.eye(4))
    cut = rad.cut_field_of_view(xs, [[0, 20], [10, 0]], (30, 28))
    assert cut.images.shape == (2, 30, 28) and cut.geometry.det_shape == (30, 28)
    torch.testing.assert_close(cut.images[0], full[0, 0:30, 20:48])
    again = sim.project_views(phantom, GRID, cut.geometry)
    torch.testing.assert_close(again, cut.images, atol=1e-4, rtol=1e-4)
    with pytest.raises(RgsInputError, match="field-of-view"):
        rad.cut_field_of_view(xs, [[0, 30], [0, 0]], (30, 28))


def test_moved_patient_views_render_each_view_at_its_pose(phantom):
    geo = Geometry.biplanar(300.0, 450.0, (40, 40), 1.5, isocentre=GRID.centre)
    pose = rigid.random_offset(4.0, 3.0, np.random.default_rng(1), GRID.centre)
    move = rigid.random_offset(8.0, 0.0, np.random.default_rng(2), GRID.centre)
    at_pose = sim.project_views(phantom, GRID, rigid.transform_geometry(geo, rigid.invert(pose)))
    at_move = sim.project_views(phantom, GRID, rigid.transform_geometry(geo, rigid.invert(move @ pose)))
    pair = rad.moved_patient_views(phantom, GRID, geo, pose, move)
    torch.testing.assert_close(pair[0], at_pose[0])
    torch.testing.assert_close(pair[1], at_move[1])
    assert float((pair[1] - at_pose[1]).abs().max()) > 0.1  # the move shows


def test_simulate_xrays_detector_option(tmp_path, phantom):
    from cli_helpers import assert_one_line_error, invoke
    from rgs_engine.io import xrays as xray_data
    from rgs_engine.io.files import save_nifti

    ct = save_nifti(tmp_path / "ct.nii.gz", phantom / 0.02 * 1000 - 1000, GRID)
    res = invoke("simulate-xrays", ct, tmp_path / "x", "--grid", 32, "--det", 48,
                 "--detector", "gamma=0.6,scatter=0.2,blur=1.2,collimation=4,label=AP")
    assert res.exit_code == 0, res.output
    xs = xray_data.load_xrays(tmp_path / "x")
    assert float(xs.images.min()) >= 0 and float(xs.images.max()) == 1.0
    assert bool((xs.images[:, :4] == 1).all()) and bool((xs.images[:, :, -4:] == 1).all())
    plain = invoke("simulate-xrays", ct, tmp_path / "p", "--grid", 32, "--det", 48)
    assert plain.exit_code == 0, plain.output
    assert float(xray_data.load_xrays(tmp_path / "p").images.max()) > 1.0  # line integrals
    assert_one_line_error(invoke("simulate-xrays", ct, tmp_path / "y", "--detector", "contrast=2"),
                          "detector item")
