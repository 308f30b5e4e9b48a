"""X-ray folders: a few calibrated radiographs (e.g. a biplanar AP + lateral pair) and their
geometry, the input of CT-to-X-ray registration. Format: datasets/FORMAT.md, "X-ray folders".

``FOLDER/geometry.json``::

    {"format": "rgs-xrays", "version": 1,
     "views": [{"file": "ap.npy", "vectors": [12 numbers], "mode": "cone",
                "det_shape": [H, W], "values": "line_integral" | "intensity",
                "i0": number (intensity only), "scale": 1, "offset": 0}, ...],
     "ground_truth_ct_to_xray": 4x4 (optional)}

Vectors follow the engine convention (:mod:`rgs_engine.core.geometry`, mm) in the X-ray (C-arm)
frame; ``ground_truth_ct_to_xray`` maps CT world mm (the NIfTI frame) to that frame. The
stored pixel value ``s`` of an image means ``value = offset + scale * s``; a
``line_integral`` view is that value, an ``intensity`` view becomes
``-ln(max(value, MIN_FRACTION * i0) / i0)``.

Image files: ``.npy`` (any real dtype), 8/16-bit grayscale ``.png`` incl. interlaced
(Pillow), grayscale ``.tif``/``.tiff`` incl. LZW / deflate compressed (tifffile), ``.dcm``
(pydicom). A folder of DICOM radiographs needs no ``geometry.json``: their tags give the
geometry (:mod:`rgs_engine.io.dicom`).
"""
from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile
import torch
from PIL import Image

from ..core import rigid
from ..core.errors import RgsInputError
from ..core.geometry import MODES, Geometry
from . import dicom
from .files import check_writable, load_json, save_json, write_bytes

FORMAT = "rgs-xrays"
VERSION = 1
GEOMETRY_FILE = "geometry.json"
VALUE_KINDS = ("line_integral", "intensity")
IMAGE_FORMATS = ("npy", "png", "dcm")
DICOM_EXTENSIONS = (".dcm", ".dicom")
MIN_FRACTION = 1e-6  # intensities are clamped to at least MIN_FRACTION x i0 before the log
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_MAX = 65535
PNG_GRAY_MODES = {"L": np.uint8, "I;16": np.uint16, "I;16B": np.uint16}  # Pillow mode -> dtype


@dataclass
class XRaySet:
    """Radiographs as line integrals ``images`` (V, H, W) float32, their ``geometry`` (X-ray
    frame), the file name of each view and the optional true CT-to-X-ray pose (4x4)."""

    images: torch.Tensor
    geometry: Geometry
    files: list[str] = field(default_factory=list)
    ground_truth: np.ndarray | None = None


# --------------------------------------------------------------------------------------
# PNG (8/16-bit grayscale, Pillow) and TIFF (tifffile)
# --------------------------------------------------------------------------------------
def encode_png_gray(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 or uint16 (H, W) grayscale image (Pillow picks the row filters)."""
    img = np.asarray(image)
    if img.ndim != 2 or img.dtype not in (np.uint8, np.uint16) or min(img.shape) < 1:
        raise RgsInputError(f"PNG images must be non-empty uint8 or uint16 (H, W), got {img.dtype} {img.shape}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buf, "PNG")
    return buf.getvalue()


def decode_png(data: bytes, name: str = "PNG") -> np.ndarray:
    """(H, W) uint8 or uint16 array of an 8/16-bit grayscale PNG, interlaced or not."""
    if data[:8] != PNG_SIGNATURE:
        raise RgsInputError(f"{name}: not a PNG file (bad signature): pass a PNG, .npy, .tif or .dcm image")
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            mode = image.mode
            if mode not in PNG_GRAY_MODES:
                raise RgsInputError(f"{name}: PNG has mode {mode} ({image.info.get('interlace', 0) and 'interlaced, ' or ''}"
                                    "colour or alpha): only 8/16-bit grayscale PNGs are read; convert it")
            arr = np.asarray(image)
    except RgsInputError:
        raise
    except Exception as exc:
        raise RgsInputError(f"{name}: damaged PNG data ({type(exc).__name__}: {exc}): re-export the image") from exc
    return arr.astype(PNG_GRAY_MODES[mode])


def read_tiff(data: bytes, name: str = "TIFF") -> np.ndarray:
    """(H, W) array of the first image of a grayscale TIFF (classic or BigTIFF, any byte
    order, uncompressed or compressed: LZW, deflate, PackBits, ...), read by tifffile.
    WhiteIsZero images are inverted so larger values mean more light, as BlackIsZero."""
    if data[:2] not in (b"II", b"MM") or len(data) < 8:
        raise RgsInputError(f"{name}: not a TIFF file (bad byte-order mark): pass a .tif, .png, .npy or .dcm image")
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            page = tif.pages.first
            photometric, spp = int(page.photometric), int(page.samplesperpixel)
            if spp != 1 or photometric not in (0, 1):
                raise RgsInputError(f"{name}: TIFF has {spp} samples per pixel (photometric {photometric}): "
                                    "only grayscale images are read; convert it")
            img = page.asarray()
    except RgsInputError:
        raise
    except Exception as exc:
        if "imagecodecs" in str(exc):  # tifffile's compressed codecs (LZW, JPEG, ...) live there
            raise RgsInputError(f"{name}: this TIFF's compression needs the imagecodecs package, which "
                                "is missing: pip install imagecodecs (an rgs dependency)") from exc
        raise RgsInputError(f"{name}: unreadable TIFF ({type(exc).__name__}: {exc}): "
                            "re-export it or convert to .png/.npy") from exc
    if img.dtype.kind not in "uif":
        raise RgsInputError(f"{name}: TIFF samples of type {img.dtype}: store real numbers; convert it")
    if photometric == 0:  # WhiteIsZero
        img = (np.iinfo(img.dtype).max - img) if img.dtype.kind == "u" else -img
    return img


# --------------------------------------------------------------------------------------
# Reading one image
# --------------------------------------------------------------------------------------
def read_image(path: str | os.PathLike) -> np.ndarray:
    """The stored pixel values of one view as a float64 (H, W) array (no conversion)."""
    p = Path(path)
    if not p.is_file():
        raise RgsInputError(f"{p}: view image not found: check the 'file' entries of {GEOMETRY_FILE}")
    ext = p.suffix.lower()
    if ext == ".npy":
        try:
            arr = np.load(p, allow_pickle=False)
        except Exception as exc:
            raise RgsInputError(f"{p}: not a readable .npy array ({exc}): re-save it with numpy.save") from exc
        if arr.dtype.kind not in "uif":
            raise RgsInputError(f"{p}: .npy array has dtype {arr.dtype}: store real numbers")
    elif ext == ".png":
        arr = decode_png(p.read_bytes(), str(p))
    elif ext in (".tif", ".tiff"):
        arr = read_tiff(p.read_bytes(), str(p))
    elif ext in DICOM_EXTENSIONS:
        arr = dicom.pixel_values(p)
    else:
        raise RgsInputError(f"{p}: unknown image type {ext!r}: use .npy, .png, .tif or .dcm")
    arr = np.asarray(arr, dtype=np.float64)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise RgsInputError(f"{p}: image has shape {arr.shape}, need one 2D grayscale image (H, W)")
    return arr


def to_line_integrals(values: np.ndarray, kind: str, i0: float | None = None) -> np.ndarray:
    """Line integrals of a view: ``values`` as they are, or ``-ln(max(I, MIN_FRACTION i0) / i0)``
    for intensities."""
    if kind == "line_integral":
        return values
    if kind != "intensity":
        raise RgsInputError(f"unknown values kind {kind!r}: use line_integral or intensity")
    if i0 is None or not (math.isfinite(i0) and i0 > 0):
        raise RgsInputError(f"intensity views need a positive i0 (unattenuated intensity), got {i0!r}")
    return -np.log(np.maximum(values, MIN_FRACTION * i0) / i0)


# --------------------------------------------------------------------------------------
# Folder
# --------------------------------------------------------------------------------------
def _number(view: dict, key: str, where: str, default: float | None = None) -> float | None:
    value = view.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RgsInputError(f"{where}: '{key}' must be a finite number, got {value!r}")
    return float(value)


def _dicom_folder(root: Path) -> dict | None:
    """The ``geometry.json`` content of a folder of DICOM radiographs without one: every
    ``.dcm`` / ``.dicom`` file (by name) a view, its geometry and values from its tags, the
    ground truth from the rgs private tag of the first file; None when there are none."""
    names = sorted(p.name for p in root.iterdir() if p.suffix.lower() in DICOM_EXTENSIONS and p.is_file())
    if not names:
        return None
    views = [{"file": n, **dicom.view_values(root / n)} for n in names]
    truth = dicom.ground_truth(root / names[0])
    return {"views": views, "ground_truth_ct_to_xray": None if truth is None else truth.tolist()}


def load_xrays(folder: str | os.PathLike) -> XRaySet:
    """Read an X-ray folder (``geometry.json`` + one image per view, or DICOM radiographs
    whose tags give the geometry) into an :class:`XRaySet`."""
    root = Path(folder)
    if not root.is_dir():
        raise RgsInputError(f"{root}: no such X-ray folder: check the path")
    gpath = root / GEOMETRY_FILE
    source = gpath  # named in the messages
    if gpath.is_file():
        meta = load_json(gpath)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise RgsInputError(f"{gpath}: 'format' must be {FORMAT!r}: not an rgs X-ray folder")
        if meta.get("version") != VERSION:
            raise RgsInputError(f"{gpath}: version {meta.get('version')!r} not supported: this rgs reads version {VERSION}")
    else:
        meta, source = _dicom_folder(root), root
        if meta is None:
            raise RgsInputError(f"{gpath}: missing: an X-ray folder needs {GEOMETRY_FILE} or DICOM files "
                                "(datasets/FORMAT.md)")
    views = meta.get("views")
    if not isinstance(views, list) or not views:
        raise RgsInputError(f"{source}: 'views' must be a non-empty list of views")
    images, vectors, files, shapes, modes = [], [], [], set(), set()
    for k, view in enumerate(views):
        where = f"{source} view {k}"
        if not isinstance(view, dict) or not isinstance(view.get("file"), str):
            raise RgsInputError(f"{where}: each view needs a 'file' name")
        if Path(view["file"]).suffix.lower() in DICOM_EXTENSIONS and not {"vectors", "det_shape"} <= set(view):
            view = {**dicom.view_geometry(root / view["file"]), **view}
        vec = view.get("vectors")
        if (not isinstance(vec, list) or len(vec) != 12
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vec)):
            raise RgsInputError(f"{where}: 'vectors' must be a list of 12 numbers (src/ray, d, u, v in mm)")
        if not all(math.isfinite(x) for x in vec):
            raise RgsInputError(f"{where}: 'vectors' contain NaN or Inf: fix the calibration")
        mode = view.get("mode", "cone")
        if mode not in MODES:
            raise RgsInputError(f"{where}: mode {mode!r} unknown: use cone or parallel")
        shape = view.get("det_shape")
        if (not isinstance(shape, list) or len(shape) != 2
                or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)):
            raise RgsInputError(f"{where}: 'det_shape' must be [rows, columns], positive integers")
        kind = view.get("values", "line_integral")
        if kind not in VALUE_KINDS:
            raise RgsInputError(f"{where}: values kind {kind!r} unknown: use line_integral or intensity")
        i0 = _number(view, "i0", where)
        if kind == "intensity" and (i0 is None or i0 <= 0):
            raise RgsInputError(f"{where}: intensity views need 'i0' > 0 (the unattenuated intensity)")
        scale, offset = _number(view, "scale", where, 1.0), _number(view, "offset", where, 0.0)
        raw = read_image(root / view["file"])
        if tuple(raw.shape) != tuple(shape):
            raise RgsInputError(f"{root / view['file']}: image is {raw.shape[0]}x{raw.shape[1]} but "
                                f"det_shape says {shape[0]}x{shape[1]}: fix {GEOMETRY_FILE} or the image")
        if not np.all(np.isfinite(raw)):
            raise RgsInputError(f"{root / view['file']}: image contains NaN or Inf: clean it")
        images.append(to_line_integrals(offset + scale * raw, kind, i0))
        vectors.append(vec)
        files.append(view["file"])
        shapes.add(tuple(shape))
        modes.add(mode)
    if len(shapes) > 1:
        raise RgsInputError(f"{source}: views have different det_shape {sorted(shapes)}: "
                            "all views must share one detector size (crop or pad them)")
    if len(modes) > 1:
        raise RgsInputError(f"{source}: views mix cone and parallel modes: use one mode for all views")
    truth = meta.get("ground_truth_ct_to_xray")
    if truth is not None:
        truth = rigid.check_rigid(truth, f"{source}: ground_truth_ct_to_xray")
    geometry = Geometry(torch.tensor(vectors, dtype=torch.float64), shapes.pop(), modes.pop())
    return XRaySet(torch.from_numpy(np.stack(images)).to(torch.float32), geometry, files, truth)


def _file_names(xset: XRaySet, ext: str) -> list[str]:
    n = xset.geometry.num_views
    stems = [Path(f).stem for f in xset.files] if len(xset.files) == n else []
    ok = (len(set(stems)) == n and all(s and s == Path(s).name and not s.startswith(".")
                                       and Path(s).stem == s for s in stems))
    return [f"{s}.{ext}" for s in stems] if ok else [f"view_{k:03d}.{ext}" for k in range(n)]


def _quantise(img: np.ndarray) -> tuple[np.ndarray, float, float]:
    """``(stored uint16, scale, offset)`` with ``stored = round((img - offset) / scale)``,
    ``offset`` = the smallest value and ``scale`` = the range / 65535 (1 when flat)."""
    lo, hi = float(img.min()), float(img.max())
    scale = (hi - lo) / PNG_MAX if hi > lo else 1.0
    return np.clip(np.round((img - lo) / scale), 0, PNG_MAX).astype(np.uint16), scale, lo


def _isocentre(geo: Geometry, attributes: dict | None) -> np.ndarray:
    """``attributes["isocentre_mm"]``, else the point nearest (least squares) to every
    view's central ray (source -> detector centre)."""
    given = (attributes or {}).get("isocentre_mm")
    if given is not None:
        return np.asarray(given, dtype=np.float64).reshape(3)
    src, det = geo.vectors[:, 0:3].numpy(), geo.vectors[:, 3:6].numpy()
    beam = (det - src) / np.linalg.norm(det - src, axis=1, keepdims=True)
    proj = np.eye(3)[None] - beam[:, :, None] * beam[:, None, :]  # (V, 3, 3) off-ray parts
    a, b = proj.sum(0), np.einsum("vij,vj->i", proj, src)
    if geo.mode != "cone" or np.linalg.cond(a) > 1e8:
        raise RgsInputError("DICOM views need an isocentre: give two or more cone views with crossing "
                            "central rays, or attributes['isocentre_mm']")
    return np.linalg.solve(a, b)


def save_xrays(folder: str | os.PathLike, xset: XRaySet, force: bool = False,
               image_format: str = "npy", attributes: dict | None = None) -> Path:
    """Write ``xset`` as an X-ray folder; returns the geometry.json path (the folder for
    ``dcm``, which has none).

    ``npy``: float32 line integrals. ``png``: 16-bit, stored ``s = round((p - offset) /
    scale)`` with ``offset`` = the view's smallest line integral and ``scale`` = its range /
    65535, so values come back to within ``scale / 2``. ``dcm``: DX files of the same
    16-bit values (:func:`rgs_engine.io.dicom.write_view`) whose tags hold the geometry
    about the isocentre (``attributes["isocentre_mm"]``, else where the central rays cross)
    and the ground truth; no geometry.json. File names follow ``xset.files`` (extension
    replaced), else ``view_000`` .... Images are written first and geometry.json last, each
    atomically; existing files are kept unless ``force`` (checked before writing).
    ``attributes`` (JSON-able) are stored under ``"attributes"`` (not in DICOM files).
    """
    if image_format not in IMAGE_FORMATS:
        raise RgsInputError(f"image format {image_format!r} unknown: use npy, png or dcm")
    geo = xset.geometry
    images = xset.images.detach().to("cpu", torch.float64)
    if tuple(images.shape) != (geo.num_views, *geo.det_shape):
        raise RgsInputError(f"images have shape {tuple(images.shape)}, geometry needs "
                            f"{(geo.num_views, *geo.det_shape)}")
    if not bool(torch.isfinite(images).all()):
        raise RgsInputError("images contain NaN or Inf: clean them before saving")
    truth = None if xset.ground_truth is None else rigid.check_rigid(xset.ground_truth, "ground truth")
    root = Path(folder)
    if root.exists() and not root.is_dir():
        raise RgsInputError(f"{root} exists and is not a folder: pick another output folder")
    names = _file_names(xset, image_format)
    if image_format == "dcm":
        iso = _isocentre(geo, attributes)
        # a geometry.json left from an earlier folder would be read instead of the tags
        check_writable([root / GEOMETRY_FILE] + [root / n for n in names], force)
        (root / GEOMETRY_FILE).unlink(missing_ok=True)
        for k, name in enumerate(names):
            dicom.write_view(root / name, *_quantise(images[k].numpy()), geo.vectors[k].numpy(), iso,
                             truth, force)
        return root
    check_writable([root / GEOMETRY_FILE] + [root / n for n in names], force)
    views = []
    for k, name in enumerate(names):
        img = images[k].numpy()
        entry = {"file": name, "vectors": geo.vectors[k].tolist(), "mode": geo.mode,
                 "det_shape": list(geo.det_shape), "values": "line_integral"}
        if image_format == "npy":
            import io

            buf = io.BytesIO()
            np.save(buf, img.astype(np.float32))
            write_bytes(root / name, buf.getvalue(), force)
        else:
            stored, scale, lo = _quantise(img)
            write_bytes(root / name, encode_png_gray(stored), force)
            entry.update(scale=scale, offset=lo)
        views.append(entry)
    meta = {"format": FORMAT, "version": VERSION, "views": views}
    if truth is not None:
        meta["ground_truth_ct_to_xray"] = truth.tolist()
    if attributes:
        meta["attributes"] = attributes
    return save_json(root / GEOMETRY_FILE, meta, force)
