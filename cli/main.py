"""The ``rgs`` command line.

Commands: ``info`` (versions and compute device), ``roundtrip`` (the engine's end-to-end
check on a real CT), ``simulate`` / ``recon`` (sparse-view CT), ``simulate-xrays`` /
``register`` (CT-to-X-ray registration), ``simulate4d`` / ``simulate-dsa`` / ``track4d`` (4D),
``batch`` (a manifest of such jobs on Ray). Each lives in its own module. Every job command
takes ``--device auto|cuda|cpu`` (default: ``$RGS_DEVICE``, else ``auto``). Bad input ends
with one line ``error: ...`` on stderr and exit status 2; outputs are written atomically and
existing ones are kept unless ``--force``.
"""
from __future__ import annotations

import torch
from rich.table import Table

from rgs_engine.core import runtime

from . import roundtrip  # noqa: F401  (registers the command)
from . import simulate  # noqa: F401
from . import recon  # noqa: F401
from . import simulate_xrays  # noqa: F401
from . import register  # noqa: F401
from . import simulate_dsa  # noqa: F401
from . import simulate4d  # noqa: F401
from . import track4d  # noqa: F401
from . import batch  # noqa: F401
from .common import DeviceOption, app, handle_errors, out_console, start

__all__ = ["app"]


# --------------------------------------------------------------------------------------
# rgs info
# --------------------------------------------------------------------------------------
@app.command()
@handle_errors
def info(device: DeviceOption = None) -> None:
    """Versions (rgs, Python, torch, Taichi), the compute device rgs would use, the GPUs."""
    dev = start(device)
    table = Table(show_header=False, box=None)
    for name, version in runtime.versions().items():
        table.add_row(name, version)
    table.add_row("device", runtime.describe(dev))
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    table.add_row("GPUs", ", ".join(gpus) or "none visible to torch")
    out_console.print(table)
