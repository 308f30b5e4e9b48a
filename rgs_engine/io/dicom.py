"""DICOM radiographs (DX, CR, XA, RF) as X-ray views, read and written with pydicom.
Format: datasets/FORMAT.md, "X-ray folders" / "DICOM radiographs".

The geometry of a view comes from the standard tags: Distance Source to Detector
(0018,1110) = DSD, Distance Source to Patient (0018,1111) = DSO (source to isocentre),
Imager Pixel Spacing (0018,1164) (row, column pitch in mm; else Detector Active Dimension(s)
(0018,7026) / (Columns, Rows)), Rows / Columns, Positioner Primary / Secondary Angle
(0018,1510) / (0018,1511) (primary else View Position (0018,5101) AP / PA / LL / RL;
secondary 0 when absent) and Patient Orientation (0020,0020). In DICOM's patient frame
(LPS: +x left, +y posterior, +z head) the detector lies from the isocentre along

    b = (cos a2 sin a1, -cos a2 cos a1, sin a2)

(a1 primary: 0 = detector anterior, +90 = detector at the patient's left (LAO); a2
secondary: +90 cranial). The source sits at ``-DSO b``, the detector centre at
``(DSD - DSO) b``; columns step along ``(cos a1, sin a1, 0)`` and rows along
``(sin a2 sin a1, -sin a2 cos a1, -cos a2)`` (a PA view reads ``L\\F``, as viewed from the
detector side), each reversed when the first letter of the matching Patient Orientation
value says so. Vectors are then turned into the world frame (RAS+: x and y negated) with
the isocentre at the origin, or at the rgs private isocentre (below).

Pixel values: the modality LUT / rescale (0028,1052-1053) is applied; Pixel Intensity
Relationship (0028,1040) LOG means line integrals (``-value`` when its sign (0028,1041) is
+1: larger values, more light); LIN means intensities, which need the unattenuated
intensity ``i0`` that no standard tag holds (give ``values`` and ``i0`` in ``geometry.json``).

rgs writes DX files (:func:`write_view`): 16-bit MONOCHROME2 pixels with a rescale, LOG
with sign -1, and in a private block (group 0009, creator ``rgs``) the exact isocentre (mm,
world frame) and the ground-truth CT-to-X-ray pose, both float64.
"""
from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.pixels import apply_modality_lut
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from ..core.errors import RgsInputError
from .files import write_bytes

DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
PRIVATE_GROUP, PRIVATE_CREATOR = 0x0009, "rgs"
ISOCENTRE_ELEMENT, TRUTH_ELEMENT = 0x01, 0x02
VIEW_POSITIONS = {"PA": 0.0, "AP": 180.0, "LL": 90.0, "RL": -90.0}  # primary angle, deg
LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])
PATIENT_LETTERS = {"L": (0, 1.0), "R": (0, -1.0), "P": (1, 1.0), "A": (1, -1.0), "H": (2, 1.0), "F": (2, -1.0)}
TOLERANCE = 1e-6  # relative: a view farther than this from an isocentric C-arm view is refused


def read(path: str | os.PathLike, pixels: bool = True) -> pydicom.Dataset:
    """The DICOM dataset of ``path`` (without its pixel data unless ``pixels``)."""
    p = Path(path)
    try:
        return pydicom.dcmread(str(p), stop_before_pixels=not pixels)
    except Exception as exc:
        raise RgsInputError(f"{p}: not a readable DICOM image ({type(exc).__name__}: {exc}): "
                            "re-export it or convert to .npy") from exc


def pixel_values(path: str | os.PathLike) -> np.ndarray:
    """The stored pixels of ``path`` through the modality LUT / rescale, float64, (H, W) or
    (frames, H, W)."""
    ds = read(path)
    try:
        return np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float64)
    except Exception as exc:
        raise RgsInputError(f"{path}: DICOM pixel data unreadable ({type(exc).__name__}: {exc}): "
                            "re-export it or convert to .npy") from exc


def _needed(ds: pydicom.Dataset, keyword: str, tag: str, key: str, where: str) -> float | list:
    value = ds.get(keyword)
    if value is None or value == "":
        raise RgsInputError(f"{where}: DICOM lacks {keyword} {tag}: add the tag, or give "
                            f"'{key}' for this view in geometry.json")
    return value


def _private(ds: pydicom.Dataset, element: int, size: int) -> np.ndarray | None:
    try:
        block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
        value = np.asarray(block[element].value, dtype=np.float64).reshape(-1)
    except KeyError:
        return None
    return value if value.size == size else None


def _beam_axes(a1: float, a2: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit vectors (LPS) isocentre -> detector, column step and row step at the primary /
    secondary angles ``a1`` / ``a2`` (radians)."""
    s1, c1, s2, c2 = math.sin(a1), math.cos(a1), math.sin(a2), math.cos(a2)
    return (np.array([c2 * s1, -c2 * c1, s2]), np.array([c1, s1, 0.0]), np.array([s2 * s1, -s2 * c1, -c2]))


def _letter_sign(value: str, axis: np.ndarray) -> float:
    """-1 when the first patient-direction letter of ``value`` points against ``axis``."""
    hit = PATIENT_LETTERS.get(value.strip()[:1].upper())
    return -1.0 if hit is not None and hit[1] * axis[hit[0]] < 0 else 1.0


def view_geometry(path: str | os.PathLike) -> dict:
    """``{"vectors": [12 numbers], "det_shape": [rows, columns], "mode": "cone"}`` of a
    DICOM radiograph from its tags (world frame, mm; see the module)."""
    where = str(path)
    ds = read(path, pixels=False)
    rows = int(_needed(ds, "Rows", "(0028,0010)", "det_shape", where))
    cols = int(_needed(ds, "Columns", "(0028,0011)", "det_shape", where))
    dsd = float(_needed(ds, "DistanceSourceToDetector", "(0018,1110)", "vectors", where))
    dso = float(_needed(ds, "DistanceSourceToPatient", "(0018,1111)", "vectors", where))
    if ds.get("ImagerPixelSpacing") is None and ds.get("DetectorActiveDimensions") is not None:
        width, height = (float(x) for x in ds.DetectorActiveDimensions)
        pitch = (height / rows, width / cols)
    else:
        pitch = tuple(float(x) for x in _needed(ds, "ImagerPixelSpacing", "(0018,1164)", "vectors", where))
    primary = ds.get("PositionerPrimaryAngle")
    if primary is None:
        position = str(ds.get("ViewPosition", "")).strip().upper()
        if position not in VIEW_POSITIONS:
            _needed(ds, "PositionerPrimaryAngle", "(0018,1510)", "vectors", where)
        primary = VIEW_POSITIONS[position]
    secondary = float(ds.get("PositionerSecondaryAngle") or 0.0)
    if not (0 < dso < dsd and len(pitch) == 2 and min(pitch) > 0 and math.isfinite(dsd)):
        raise RgsInputError(f"{where}: DICOM distances DSO {dso:g} / DSD {dsd:g} mm or pixel spacing {pitch} "
                            "impossible: need 0 < DSO < DSD and a positive spacing, or give 'vectors'")
    beam, col, row = _beam_axes(math.radians(float(primary)), math.radians(secondary))
    orientation = list(ds.get("PatientOrientation") or [])
    if len(orientation) == 2:
        col, row = col * _letter_sign(orientation[0], col), row * _letter_sign(orientation[1], row)
    iso = _private(ds, ISOCENTRE_ELEMENT, 3)
    iso = np.zeros(3) if iso is None else iso
    src, det = iso + LPS_TO_RAS * (-dso * beam), iso + LPS_TO_RAS * ((dsd - dso) * beam)
    vectors = np.concatenate([src, det, LPS_TO_RAS * col * pitch[1], LPS_TO_RAS * row * pitch[0]])
    return {"vectors": vectors.tolist(), "det_shape": [rows, cols], "mode": "cone"}


def view_values(path: str | os.PathLike) -> dict:
    """``values`` / ``scale`` / ``offset`` of a view entry from the Pixel Intensity
    Relationship (0028,1040) and its sign (0028,1041): LOG only (see the module)."""
    where = str(path)
    ds = read(path, pixels=False)
    relation = str(_needed(ds, "PixelIntensityRelationship", "(0028,1040)", "values", where)).strip().upper()
    sign = int(ds.get("PixelIntensityRelationshipSign") or 1)
    if relation == "LOG":
        return {"values": "line_integral", "scale": float(-sign), "offset": 0.0}
    if relation == "LIN":
        raise RgsInputError(f"{where}: LIN pixels are intensities and no DICOM tag holds the unattenuated "
                            "intensity: give 'values': 'intensity' and 'i0' for this view in geometry.json")
    raise RgsInputError(f"{where}: Pixel Intensity Relationship (0028,1040) {relation} is not read: "
                        "give 'values', 'scale' and 'offset' for this view in geometry.json")


def ground_truth(path: str | os.PathLike) -> np.ndarray | None:
    """The rgs private ground-truth CT-to-X-ray pose (4x4) of a file, or None."""
    truth = _private(read(path, pixels=False), TRUTH_ELEMENT, 16)
    return None if truth is None else truth.reshape(4, 4)


def _letters(axis: np.ndarray) -> str:
    """Patient-direction letters of an LPS direction, strongest first (e.g. ``LP``)."""
    names = ("RL", "AP", "FH")
    order = np.argsort(-np.abs(axis))
    return "".join(names[k][int(axis[k] > 0)] for k in order if abs(axis[k]) > TOLERANCE)


def _ds(value: float) -> str:
    """A number as a DICOM decimal string (at most 16 characters)."""
    return pydicom.valuerep.format_number_as_ds(float(value))


def write_view(path: str | os.PathLike, stored: np.ndarray, scale: float, offset: float, vectors,
               isocentre, truth=None, force: bool = False) -> Path:
    """Write one view as a DX file: ``stored`` (H, W) uint16 pixels meaning the line
    integrals ``offset + scale * stored`` (RescaleIntercept / RescaleSlope, written with
    DICOM's 16 characters), ``vectors`` (12,) in the world frame (mm) of an isocentric
    cone-beam view about ``isocentre`` (3,) mm with its detector perpendicular to the
    central ray and centred on it; ``truth`` the optional 4x4 CT-to-X-ray pose. Atomic,
    no-clobber unless ``force``."""
    vec = np.asarray(vectors, dtype=np.float64).reshape(12)
    iso = np.asarray(isocentre, dtype=np.float64).reshape(3)
    src, det, u, v = (LPS_TO_RAS * x for x in (vec[0:3] - iso, vec[3:6] - iso, vec[6:9], vec[9:12]))
    dsd = float(np.linalg.norm(det - src))
    beam = (det - src) / dsd
    dso = float(np.linalg.norm(src))
    a2 = math.asin(max(-1.0, min(1.0, float(beam[2]))))
    a1 = math.atan2(float(beam[0]), float(-beam[1]))
    want_beam, col, row = _beam_axes(a1, a2)
    pitch = (float(np.linalg.norm(v)), float(np.linalg.norm(u)))
    if (np.linalg.norm(np.cross(-src, beam)) > TOLERANCE * dsd or np.linalg.norm(want_beam - beam) > TOLERANCE
            or abs(abs(u @ col) - pitch[1]) > TOLERANCE * pitch[1] or abs(abs(v @ row) - pitch[0]) > TOLERANCE * pitch[0]
            or not 0 < dso < dsd):
        raise RgsInputError(f"{path}: the view is not an isocentric C-arm view about {iso.tolist()} with a centred, "
                            "perpendicular, upright detector: DICOM cannot hold it; use --format npy or png")
    stored = np.asarray(stored)
    if stored.dtype != np.uint16 or stored.ndim != 2:
        raise RgsInputError(f"DICOM pixels must be uint16 (H, W), got {stored.dtype} {stored.shape}")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = DX_STORAGE, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.ImageType, ds.PresentationIntentType = "DX", ["DERIVED", "SECONDARY"], "FOR PRESENTATION"
    ds.PatientName, ds.PatientID = "rgs^simulated", "rgs"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = _ds(scale), _ds(offset), "US"
    ds.PixelIntensityRelationship, ds.PixelIntensityRelationshipSign = "LOG", -1
    ds.DistanceSourceToDetector, ds.DistanceSourceToPatient = _ds(dsd), _ds(dso)
    ds.ImagerPixelSpacing = [_ds(pitch[0]), _ds(pitch[1])]
    ds.PositionerPrimaryAngle, ds.PositionerSecondaryAngle = _ds(math.degrees(a1)), _ds(math.degrees(a2))
    ds.PatientOrientation = [_letters(u), _letters(v)]
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(ISOCENTRE_ELEMENT, "FD", iso.tolist())
    if truth is not None:
        block.add_new(TRUTH_ELEMENT, "FD", np.asarray(truth, dtype=np.float64).reshape(16).tolist())
    ds.PixelData = stored.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return write_bytes(path, buf.getvalue(), force)
