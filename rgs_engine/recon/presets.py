"""Named points on the Gaussian recipe's time / quality curve: ``rgs recon --preset``.

A preset is a set of :class:`~.gaussian.GSConfig` field overrides; the run's recipe is the
defaults, then the preset's overrides, then what the user gave explicitly (``--iterations``,
``--set KEY=VALUE``), so an explicit option always wins over the preset.

Where the values come from: ``validation/presets.md`` (``python validation/presets.py``: the
chest CT of ``datasets/fetch_ct.py`` at 256^3, 25 circular views of 512^2, R2-Gaussian's noise;
one NVIDIA H200, 2026-12-06, with the shared-memory render kernel and the fused L1 + D-SSIM
kernel). 3D PSNR / SSIM and ``seconds``:

* ``draft``: 500 iterations, 31.77 dB / .862 in 7.6 s;
* ``fast``: 2000 iterations of 4 views (the default: 8), 34.02 dB / .905 in 12.6 s: 0.2 dB
  below the default in about 60 % of the time. Before the fused loss kernel, on an H200 lease
  that morning: 15.2 s (seeds 1 / 2: 34.04 / 33.99 dB in 15.5 / 16.3 s; seconds vary by about
  1 s between runs of one recipe on one lease). Measured on this one case at 25 views only; a
  four-lever combination that includes it lost 0.27 dB to the recipe at 50 views
  (``validation/levers.md``);
* ``default``: the recipe as it is (3000 iterations; the automatic count, one Gaussian per
  20 voxels, 10k..50k), 34.24 dB / .906 in 22.0 s.

On an H100 lease with the same code (``validation/presets_h100/presets.md``): 10.3 / 11.7 /
22.2 s at the same PSNR; machines differ between leases, so these are not measured speed-ups
(the kernels' own A/Bs are in ``validation/results/render_kernel_ab.json`` and
``image_loss_ab.json``).

Longer is not better: 5000 iterations gave 33.70 dB / .897 in 95.1 s with the recipe of that
day (4 densification rounds, where 3000 gave 33.80), so no preset trains longer than the
default. A larger count does not pay at 256^3 either: 100k / 150k Gaussians gave 34.07 /
33.98 dB against the 50k default's 34.17 (``validation/levers.md``; H200 against H100). On
the CPU cases of ``validation/small_grid.py`` one Gaussian per 10 voxels gained 0.75 / 0.80
dB on ``full-c128`` / ``head-c96`` at 500 iterations in 1.46x / 1.35x the time, but at about
equal time (350 iterations) it lost 0.32 / 0.86 dB there.
"""
from __future__ import annotations

from typing import Any

from ..core.errors import RgsInputError

DEFAULT = "default"
PRESETS: dict[str, dict[str, Any]] = {
    "draft": {"iterations": 500},
    "fast": {"iterations": 2000, "views_per_step": 4},
    DEFAULT: {},
}
# one line per preset for the command line's help: what it trades
TRADES = {
    "draft": "500 iterations: 31.8 dB in 8 s against the default's 34.2 dB in 22 s (H200, 256^3, 25 views)",
    "fast": "2000 iterations of 4 views: 34.0 dB in 13 s",
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
