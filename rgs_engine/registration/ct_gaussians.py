"""A known volume (a pre-operative CT) as radiative Gaussians, rigid poses of them, and a cache.

* :func:`fit_volume` — direct 3D fit of Gaussians to an attenuation volume (1/mm): centres
  sampled where the volume attenuates (probability proportional to attenuation), isotropic
  scales from the sample spacing, densities calibrated so the voxelised field matches the
  volume's mean over the sampled region, then Adam on the L1 distance between
  :func:`~rgs_engine.core.voxelization.voxelize` on random sub-grids and the volume. With a
  ``mask`` only the masked voxels are fitted: Gaussians start inside the mask and the target
  is the volume inside the mask and 0 around it (within the mask's bounding box), so the
  Gaussians describe that structure (one vertebra) alone.
* :func:`rigid_transform_gaussians` / :func:`se3_exp` — a rigid CT-to-X-ray pose applied to
  the Gaussians, differentiable w.r.t. the pose (gradients reach it through the splat bridge).
* :func:`gaussians_for_ct` — a CT file (HU) to Gaussians once: the result is cached next to
  the CT (``<ct>.rgs-cache/<key>.npz``) under a key of the CT's (and mask's) content hash, the
  label, the fit parameters and the rgs version, so a second registration skips the fit.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..core import losses, metrics, runtime, stats
from ..core.adam import Adam
from ..core.errors import RgsInputError, check_tensor
from ..core.gaussians import Gaussians
from ..core.geometry import VolumeGrid, unravel
from ..io.files import atomic_write, load_nifti
from ..core.voxelization import voxelize

CACHE_FORMAT = 2
MASK_MARGIN_MM = 4.0  # a masked fit covers the selection's bounding box grown by this
PARAM_NAMES = ("means", "scales", "quats", "densities")


# --------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------
def _mask_box(mask: torch.Tensor, margin: int) -> tuple[list[int], list[int]]:
    """Index bounding box (start, shape) of ``mask``'s true voxels, grown by ``margin``."""
    start, shape = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hit = torch.nonzero(mask.any(dim=other)).squeeze(1)
        lo = max(int(hit.min()) - margin, 0)
        hi = min(int(hit.max()) + margin + 1, mask.shape[axis])
        start.append(lo)
        shape.append(hi - lo)
    return start, shape


def fit_volume(volume: torch.Tensor, grid: VolumeGrid, num_gaussians: int = 0,
               iterations: int = 300, mask: torch.Tensor | None = None, seed: int = 0,
               block: int = 64, threshold: float = 0.05, init_scale: float = 0.5,
               lr_position: tuple[float, float] = (0.05, 0.005),
               lr_scale: tuple[float, float] = (4e-2, 4e-3),
               lr_rotation: tuple[float, float] = (1e-2, 1e-3),
               lr_density: tuple[float, float] = (6e-2, 6e-3),
               progress: Callable[[int, int], None] | None = None,
               ) -> tuple[dict[str, torch.Tensor], dict]:
    """Fit radiative Gaussians to ``volume`` (``grid.shape``, 1/mm): ``(params, report)``.

    ``params`` holds the physical tensors ``means`` (N, 3) mm, ``scales`` (N, 3) mm, ``quats``
    (N, 4) (w, x, y, z) and ``densities`` (N,) 1/mm, float32 on the runtime device, detached.
    ``report``: ``psnr`` and ``psnr_init`` (dB, voxelised fit vs the target over the fitted
    region), ``seconds``, ``num_gaussians``, ``iterations``, ``region`` (start, shape of the
    fitted index box).

    ``num_gaussians`` 0 picks one per 8 sampled voxels, clamped to 2k..100k. Centres are drawn
    among voxels above ``threshold`` x the 99th percentile of the target (inside ``mask``
    when given, a bool volume of ``grid.shape``), with probability proportional to
    attenuation; scales start at ``init_scale`` x the mean sample spacing
    ``(region volume / N)^(1/3)``. Each step voxelises a random sub-grid of at most
    ``block``^3 voxels of the fitted region (the whole region when smaller) and takes one
    Adam step on the L1 distance to the target normalised by its 99th percentile; learning
    rates decay log-linearly from the first to the second value of each pair (positions in
    voxels per step, the others on the raw tensors of :class:`~rgs_engine.core.gaussians.Gaussians`).
    ``progress(step, iterations)`` is called after every step; nothing in the loop reads a
    value back to the host.

    Defaults measured on 2 CPU cores, 32^3 ellipsoid phantom (``tests/blob_phantom.py``, 3 mm
    voxels, 2000 Gaussians, whole grid per step, about 0.02 s per step): the calibrated
    initialisation gives 16.9 dB, 100 / 200 / 300 steps 32.5 / 36.3 / 38.9 dB. At 200 steps:
    init_scale 1.0 with half these scale / density rates 28.2 dB, init_scale 1.0 with these
    rates 30.5 dB, 0.7 32.6 dB, 0.5 36.3 dB; twice the position rate changed < 0.1 dB. With
    a 64^3 block a large CT costs per step what a 64^3 volume does (plus the Gaussians
    outside the block): plan a few thousand steps at 256^3.
    """
    dev = runtime.ensure()
    check_tensor("volume", volume, tuple(grid.shape))
    if iterations < 0 or num_gaussians < 0 or block < 1:
        raise RgsInputError("need iterations >= 0, num_gaussians >= 0 and block >= 1")
    t0 = time.perf_counter()
    vol = volume.detach().to(device=dev, dtype=torch.float32).clamp_min(0)
    if mask is not None:
        check_tensor("mask", mask, tuple(grid.shape))
        m = mask.to(device=dev, dtype=torch.bool)
        if not bool(m.any()):
            raise RgsInputError("the mask is empty on this grid: nothing to fit")
        start, shape = _mask_box(m, margin=2)
        vol = vol * m
    else:
        m = None
        start, shape = [0, 0, 0], list(grid.shape)
    region_grid = grid.sub_grid(start, shape)
    sl = tuple(slice(s, s + n) for s, n in zip(start, shape))
    target = vol[sl].contiguous()
    inside = m[sl] if m is not None else None

    flat = target.reshape(-1)
    positive = flat[flat > 0]
    if positive.numel() == 0:
        raise RgsInputError("the volume has no attenuating voxel in the fitted region")
    mu_ref = float(stats.quantile(positive, 0.99))
    cand_w = torch.where(flat > threshold * mu_ref, flat, torch.zeros_like(flat))
    if inside is not None:
        cand_w = cand_w * inside.reshape(-1)
    ncand = int((cand_w > 0).sum())
    if ncand == 0:
        raise RgsInputError("no voxel above the sampling threshold: lower threshold")
    n = num_gaussians or int(min(max(ncand // 8, 2000), 100_000))

    gen = torch.Generator().manual_seed(seed)
    cdf = torch.cumsum(cand_w.double(), 0)
    u = torch.rand(n, generator=gen, dtype=torch.float64).to(dev) * cdf[-1]
    pick = torch.searchsorted(cdf, u).clamp_max(flat.numel() - 1)
    idx = unravel(pick, shape).float()
    spacing = torch.tensor(grid.spacing, dtype=torch.float32, device=dev)
    origin = torch.tensor(region_grid.origin, dtype=torch.float32, device=dev)
    jitter = torch.rand(n, 3, generator=gen).to(dev) - 0.5
    means = origin + (idx + jitter) * spacing
    region_mm3 = ncand * float(np.prod(grid.spacing))
    sigma = init_scale * (region_mm3 / n) ** (1 / 3)
    vmin, vmax = float(min(grid.spacing)), float(region_grid.size_mm.max())
    scale_min, scale_max = 0.1 * vmin, 0.25 * vmax
    sigma = min(max(sigma, 2 * scale_min), 0.5 * scale_max)
    scales = torch.full((n, 3), sigma, device=dev)
    quats = torch.zeros(n, 4, device=dev)
    quats[:, 0] = 1
    dens = flat[pick].clone()
    with torch.no_grad():
        field = voxelize(means, scales, quats, dens, region_grid)
        sel = (cand_w > 0).reshape(target.shape)
        dens = dens * (target[sel].mean() / field[sel].mean().clamp_min(1e-12))
        psnr_init = metrics.psnr_3d(voxelize(means, scales, quats, dens, region_grid), target)

    g = Gaussians.from_physical(means, scales, quats, dens, scale_min, scale_max).requires_grad_()
    names = ("means", "scale_raw", "quat_raw", "density_raw")
    opt = Adam([{"params": [p], "name": k} for k, p in zip(names, g.parameters())], lr=0.0, eps=1e-15)
    rates = {"means": tuple(r * vmin for r in lr_position), "scale_raw": lr_scale,
             "quat_raw": lr_rotation, "density_raw": lr_density}
    bshape = [min(block, s) for s in shape]
    whole = bshape == list(shape)
    target_n = target / mu_ref
    for it in range(iterations):
        frac = min(it / max(iterations - 1, 1), 1.0)
        for group in opt.param_groups:
            group["lr"] = losses.log_linear(rates[group["name"]], frac)
        if whole:
            sub, ref = region_grid, target_n
        else:
            bs = [int(torch.randint(0, s - b + 1, (1,), generator=gen)) for s, b in zip(shape, bshape)]
            sub = region_grid.sub_grid(bs, bshape)
            ref = target_n[tuple(slice(a, a + b) for a, b in zip(bs, bshape))]
        pred = voxelize(*g.physical(), sub) / mu_ref
        loss = losses.l1(pred, ref)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None:
            progress(it + 1, iterations)

    with torch.no_grad():
        params = {k: v.detach().contiguous() for k, v in zip(PARAM_NAMES, g.physical())}
        fit = voxelize(*params.values(), region_grid)
        psnr = metrics.psnr_3d(fit, target)
    runtime.sync()
    report = {"psnr": psnr, "psnr_init": psnr_init, "seconds": time.perf_counter() - t0,
              "num_gaussians": n, "iterations": iterations, "mu_ref": mu_ref,
              "region": {"start": start, "shape": shape}}
    return params, report


# --------------------------------------------------------------------------------------
# A CT file to Gaussians, cached
# --------------------------------------------------------------------------------------
def resample_nearest(volume: torch.Tensor, grid: VolumeGrid, new_grid: VolumeGrid,
                     fill=0) -> torch.Tensor:
    """Nearest-neighbour resampling of ``volume`` (``grid.shape``, any dtype, e.g. labels)
    at ``new_grid``'s voxel centres; points outside ``grid``'s box get ``fill``."""
    check_tensor("volume", volume, tuple(grid.shape), finite=False)
    idx, ok = [], []
    for axis in range(3):
        world = new_grid.origin[axis] + torch.arange(new_grid.shape[axis], dtype=torch.float64) \
            * new_grid.spacing[axis]
        i = torch.floor((world - grid.origin[axis]) / grid.spacing[axis] + 0.5).long()
        ok.append((i >= 0) & (i < grid.shape[axis]))
        idx.append(i.clamp(0, grid.shape[axis] - 1).to(volume.device))
    out = volume[idx[0][:, None, None], idx[1][None, :, None], idx[2][None, None, :]]
    inside = (ok[0][:, None, None] & ok[1][None, :, None] & ok[2][None, None, :]).to(volume.device)
    return torch.where(inside, out, torch.full_like(out, fill))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _load_selection(mask_path: Path, label: int | None, ct_grid: VolumeGrid
                    ) -> tuple[torch.Tensor, VolumeGrid]:
    """The voxels of ``label`` (any non-zero label when None) of the segmentation at
    ``mask_path``, a bool volume on the mask's own grid, which must cover the CT's box."""
    labels, mask_grid = load_nifti(mask_path, need_affine=True)
    ct_lo, ct_hi = ct_grid.bounds()
    m_lo, m_hi = mask_grid.bounds()
    tol = 0.5 * float(max(max(ct_grid.spacing), max(mask_grid.spacing)))
    if np.abs(ct_lo - m_lo).max() > tol or np.abs(ct_hi - m_hi).max() > tol:
        raise RgsInputError(
            f"{mask_path} covers the box {np.round(m_lo, 1).tolist()}..{np.round(m_hi, 1).tolist()} mm "
            f"but the CT covers {np.round(ct_lo, 1).tolist()}..{np.round(ct_hi, 1).tolist()} mm: "
            "pass the segmentation made on this CT")
    ints = torch.round(labels).to(torch.int64)
    if label is None:
        sel = ints != 0
        if not bool(sel.any()):
            raise RgsInputError(f"{mask_path} has no non-zero voxel: pass a segmentation")
    else:
        sel = ints == int(label)
        if not bool(sel.any()):
            present = [int(v) for v in torch.unique(ints).tolist() if v != 0]
            raise RgsInputError(f"label {label} is not in {mask_path}; labels present: {present}")
    return sel, mask_grid


def selection_box(sel: torch.Tensor, grid: VolumeGrid, margin_mm: float) -> VolumeGrid:
    """The sub-grid of ``grid`` that holds the true voxels of ``sel``, grown by about
    ``margin_mm`` on every side (clipped to ``grid``)."""
    margin = max(int(np.ceil(margin_mm / min(grid.spacing))), 0)
    start, shape = _mask_box(sel, margin)
    return grid.sub_grid(start, shape)


def gaussians_for_ct(ct_path, grid_size: int = 128, num_gaussians: int = 0,
                     iterations: int = 300, mask_path=None, label: int | None = None,
                     complement: bool = False, cache_dir=None, force: bool = False, device: torch.device | str | None = None,
                     seed: int = 0, progress: Callable[[int, int], None] | None = None,
                     ) -> tuple[dict[str, torch.Tensor], dict]:
    """Radiative Gaussians of the CT (HU NIfTI) at ``ct_path``, fitted once and cached.

    The CT becomes attenuation (:func:`rgs_engine.sim.ct.attenuation_volume`'s conversion) on an
    isotropic grid of ``grid_size`` voxels along the longest edge of its box; with
    ``mask_path`` (a segmentation on the CT's box) only label ``label`` (any non-zero label
    when None) is fitted, and the grid spans that selection's bounding box grown by
    :data:`MASK_MARGIN_MM` (so ``grid_size`` sets the detail of the structure, not of the
    whole CT). With ``complement`` the whole CT is fitted with that selection removed (set to
    0): the context of the structure, so that context + structure = the CT
    (:func:`rgs_engine.registration.register.register`'s ``context``). Returns ``(params, info)``: ``params`` as :func:`fit_volume` on the runtime device
    (``device`` initialises the runtime if given); ``info`` holds ``cached`` (loaded, no fit),
    ``seconds`` (this call), ``path`` (the .npz), ``key``, ``grid`` (dict) and the fit's
    ``report``.

    The cache file is ``<cache_dir>/<key>.npz`` (default ``cache_dir``: ``<ct_path>.rgs-cache``
    next to the CT), key = sha256 of the CT's bytes, the mask's bytes and label, the fit
    parameters and the rgs version; it is written atomically. ``force`` refits and rewrites.
    """
    from .. import __version__
    from ..sim.ct import attenuation_volume

    t0 = time.perf_counter()
    dev = runtime.init(torch.device(device).type) if device is not None else runtime.ensure()
    ct_path = Path(ct_path)
    if not ct_path.is_file():
        raise RgsInputError(f"{ct_path}: no such file: check the CT path")
    if label is not None and mask_path is None:
        raise RgsInputError("--label needs --mask: pass the segmentation the label refers to")
    if mask_path is not None and not Path(mask_path).is_file():
        raise RgsInputError(f"{mask_path}: no such file: check the mask path")
    fit_args = {"grid_size": int(grid_size), "num_gaussians": int(num_gaussians),
                "iterations": int(iterations), "seed": int(seed)}
    key_src = {"format": CACHE_FORMAT, "rgs": __version__, "ct": _sha256(ct_path),
               "mask": _sha256(Path(mask_path)) if mask_path is not None else None,
               "label": None if label is None else int(label), "complement": bool(complement),
               **fit_args}
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:32]
    folder = Path(cache_dir) if cache_dir is not None else ct_path.with_name(ct_path.name + ".rgs-cache")
    path = folder / f"{key}.npz"

    if path.is_file() and not force:
        try:
            with np.load(path) as z:
                params = {k: torch.from_numpy(z[k]).to(dev) for k in PARAM_NAMES}
                meta = json.loads(str(z["meta"]))
            if meta.get("key") == key:
                return params, {**meta, "cached": True, "path": str(path),
                                "seconds": time.perf_counter() - t0}
        except (OSError, KeyError, ValueError):
            pass  # damaged or foreign file: refit and overwrite

    hu, ct_grid = load_nifti(ct_path, need_affine=True)
    mask = region = None
    if complement and mask_path is None:
        raise RgsInputError("complement needs a mask: pass the segmentation and label to leave out")
    if mask_path is not None:
        sel, mask_grid = _load_selection(Path(mask_path), label, ct_grid)
        if complement:  # the selection becomes air before resampling
            hu = hu.masked_fill(resample_nearest(sel, mask_grid, ct_grid, fill=False), -1000.0)
        else:
            region = selection_box(sel, mask_grid, MASK_MARGIN_MM)
    volume, grid = attenuation_volume(hu.to(dev), ct_grid, int(grid_size), str(ct_path), region)
    if region is not None:
        mask = resample_nearest(sel, mask_grid, grid, fill=False).to(dev)
        if not bool(mask.any()):
            raise RgsInputError(f"the selected region of {mask_path} vanishes on the "
                                f"{grid.shape} grid: use a finer --grid")
    params, report = fit_volume(volume, grid, num_gaussians=num_gaussians, iterations=iterations,
                                mask=mask, seed=seed, progress=progress)
    meta = {"key": key, "key_source": key_src, "grid": grid.to_dict(), "report": report}
    with atomic_write(path, force=True) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, meta=np.array(json.dumps(meta)),
                     **{k: v.detach().cpu().numpy() for k, v in params.items()})
    return params, {**meta, "cached": False, "path": str(path), "seconds": time.perf_counter() - t0}
