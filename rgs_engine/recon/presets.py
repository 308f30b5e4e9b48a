"""Named points on the Gaussian recipe's time / quality curve: ``rgs recon --preset``.

A preset is a set of :class:`~.gaussian.GSConfig` field overrides; the run's recipe is the
defaults, then the preset's overrides, then what the user gave explicitly (``--iterations``,
``--set KEY=VALUE``), so an explicit option always wins over the preset.

Where the values come from: ``validation/presets.md`` (``python validation/presets.py``: the
chest CT of ``datasets/fetch_ct.py`` at 256^3, 25 circular views of 512^2, R2-Gaussian's noise;
measured on an NVIDIA H100, 2026-12-05, with the FDK start that ``--init auto`` then chose on
circular orbits, and with densification, which the recipe has dropped since; neither change is
re-measured at this size). 3D PSNR / SSIM and ``seconds``:

* ``draft``: 500 iterations, 30.74 dB / .836 in 20.4 s;
* ``fast``: 1000 iterations, 32.70 dB / .882 in 28.7 s;
* ``default``: the recipe as it is (3000 iterations; the automatic count, one Gaussian per
  20 voxels, 10k..50k), 33.80 dB / .902 in 56.2 s.

Longer is not better: 5000 iterations gave 33.70 dB / .897 in 95.1 s (2000: 33.53 / .898 in
42.7 s), so no preset trains longer than the default. A larger count (one Gaussian per 8
voxels) was dropped too: it changes only grids below about 100^3 (above, both reach the 50k
cap; 150k Gaussians gained nothing at 256^3), and there it gained 0.35 dB on the README's
quick-start case (2 CPU cores, 1.5x the time) and 0.01 dB on ``validation/small_grid.py``'s
``crop-c64``. Without densification (the recipe since) the count pays more: one Gaussian per
10 voxels gained 0.75 / 0.80 dB on ``full-c128`` / ``head-c96`` at 500 iterations in 1.46x /
1.35x the time, but at about equal time (350 iterations) it lost 0.32 / 0.86 dB there
(``validation/small_grid.md``); a larger count at 256^3 is to be measured
(``validation/levers.py --levers count-100k,count-150k``).
"""
from __future__ import annotations

from typing import Any

from ..core.errors import RgsInputError

DEFAULT = "default"
PRESETS: dict[str, dict[str, Any]] = {
    "draft": {"iterations": 500},
    "fast": {"iterations": 1000},
    DEFAULT: {},
}
# one line per preset for the command line's help: what it trades
TRADES = {
    "draft": "500 iterations: 30.7 dB in 20 s against the default's 33.8 dB in 56 s (H100, 256^3, 25 views)",
    "fast": "1000 iterations: 32.7 dB in 29 s",
    DEFAULT: "3000 iterations, one Gaussian per 20 voxels",
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
