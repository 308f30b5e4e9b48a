"""One geometry model for every scenario: per-view ASTRA-style vectors in millimetres.

Each view is 12 numbers (the ASTRA ``cone_vec`` / ``parallel3d_vec`` convention):

* cone:     ``(src, d, u, v)``, ``src`` the X-ray source position;
* parallel: ``(ray, d, u, v)``, ``ray`` the ray direction (any length);

``d`` is the detector centre, ``u`` the step from pixel column ``c`` to ``c + 1`` and ``v``
the step from row ``r`` to ``r + 1`` (both in mm, so their lengths are the pixel pitch and
they may be tilted or non-orthogonal). The centre of pixel ``(r, c)`` of an ``H x W``
detector is ``d + (c - (W - 1) / 2) u + (r - (H - 1) / 2) v``. Projections are arrays of
shape ``(V, H, W)`` indexed ``[view, row, column]``.

:class:`VolumeGrid` is an axis-aligned voxel grid in the same world frame: ``shape``
``(nx, ny, nz)``, ``spacing`` (mm), ``origin`` = centre of voxel ``(0, 0, 0)`` (mm); voxel
``(i, j, k)`` sits at ``origin + (i, j, k) * spacing``. Volumes are arrays indexed
``[i, j, k]``.

Constructors: :meth:`Geometry.circular` (TIGRE and NAF conventions),
:meth:`Geometry.from_poses` (arbitrary C-arm poses), :meth:`Geometry.biplanar` (AP + lateral).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .errors import RgsInputError

MODES = ("cone", "parallel")
KERNEL_TABLE_WIDTH = 24


def _vec3(name: str, x: Sequence[float]) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if a.shape != (3,) or not np.all(np.isfinite(a)):
        raise RgsInputError(f"{name} must be 3 finite numbers, got {x!r}")
    return a


# --------------------------------------------------------------------------------------
# Volume grid
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VolumeGrid:
    """Axis-aligned voxel grid: ``shape`` (nx, ny, nz), ``spacing`` and ``origin`` in mm."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]

    def __post_init__(self) -> None:
        shape = tuple(int(n) for n in self.shape)
        if len(shape) != 3 or min(shape) < 1:
            raise RgsInputError(f"grid shape must be 3 positive integers, got {self.shape!r}")
        spacing = tuple(float(s) for s in _vec3("grid spacing", self.spacing))
        if min(spacing) <= 0:
            raise RgsInputError(f"grid spacing must be positive (mm), got {self.spacing!r}")
        origin = tuple(float(o) for o in _vec3("grid origin", self.origin))
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "origin", origin)

    @classmethod
    def centred(cls, shape: Sequence[int], spacing: Sequence[float] | float,
                centre: Sequence[float] = (0.0, 0.0, 0.0)) -> "VolumeGrid":
        """Grid of ``shape`` voxels whose box is centred on ``centre`` (mm)."""
        sp = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,))
        n = np.asarray(shape, dtype=np.float64)
        origin = _vec3("centre", centre) - (n - 1) / 2 * sp
        return cls(tuple(int(s) for s in shape), tuple(sp), tuple(origin))

    @property
    def size_mm(self) -> np.ndarray:
        """Edge lengths of the grid's box (mm), voxel faces included."""
        return np.asarray(self.shape) * np.asarray(self.spacing)

    @property
    def centre(self) -> np.ndarray:
        return np.asarray(self.origin) + (np.asarray(self.shape) - 1) / 2 * np.asarray(self.spacing)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Outer corners (lo, hi) of the box covered by the voxels (mm)."""
        lo = np.asarray(self.origin) - 0.5 * np.asarray(self.spacing)
        return lo, lo + self.size_mm

    def voxel_centres(self, dtype: torch.dtype = torch.float64,
                      device: torch.device | str = "cpu") -> torch.Tensor:
        """World positions of all voxel centres, shape (nx, ny, nz, 3), mm."""
        axes = [torch.arange(n, dtype=dtype, device=device) * s + o
                for n, s, o in zip(self.shape, self.spacing, self.origin)]
        return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)

    def sub_grid(self, start: Sequence[int], shape: Sequence[int]) -> "VolumeGrid":
        """The grid of voxels ``start .. start + shape`` (indices) of this grid."""
        st = np.asarray(start, dtype=np.int64)
        sh = np.asarray(shape, dtype=np.int64)
        if st.shape != (3,) or sh.shape != (3,) or np.any(st < 0) or np.any(st + sh > self.shape):
            raise RgsInputError(f"sub-grid start {tuple(start)} shape {tuple(shape)} "
                                f"does not fit in grid shape {self.shape}")
        origin = np.asarray(self.origin) + st * np.asarray(self.spacing)
        return VolumeGrid(tuple(int(s) for s in sh), self.spacing, tuple(origin))

    def affine(self) -> np.ndarray:
        """4x4 NIfTI affine mapping voxel indices (i, j, k, 1) to world mm."""
        a = np.diag(list(self.spacing) + [1.0])
        a[:3, 3] = self.origin
        return a

    @classmethod
    def from_affine(cls, affine: np.ndarray, shape: Sequence[int]
                    ) -> tuple["VolumeGrid", tuple[int, int, int], tuple[bool, bool, bool]]:
        """Grid for a NIfTI image whose affine is a signed axis permutation times a scaling.

        Returns ``(grid, perm, flips)``: reorient the image array with
        :func:`reorient_to_grid` ``(array, perm, flips)`` to index it on the grid (world
        axes x, y, z ascending). Oblique (rotated) affines raise :class:`RgsInputError`.
        """
        a = np.asarray(affine, dtype=np.float64)
        if a.shape != (4, 4) or not np.all(np.isfinite(a)):
            raise RgsInputError("NIfTI affine must be a finite 4x4 matrix")
        m = a[:3, :3]
        spacing_cols = np.linalg.norm(m, axis=0)
        if np.any(spacing_cols <= 0):
            raise RgsInputError("NIfTI affine has a zero column: the image has no valid voxel size")
        direction = m / spacing_cols
        perm = np.argmax(np.abs(direction), axis=0)  # world axis of each array axis
        if sorted(perm.tolist()) != [0, 1, 2] or np.max(np.abs(np.abs(direction[perm, [0, 1, 2]]) - 1)) > 1e-4:
            raise RgsInputError(
                "NIfTI affine is oblique (rotated voxel axes): resample the image to an "
                "axis-aligned grid first (e.g. with nibabel.processing.resample_to_output)")
        sign = np.sign(direction[perm, [0, 1, 2]])
        n = np.asarray(shape, dtype=np.int64)
        # array axis p maps to world axis perm[p]; a negative sign means the world coordinate
        # decreases with the index, so that axis is flipped.
        inv = np.argsort(perm)  # world axis w comes from array axis inv[w]
        spacing = spacing_cols[inv]
        flips = tuple(bool(sign[inv[w]] < 0) for w in range(3))
        # world position of the voxel that becomes grid index (0, 0, 0)
        first = np.zeros(3)
        for w in range(3):
            p = inv[w]
            first[p] = n[p] - 1 if flips[w] else 0
        origin = (a @ np.append(first, 1.0))[:3]
        grid = cls(tuple(int(n[inv[w]]) for w in range(3)), tuple(spacing), tuple(origin))
        return grid, tuple(int(i) for i in inv), flips

    def to_dict(self) -> dict:
        return {"shape": list(self.shape), "spacing": list(self.spacing), "origin": list(self.origin)}

    @classmethod
    def from_dict(cls, d: dict) -> "VolumeGrid":
        try:
            return cls(tuple(d["shape"]), tuple(d["spacing"]), tuple(d["origin"]))
        except KeyError as exc:
            raise RgsInputError(f"grid description lacks key {exc}: need shape, spacing, origin") from exc


def unravel(flat: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Indices (N, len(shape)) int64 of the C-order flat indices ``flat`` (N,) into an array of
    ``shape``: ``torch.unravel_index`` stacked, without its type check's import of sympy
    (0.2-0.4 s on first use)."""
    out, rest = [], flat.long()
    for n in reversed(list(shape)):
        out.append(rest % n)
        rest = rest // n
    return torch.stack(out[::-1], 1)


def reorient_to_grid(array, perm: Sequence[int], flips: Sequence[bool]):
    """Transpose/flip a NIfTI array (numpy or torch) into grid order; see ``from_affine``."""
    if isinstance(array, torch.Tensor):
        out = array.permute(*perm)
        dims = [w for w in range(3) if flips[w]]
        return out.flip(dims) if dims else out
    out = np.transpose(array, tuple(perm))
    for w in range(3):
        if flips[w]:
            out = np.flip(out, axis=w)
    return np.ascontiguousarray(out)


# --------------------------------------------------------------------------------------
# Projection geometry
# --------------------------------------------------------------------------------------

def _as_vectors(vectors) -> torch.Tensor:
    """``vectors`` (array or tensor, (V, 12), V >= 1) as a contiguous CPU float64 tensor; a
    clear error for any other shape."""
    vec = torch.from_numpy(np.ascontiguousarray(vectors)) if isinstance(vectors, np.ndarray) else vectors
    if not isinstance(vec, torch.Tensor) or vec.dim() != 2 or vec.shape[1] != 12 or vec.shape[0] < 1:
        shape = tuple(getattr(vec, "shape", ()))
        raise RgsInputError(f"geometry vectors must have shape (V, 12) with V >= 1, got {shape}")
    return vec.detach().to(device="cpu", dtype=torch.float64).contiguous()


@dataclass(frozen=True)
class Geometry:
    """Per-view detector/source vectors (mm), shape (V, 12) float64, plus detector size.

    ``det_shape`` is ``(H, W)`` = (rows, columns); ``mode`` is ``"cone"`` or ``"parallel"``.
    """

    vectors: torch.Tensor
    det_shape: tuple[int, int]
    mode: str = "cone"
    _tables: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise RgsInputError(f"geometry mode must be 'cone' or 'parallel', got {self.mode!r}")
        vec = _as_vectors(self.vectors)
        if not bool(torch.isfinite(vec).all()):
            raise RgsInputError("geometry vectors contain NaN or Inf: check the calibration file")
        h, w = (int(x) for x in self.det_shape)
        if h < 1 or w < 1:
            raise RgsInputError(f"detector shape must be positive (rows, cols), got {self.det_shape!r}")
        u, v = vec[:, 6:9], vec[:, 9:12]
        n = torch.linalg.cross(u, v)
        if bool((n.norm(dim=1) <= 1e-9 * u.norm(dim=1) * v.norm(dim=1)).any()) or bool(
                (u.norm(dim=1) == 0).any()) or bool((v.norm(dim=1) == 0).any()):
            raise RgsInputError("detector vectors u and v are zero or parallel in some view: "
                                "u and v must span the detector plane")
        first = vec[:, 0:3]
        if self.mode == "cone":
            dist = ((vec[:, 3:6] - first) * n).sum(1)
            if bool((dist.abs() <= 1e-9).any()):
                raise RgsInputError("a cone-beam source lies in its detector plane: check the vectors")
        else:
            if bool((first.norm(dim=1) == 0).any()) or bool(((first * n).sum(1).abs() <= 1e-9 * first.norm(dim=1) * n.norm(dim=1)).any()):
                raise RgsInputError("a parallel-beam ray direction is zero or parallel to its detector")
        object.__setattr__(self, "vectors", vec)
        object.__setattr__(self, "det_shape", (h, w))

    # ---- basic accessors -----------------------------------------------------------
    @property
    def num_views(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def sources(self) -> torch.Tensor:
        """(V, 3) source positions (cone) in mm."""
        if self.mode != "cone":
            raise RgsInputError("a parallel-beam geometry has no source positions")
        return self.vectors[:, 0:3]

    def subset(self, index) -> "Geometry":
        """The views selected by ``index`` (slice, list or tensor of view indices). The
        kernel tables already cached on this geometry come along (their rows, gathered on
        their device without a host-to-device copy), so a training loop that draws a random
        batch of views every step neither recomputes nor re-uploads them."""
        idx = torch.as_tensor(index, dtype=torch.long) if not isinstance(index, slice) else index
        vectors = self.vectors[idx].reshape(-1, 12)
        if vectors.shape[0] < 1:
            raise RgsInputError(f"a geometry subset needs at least one view, got index {index!r}")
        # rows of a checked geometry: no need to check them again (a training loop's every step)
        sub = self.derived(vectors)
        rows = range(self.num_views)[idx] if isinstance(idx, slice) else idx.reshape(-1).tolist()
        for key, table in self._tables.items():
            sub._tables[key] = torch.stack([table[i] for i in rows])
        return sub

    def derived(self, vectors: torch.Tensor | np.ndarray, det_shape: tuple[int, int] | None = None) -> "Geometry":
        """A geometry of this mode with ``vectors`` (V', 12, mm) and ``det_shape`` (default:
        this one's) that were derived from this checked geometry by operations that keep a
        valid geometry valid: a subset of views, a rigid move, detector shifts within the
        plane, merged pixels. The constructor's value checks (a dozen host operations and
        reads per geometry) are skipped: registration derives one per window, scale and
        batch of candidate poses. No kernel table is carried over."""
        out = object.__new__(Geometry)
        for name, value in (("vectors", _as_vectors(vectors)),
                            ("det_shape", self.det_shape if det_shape is None else tuple(int(x) for x in det_shape)),
                            ("mode", self.mode), ("_tables", {})):
            object.__setattr__(out, name, value)
        return out

    def pixel_centres(self) -> torch.Tensor:
        """World positions of all pixel centres, shape (V, H, W, 3), mm, float64."""
        h, w = self.det_shape
        d, u, v = self.vectors[:, 3:6], self.vectors[:, 6:9], self.vectors[:, 9:12]
        cc = torch.arange(w, dtype=torch.float64) - (w - 1) / 2
        rr = torch.arange(h, dtype=torch.float64) - (h - 1) / 2
        return (d[:, None, None, :] + cc[None, None, :, None] * u[:, None, None, :]
                + rr[None, :, None, None] * v[:, None, None, :])

    def rays(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Ray start points and unit directions for every pixel, each (V, H, W, 3), float64.

        Cone: rays start at the source and point at the pixel centre. Parallel: rays pass
        through the pixel centre along the view's direction; the start point is the pixel
        centre (integrate over the whole line).
        """
        pix = self.pixel_centres()
        if self.mode == "cone":
            start = self.vectors[:, None, None, 0:3].expand_as(pix)
            dirs = pix - start
        else:
            start = pix
            dirs = self.vectors[:, None, None, 0:3].expand_as(pix)
        return start.contiguous(), (dirs / dirs.norm(dim=-1, keepdim=True)).contiguous()

    # ---- checks --------------------------------------------------------------------
    def check_against(self, grid: VolumeGrid) -> None:
        """Raise if a cone-beam source sits inside (or on) the grid's box."""
        if self.mode != "cone":
            return
        lo, hi = (torch.from_numpy(b) for b in grid.bounds())
        s = self.sources
        inside = ((s >= lo) & (s <= hi)).all(dim=1)
        if bool(inside.any()):
            k = int(torch.nonzero(inside)[0])
            raise RgsInputError(
                f"view {k}: the X-ray source {s[k].tolist()} mm lies inside the volume box "
                f"{lo.tolist()}..{hi.tolist()} mm: check the source distance (DSO) or the volume origin")

    # ---- kernel parameters -----------------------------------------------------------
    def projection_rows(self) -> torch.Tensor:
        """Per-view linear maps to continuous pixel coordinates, shape (V, 11), float64.

        Cone: for ``t = x - src`` the column is ``c = (Pc . t) / (Pn . t)`` and the row
        ``r = (Pr . t) / (Pn . t)``; ``Pn . t`` is the fraction of the way from the source to
        the detector plane (positive in front of the source). Parallel: ``c = Pc . x + c0``,
        ``r = Pr . x + r0``. Columns: ``Pc (3), Pr (3), Pn (3), c0, r0``.
        """
        vec = self.vectors
        first, d, u, v = vec[:, 0:3], vec[:, 3:6], vec[:, 6:9], vec[:, 9:12]
        h, w = self.det_shape
        n = torch.linalg.cross(u, v)
        ut = torch.linalg.cross(v, n)
        ut = ut / (u * ut).sum(1, keepdim=True)  # dual basis: ut.u = 1, ut.v = 0, ut.n = 0
        vt = torch.linalg.cross(n, u)
        vt = vt / (v * vt).sum(1, keepdim=True)
        out = torch.zeros(self.num_views, 11, dtype=torch.float64)
        if self.mode == "cone":
            s = first
            pn = n / ((d - s) * n).sum(1, keepdim=True)
            pa = ut + ((s - d) * ut).sum(1, keepdim=True) * pn
            pb = vt + ((s - d) * vt).sum(1, keepdim=True) * pn
            out[:, 0:3] = pa + (w - 1) / 2 * pn
            out[:, 3:6] = pb + (h - 1) / 2 * pn
            out[:, 6:9] = pn
        else:
            r = first
            pa = ut - ((r * ut).sum(1, keepdim=True) / (r * n).sum(1, keepdim=True)) * n
            pb = vt - ((r * vt).sum(1, keepdim=True) / (r * n).sum(1, keepdim=True)) * n
            out[:, 0:3] = pa
            out[:, 3:6] = pb
            out[:, 9] = (w - 1) / 2 - (d * pa).sum(1)
            out[:, 10] = (h - 1) / 2 - (d * pb).sum(1)
        return out

    def kernel_table(self, device: torch.device | str) -> torch.Tensor:
        """Everything a kernel needs about each view, shape (V, 24), float32, on ``device``.

        Columns: ``[0:3]`` source (cone) or unit ray direction (parallel), ``[3:6]`` detector
        centre d, ``[6:9]`` u, ``[9:12]`` v, ``[12:23]`` :meth:`projection_rows`, ``[23]`` 0.
        Cached per device, so training loops do not re-upload it every step.
        """
        key = str(torch.device(device))
        if key in self._tables:
            return self._tables[key]
        vec = self.vectors.clone()
        if self.mode == "parallel":
            vec[:, 0:3] = vec[:, 0:3] / vec[:, 0:3].norm(dim=1, keepdim=True)
        table = torch.zeros(self.num_views, KERNEL_TABLE_WIDTH, dtype=torch.float64)
        table[:, 0:12] = vec
        table[:, 12:23] = self.projection_rows()
        self._tables[key] = table.to(device=device, dtype=torch.float32).contiguous()
        return self._tables[key]

    # ---- serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"mode": self.mode, "det_shape": list(self.det_shape),
                "vectors": self.vectors.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "Geometry":
        try:
            return cls(torch.tensor(d["vectors"], dtype=torch.float64), tuple(d["det_shape"]),
                       d.get("mode", "cone"))
        except KeyError as exc:
            raise RgsInputError(f"geometry description lacks key {exc}: need vectors, det_shape") from exc

    # ---- constructors ----------------------------------------------------------------
    @classmethod
    def circular(cls, angles: Sequence[float] | np.ndarray | torch.Tensor, dso: float, dsd: float,
                 det_shape: Sequence[int], pixel_size: Sequence[float] | float,
                 det_offset: Sequence[float] = (0.0, 0.0), isocentre: Sequence[float] = (0.0, 0.0, 0.0),
                 convention: str = "tigre", mode: str = "cone") -> "Geometry":
        """Circular orbit about the world z axis through ``isocentre``.

        Conventions (both TIGRE's scanner model, with the array layout that NAF and
        R2-Gaussian store; R2-Gaussian flips raw TIGRE ``Ax`` output vertically before saving,
        so raw TIGRE arrays may need their rows flipped to match):

        * source at ``isocentre + DSO (cos a, sin a, 0)``, detector centre at
          ``isocentre + (DSO - DSD)(cos a, sin a, 0)``; columns step along
          ``(-sin a, cos a, 0)``, rows along ``(0, 0, -1)`` (row 0 at the top, +z);
        * ``"tigre"``: ``det_offset = (row, col)`` shift in mm of the detector centre along
          the row / column directions (TIGRE's ``offDetector`` = [v, u]);
        * ``"naf"``: as NAF, R2-Gaussian and X2-Gaussian read their pickles: offsets are
          ignored (they ignore ``offDetector``).

        ``angles`` in radians; ``det_shape`` = (rows, cols); ``pixel_size`` = (row pitch,
        column pitch) or one number, mm. For ``mode="parallel"`` the ray direction is from
        the source side towards the detector and ``dso`` only places the detector plane.
        """
        if convention not in ("tigre", "naf"):
            raise RgsInputError(f"unknown convention {convention!r}: use 'tigre' or 'naf'")
        a = torch.as_tensor(np.asarray(angles, dtype=np.float64)).reshape(-1)
        if a.numel() == 0 or not bool(torch.isfinite(a).all()):
            raise RgsInputError("angles must be a non-empty list of finite radians")
        if not (dsd > 0 and dso > 0) or (mode == "cone" and dsd <= dso):
            raise RgsInputError(f"need DSD > DSO > 0 (mm), got DSD={dsd}, DSO={dso}")
        pitch = np.broadcast_to(np.asarray(pixel_size, dtype=np.float64), (2,))
        off = np.zeros(2) if convention == "naf" else np.asarray(det_offset, dtype=np.float64)
        iso = torch.from_numpy(_vec3("isocentre", isocentre))
        radial = torch.stack([a.cos(), a.sin(), torch.zeros_like(a)], 1)
        col_dir = torch.stack([-a.sin(), a.cos(), torch.zeros_like(a)], 1)
        row_dir = torch.tensor([0.0, 0.0, -1.0], dtype=torch.float64).expand_as(radial)
        d = iso + (dso - dsd) * radial + off[0] * row_dir + off[1] * col_dir
        first = iso + dso * radial if mode == "cone" else -radial
        vec = torch.cat([first, d, pitch[1] * col_dir, pitch[0] * row_dir], dim=1)
        return cls(vec, tuple(det_shape), mode)

    @classmethod
    def from_poses(cls, source_to_world: np.ndarray | torch.Tensor, dsd: float,
                   det_shape: Sequence[int], pixel_size: Sequence[float] | float,
                   principal_point: Sequence[float] = (0.0, 0.0)) -> "Geometry":
        """Cone-beam views from arbitrary C-arm poses.

        ``source_to_world`` (V, 4, 4) maps each view's source frame to the world: the source
        sits at the frame's origin and looks along its +z axis; the detector plane is
        ``z = dsd`` mm, columns step along +x and rows along +y (the OpenCV camera
        convention). ``principal_point`` = (row, col) offset in mm of the detector centre
        from the foot of the perpendicular from the source.
        """
        t = torch.as_tensor(np.asarray(source_to_world, dtype=np.float64))
        if t.dim() == 2:
            t = t[None]
        if t.shape[1:] != (4, 4):
            raise RgsInputError(f"poses must have shape (V, 4, 4), got {tuple(t.shape)}")
        rot = t[:, :3, :3]
        if not bool(torch.allclose(rot @ rot.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand_as(rot), atol=1e-6)):
            raise RgsInputError("pose rotations are not orthonormal: pass rigid 4x4 transforms")
        if dsd <= 0:
            raise RgsInputError(f"DSD must be positive (mm), got {dsd}")
        pitch = np.broadcast_to(np.asarray(pixel_size, dtype=np.float64), (2,))
        ex, ey, ez = rot[:, :, 0], rot[:, :, 1], rot[:, :, 2]
        src = t[:, :3, 3]
        d = src + dsd * ez + principal_point[0] * ey + principal_point[1] * ex
        vec = torch.cat([src, d, pitch[1] * ex, pitch[0] * ey], dim=1)
        return cls(vec, tuple(det_shape), "cone")

    @classmethod
    def biplanar(cls, dso: float, dsd: float, det_shape: Sequence[int],
                 pixel_size: Sequence[float] | float,
                 isocentre: Sequence[float] = (0.0, 0.0, 0.0)) -> "Geometry":
        """AP + lateral pair about ``isocentre`` in the CT's world frame (mm).

        View 0 (AP): source anterior (+y), detector posterior; columns run along -x, rows
        along -z. View 1 (lateral): source on the +x side, detector on the -x side; columns
        run along +y, rows along -z. Both are :meth:`circular` views at angles 90 and 0 deg.
        """
        return cls.circular([math.pi / 2, 0.0], dso, dsd, det_shape, pixel_size,
                            isocentre=isocentre, convention="tigre")
