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

Image files: ``.npy`` (any real dtype), 8/16-bit grayscale non-interlaced ``.png`` (own
zlib decoder, filters 0-4), uncompressed baseline 8/16-bit (or 32-bit float) grayscale
``.tif``/``.tiff`` (own reader), ``.dcm`` through pydicom when it is installed.
"""
from __future__ import annotations

import math
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..core import rigid
from ..core.errors import RgsInputError
from ..core.geometry import MODES, Geometry
from .images import _chunk
from .files import check_writable, load_json, save_json, write_bytes

FORMAT = "rgs-xrays"
VERSION = 1
GEOMETRY_FILE = "geometry.json"
VALUE_KINDS = ("line_integral", "intensity")
IMAGE_FORMATS = ("npy", "png")
MIN_FRACTION = 1e-6  # intensities are clamped to at least MIN_FRACTION x i0 before the log
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_MAX = 65535


@dataclass
class XRaySet:
    """Radiographs as line integrals ``images`` (V, H, W) float32, their ``geometry`` (X-ray
    frame), the file name of each view and the optional true CT-to-X-ray pose (4x4)."""

    images: torch.Tensor
    geometry: Geometry
    files: list[str] = field(default_factory=list)
    ground_truth: np.ndarray | None = None


# --------------------------------------------------------------------------------------
# PNG (8/16-bit grayscale)
# --------------------------------------------------------------------------------------
def _paeth(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    a, b, c = (x.astype(np.int32) for x in (a, b, c))
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def encode_png_gray(image: np.ndarray, filter_type: int = 4) -> bytes:
    """PNG bytes of a uint8 or uint16 (H, W) grayscale image; every row uses ``filter_type``
    (0 none, 1 sub, 2 up, 3 average, 4 Paeth). Extends :func:`rgs_engine.io.images.encode_png`
    (8-bit, filter 0) to 16 bits and the PNG filters."""
    img = np.asarray(image)
    if img.ndim != 2 or img.dtype not in (np.uint8, np.uint16) or min(img.shape) < 1:
        raise RgsInputError(f"PNG images must be non-empty uint8 or uint16 (H, W), got {img.dtype} {img.shape}")
    if filter_type not in range(5):
        raise RgsInputError(f"PNG filter type {filter_type} unknown: use 0..4")
    h, w = img.shape
    depth = 8 * img.dtype.itemsize
    bpp = img.dtype.itemsize
    raw = np.frombuffer(img.astype(img.dtype.newbyteorder(">")).tobytes(), np.uint8).reshape(h, w * bpp)
    a = np.zeros_like(raw)
    a[:, bpp:] = raw[:, :-bpp]
    b = np.zeros_like(raw)
    b[1:] = raw[:-1]
    c = np.zeros_like(raw)
    c[1:, bpp:] = raw[:-1, :-bpp]
    pred = [np.zeros_like(raw, dtype=np.int32), a.astype(np.int32), b.astype(np.int32),
            (a.astype(np.int32) + b) // 2, _paeth(a, b, c)][filter_type]
    filtered = ((raw.astype(np.int32) - pred) % 256).astype(np.uint8)
    rows = np.concatenate([np.full((h, 1), filter_type, np.uint8), filtered], axis=1)
    return b"".join([PNG_SIGNATURE, _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, 0, 0, 0, 0)),
                     _chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)), _chunk(b"IEND", b"")])


def decode_png(data: bytes, name: str = "PNG") -> np.ndarray:
    """(H, W) uint8 or uint16 array of an 8/16-bit grayscale non-interlaced PNG."""
    if data[:8] != PNG_SIGNATURE:
        raise RgsInputError(f"{name}: not a PNG file (bad signature): pass a PNG, .npy, .tif or .dcm image")
    pos, idat, header = 8, [], None
    while pos < len(data):
        if pos + 12 > len(data):
            raise RgsInputError(f"{name}: truncated PNG chunk: re-export the image")
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if len(body) < length:
            raise RgsInputError(f"{name}: truncated PNG chunk {kind!r}: re-export the image")
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body[:13])
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    if header is None or not idat:
        raise RgsInputError(f"{name}: PNG lacks its IHDR or IDAT chunk: re-export the image")
    w, h, depth, colour, comp, filt, interlace = header
    if colour != 0 or depth not in (8, 16) or interlace != 0 or comp != 0 or filt != 0:
        raise RgsInputError(f"{name}: PNG is colour type {colour}, {depth}-bit, interlace {interlace}: "
                            "only 8/16-bit grayscale non-interlaced PNGs are read; convert it")
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error as exc:
        raise RgsInputError(f"{name}: damaged PNG data ({exc}): re-export the image") from exc
    bpp = depth // 8
    stride = w * bpp
    if len(raw) < h * (stride + 1):
        raise RgsInputError(f"{name}: PNG data too short for {w}x{h} pixels: re-export the image")
    rows = np.frombuffer(raw, np.uint8)[: h * (stride + 1)].reshape(h, stride + 1)
    out = np.zeros((h, stride), np.uint8)
    prev = np.zeros(stride, np.uint8)
    for r in range(h):
        ft, line = int(rows[r, 0]), rows[r, 1:]
        if ft == 0:
            cur = line.copy()
        elif ft == 1:
            cur = (line.reshape(-1, bpp).astype(np.int64).cumsum(0) % 256).astype(np.uint8).reshape(-1)
        elif ft == 2:
            cur = line + prev  # uint8 wraps modulo 256
        elif ft in (3, 4):
            ln, up, cur_l = line.tolist(), prev.tolist(), [0] * stride
            for i in range(stride):
                a = cur_l[i - bpp] if i >= bpp else 0
                b = up[i]
                if ft == 3:
                    pred = (a + b) >> 1
                else:
                    c = up[i - bpp] if i >= bpp else 0
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pred = a if (pa <= pb and pa <= pc) else (b if pb <= pc else c)
                cur_l[i] = (ln[i] + pred) & 255
            cur = np.asarray(cur_l, np.uint8)
        else:
            raise RgsInputError(f"{name}: PNG row {r} has unknown filter type {ft}: the file is damaged")
        out[r] = cur
        prev = cur
    if depth == 8:
        return out
    return np.frombuffer(out.tobytes(), ">u2").reshape(h, w).astype(np.uint16)


# --------------------------------------------------------------------------------------
# TIFF (uncompressed baseline grayscale)
# --------------------------------------------------------------------------------------
_TIFF_TYPES = {1: ("B", 1), 3: ("H", 2), 4: ("I", 4)}


def read_tiff(data: bytes, name: str = "TIFF") -> np.ndarray:
    """(H, W) array of the first image of an uncompressed baseline grayscale TIFF:
    8/16-bit unsigned (or 32-bit float) samples, one sample per pixel, strips."""
    if data[:2] not in (b"II", b"MM") or len(data) < 8:
        raise RgsInputError(f"{name}: not a TIFF file (bad byte-order mark): pass a .tif, .png, .npy or .dcm image")
    bo = "<" if data[:2] == b"II" else ">"
    magic, ifd = struct.unpack(bo + "HI", data[2:8])
    if magic != 42:
        raise RgsInputError(f"{name}: not a classic TIFF (magic {magic}; BigTIFF is not read): convert it")
    try:
        (count,) = struct.unpack(bo + "H", data[ifd:ifd + 2])
        tags: dict[int, list[int]] = {}
        for k in range(count):
            off = ifd + 2 + 12 * k
            tag, typ, n = struct.unpack(bo + "HHI", data[off:off + 8])
            if typ not in _TIFF_TYPES:
                continue
            code, size = _TIFF_TYPES[typ]
            where = off + 8 if n * size <= 4 else struct.unpack(bo + "I", data[off + 8:off + 12])[0]
            tags[tag] = list(struct.unpack(bo + code * n, data[where:where + n * size]))
    except struct.error:
        raise RgsInputError(f"{name}: truncated TIFF directory: re-export the image") from None

    def one(tag: int, default: int | None = None) -> int:
        if tag not in tags:
            if default is None:
                raise RgsInputError(f"{name}: TIFF lacks tag {tag}: re-export as baseline TIFF")
            return default
        return int(tags[tag][0])

    w, h, bits = one(256), one(257), one(258, 1)
    compression, spp, fmt = one(259, 1), one(277, 1), one(339, 1)
    photometric = one(262, 1)
    if compression != 1:
        raise RgsInputError(f"{name}: TIFF compression {compression}: only uncompressed TIFFs are read; "
                            "re-export uncompressed or as .png/.npy")
    if spp != 1 or photometric not in (0, 1):
        raise RgsInputError(f"{name}: TIFF has {spp} samples per pixel (photometric {photometric}): "
                            "only grayscale images are read; convert it")
    kinds = {(8, 1): "u1", (16, 1): "u2", (32, 3): "f4"}
    if (bits, fmt) not in kinds:
        raise RgsInputError(f"{name}: TIFF with {bits}-bit samples of format {fmt}: "
                            "only 8/16-bit unsigned or 32-bit float are read; convert it")
    dtype = np.dtype(bo + kinds[(bits, fmt)])
    offsets = tags.get(273)
    counts = tags.get(279) or ([h * w * dtype.itemsize] if offsets and len(offsets) == 1 else None)
    if not offsets or not counts or len(offsets) != len(counts):
        raise RgsInputError(f"{name}: TIFF strip offsets/byte counts missing: re-export as baseline TIFF")
    buf = b"".join(data[o:o + c] for o, c in zip(offsets, counts))
    need = h * w * dtype.itemsize
    if len(buf) < need:
        raise RgsInputError(f"{name}: TIFF pixel data too short for {w}x{h}: the file is truncated")
    img = np.frombuffer(buf[:need], dtype).reshape(h, w).astype(dtype.newbyteorder("="))
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
    elif ext in (".dcm", ".dicom"):
        try:
            import pydicom
        except ImportError:
            raise RgsInputError(f"{p}: reading DICOM needs pydicom: pip install pydicom, "
                                "or convert the image to .npy, .png or .tif") from None
        try:
            ds = pydicom.dcmread(str(p))
            arr = np.asarray(ds.pixel_array, dtype=np.float64)
            arr = arr * float(getattr(ds, "RescaleSlope", 1) or 1) + float(getattr(ds, "RescaleIntercept", 0) or 0)
        except Exception as exc:
            raise RgsInputError(f"{p}: not a readable DICOM image ({type(exc).__name__}: {exc}): "
                                "re-export it or convert to .npy") from exc
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


def load_xrays(folder: str | os.PathLike) -> XRaySet:
    """Read an X-ray folder (``geometry.json`` + one image per view) into an :class:`XRaySet`."""
    root = Path(folder)
    if not root.is_dir():
        raise RgsInputError(f"{root}: no such X-ray folder: check the path")
    gpath = root / GEOMETRY_FILE
    if not gpath.is_file():
        raise RgsInputError(f"{gpath}: missing: an X-ray folder needs {GEOMETRY_FILE} (datasets/FORMAT.md)")
    meta = load_json(gpath)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise RgsInputError(f"{gpath}: 'format' must be {FORMAT!r}: not an rgs X-ray folder")
    if meta.get("version") != VERSION:
        raise RgsInputError(f"{gpath}: version {meta.get('version')!r} not supported: this rgs reads version {VERSION}")
    views = meta.get("views")
    if not isinstance(views, list) or not views:
        raise RgsInputError(f"{gpath}: 'views' must be a non-empty list of views")
    images, vectors, files, shapes, modes = [], [], [], set(), set()
    for k, view in enumerate(views):
        where = f"{gpath} view {k}"
        if not isinstance(view, dict) or not isinstance(view.get("file"), str):
            raise RgsInputError(f"{where}: each view needs a 'file' name")
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
        raise RgsInputError(f"{gpath}: views have different det_shape {sorted(shapes)}: "
                            "all views must share one detector size (crop or pad them)")
    if len(modes) > 1:
        raise RgsInputError(f"{gpath}: views mix cone and parallel modes: use one mode for all views")
    truth = meta.get("ground_truth_ct_to_xray")
    if truth is not None:
        truth = rigid.check_rigid(truth, f"{gpath}: ground_truth_ct_to_xray")
    geometry = Geometry(torch.tensor(vectors, dtype=torch.float64), shapes.pop(), modes.pop())
    return XRaySet(torch.from_numpy(np.stack(images)).to(torch.float32), geometry, files, truth)


def _file_names(xset: XRaySet, ext: str) -> list[str]:
    n = xset.geometry.num_views
    stems = [Path(f).stem for f in xset.files] if len(xset.files) == n else []
    ok = (len(set(stems)) == n and all(s and s == Path(s).name and not s.startswith(".")
                                       and Path(s).stem == s for s in stems))
    return [f"{s}.{ext}" for s in stems] if ok else [f"view_{k:03d}.{ext}" for k in range(n)]


def save_xrays(folder: str | os.PathLike, xset: XRaySet, force: bool = False,
               image_format: str = "npy", attributes: dict | None = None) -> Path:
    """Write ``xset`` as an X-ray folder; returns the geometry.json path.

    ``npy``: float32 line integrals. ``png``: 16-bit, stored ``s = round((p - offset) /
    scale)`` with ``offset`` = the view's smallest line integral and ``scale`` = its range /
    65535, so values come back to within ``scale / 2``. File names follow ``xset.files``
    (extension replaced), else ``view_000`` .... Images are written first and geometry.json
    last, each atomically; existing files are kept unless ``force`` (checked before writing).
    ``attributes`` (JSON-able) are stored under ``"attributes"``.
    """
    if image_format not in IMAGE_FORMATS:
        raise RgsInputError(f"image format {image_format!r} unknown: use npy or png")
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
            lo, hi = float(img.min()), float(img.max())
            scale = (hi - lo) / PNG_MAX if hi > lo else 1.0
            stored = np.clip(np.round((img - lo) / scale), 0, PNG_MAX).astype(np.uint16)
            write_bytes(root / name, encode_png_gray(stored), force)
            entry.update(scale=scale, offset=lo)
        views.append(entry)
    meta = {"format": FORMAT, "version": VERSION, "views": views}
    if truth is not None:
        meta["ground_truth_ct_to_xray"] = truth.tolist()
    if attributes:
        meta["attributes"] = attributes
    return save_json(root / GEOMETRY_FILE, meta, force)
