"""Process-wide compute runtime: picks the device and initialises Taichi once, lazily.

The device comes from (first match): the ``device`` argument of :func:`init`, the
``RGS_DEVICE`` environment variable, else ``auto``. ``auto`` selects CUDA when both torch
and Taichi can use a GPU, else the CPU. Asking for ``cuda`` where there is none raises
:class:`~rgs_engine.core.errors.RgsDeviceError`; there is no silent fallback.

Taichi is never initialised at import time. Every kernel wrapper calls :func:`ensure`,
which initialises Taichi on first use with the resolved device; a later request for a
different device raises instead of re-initialising (``ti.init`` twice resets all state).
Taichi's offline cache is on (its default, stated here): compiled kernels are kept under
``~/.cache/taichi/ticache`` (``TI_OFFLINE_CACHE_FILE_PATH`` moves it), so a later process on
the same machine skips the LLVM compilation; Taichi still rebuilds each kernel's IR from
Python in every process (the cache key). Measured on a loaded 2-core CPU (1 thread, the README's
64-grid case): the first ``rgs recon`` step 2.8 s with an empty cache, 1.6 s with a filled
one (later steps 0.6 s); the initialisation 2.3 s against 2.0 s.
"""
from __future__ import annotations

import contextlib
import io
import os
import platform

import torch

from .errors import RgsDeviceError, RgsInputError

_VALID = ("auto", "cuda", "cpu")
_state: dict = {"device": None}


def _resolve(device: str | None) -> str:
    choice = (device or os.environ.get("RGS_DEVICE") or "auto").strip().lower()
    if choice not in _VALID:
        raise RgsInputError(f"unknown device {choice!r}: use one of auto, cuda, cpu")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise RgsDeviceError(
            "device 'cuda' was requested but torch sees no CUDA GPU: use --device cpu "
            "(or RGS_DEVICE=cpu), or install a CUDA build of torch"
        )
    return choice


def init(device: str | None = None) -> torch.device:
    """Initialise the runtime (idempotent) and return the torch device kernels use."""
    import taichi as ti

    want = _resolve(device)
    have = _state["device"]
    if have is not None:
        if device is not None and device != "auto" and want != have.type:
            raise RgsDeviceError(
                f"rgs is already running on {have.type} in this process; it cannot switch to "
                f"{want}: start a new process with --device {want}"
            )
        return have
    from ..kernels import source_info

    source_info.install()  # cheaper source positions at each kernel's first call
    quiet = contextlib.redirect_stdout(io.StringIO())  # ti.init prints "[Taichi] Starting on ..."
    if want == "cuda":
        try:
            with quiet:
                ti.init(arch=ti.cuda, enable_fallback=False, device_memory_GB=0.5,
                        offline_cache=True, log_level=ti.WARN, default_fp=ti.f32, default_ip=ti.i32)
        except Exception as exc:  # Taichi raises RuntimeError with its own text
            raise RgsDeviceError(
                f"Taichi could not start on CUDA ({exc}); use --device cpu"
            ) from exc
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        with quiet:
            ti.init(arch=ti.cpu, offline_cache=True, log_level=ti.WARN, default_fp=ti.f32,
                    default_ip=ti.i32)
        dev = torch.device("cpu")
    _state["device"] = dev
    return dev


def ensure() -> torch.device:
    """Return the runtime device, initialising with the default choice on first use."""
    return _state["device"] if _state["device"] is not None else init()


def is_initialised() -> bool:
    return _state["device"] is not None


def sync() -> None:
    """Wait for all queued GPU work (torch and Taichi share the default stream)."""
    if _state["device"] is not None and _state["device"].type == "cuda":
        torch.cuda.synchronize()


def describe(dev: torch.device) -> str:
    """Human-readable device name: the GPU's name, or the CPU model and thread count."""
    if dev.type == "cuda":
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"cpu ({model}, {torch.get_num_threads()} threads)"


def device_name(description: str) -> str:
    """The device's name from a :func:`describe` text (the part in brackets: ``NVIDIA H100 80GB
    HBM3``, ``AMD EPYC, 2 threads``); the text itself where it has no brackets."""
    start, end = description.find("("), description.rfind(")")
    return description[start + 1:end] if 0 <= start < end else description


def versions() -> dict[str, str]:
    """Versions of rgs, Python, torch (with its CUDA) and Taichi."""
    import taichi as ti

    from .. import __version__

    return {"rgs": __version__, "python": platform.python_version(),
            "torch": f"{torch.__version__} (CUDA {torch.version.cuda or 'none'})",
            "taichi": ".".join(map(str, ti.__version__))}

