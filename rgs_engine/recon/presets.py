"""Named points on the Gaussian recipe's time / quality curve: ``rgs recon --preset``.

A preset is a set of :class:`~.gaussian.GSConfig` field overrides; the run's recipe is the
defaults, then the preset's overrides, then what the user gave explicitly (``--iterations``,
``--set KEY=VALUE``), so an explicit option always wins over the preset.

Where the values come from (issue 18's table, measured on an NVIDIA H200: the chest CT of
``datasets/fetch_ct.py`` at 256^3, 25 circular views of 512^2, R2-Gaussian's noise; and
``validation/small_grid.md`` on 2 CPU cores):

* ``fast``: 1000 iterations. H200, 256^3: 32.19 dB / SSIM .854 in 29.7 s against the
  default's 33.63 dB / .899 in 72.7 s (about 1.4 dB for 2.4x less time).
* ``default``: the recipe as it is (3000 iterations; the automatic count, one Gaussian per
  20 voxels, 10k..50k).
* ``best``: 5000 iterations and one Gaussian per 8 voxels. The iterations are an
  extrapolation, **not a measurement**: at 256^3 the curve still rose from 1500 (32.99 dB) to
  3000 iterations (33.63 dB); 5000 has not been run there. The count only changes grids
  below about 100^3 (above, both counts reach the 50k cap; 150k Gaussians gained nothing at
  256^3): on the README's quick-start case (64 grid, 500 iterations, quiet 2 CPU cores) it
  gave 33.76 dB in 327 s against 33.41 dB in 219 s; on ``validation/small_grid.py``'s
  held-out ``crop-c64`` (``--preset best --iterations 500``, loaded 2 CPU cores) 30.12 dB /
  SSIM .835 with 30.9k Gaussians against the default's 30.11 dB / .844 with 12.3k, in 1.46x
  the time: no gain there.

The GPU time / quality curve of the three presets (issue 18's plot of 3D PSNR against
seconds) is still to be measured; the CPU figures at the README's settings are in
``validation/small_grid.md``.
"""
from __future__ import annotations

from typing import Any

from ..core.errors import RgsInputError

DEFAULT = "default"
PRESETS: dict[str, dict[str, Any]] = {
    "fast": {"iterations": 1000},
    DEFAULT: {},
    "best": {"iterations": 5000, "voxels_per_gaussian": 8.0},
}
# one line per preset for the command line's help: what it trades
TRADES = {
    "fast": "1000 iterations: about 2.4x faster than default for about 1.4 dB less (H200, 256^3)",
    DEFAULT: "3000 iterations, one Gaussian per 20 voxels",
    "best": "5000 iterations and one Gaussian per 8 voxels on small grids: slower, for a "
            "higher PSNR (the 5000 iterations not yet measured)",
}


def check(name: str | None) -> str:
    """The preset's name (``None`` -> ``default``); an unknown name raises RgsInputError."""
    name = DEFAULT if name is None else name
    if name not in PRESETS:
        raise RgsInputError(f"--preset {name!r} is not a preset: use one of {', '.join(PRESETS)}")
    return name


def overrides(name: str | None) -> dict[str, Any]:
    """A copy of the GSConfig field overrides of the preset ``name`` (``None``: default)."""
    return dict(PRESETS[check(name)])


def describe() -> str:
    """``name: what it trades`` for every preset, for help texts."""
    return "; ".join(f"{name}: {TRADES[name]}" for name in PRESETS)
