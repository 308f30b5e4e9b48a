"""Scenario pipelines: one function per job (load -> initialise -> iterate -> evaluate ->
write outputs, with resume, checkpoints and ``force``), the Python API behind every ``rgs``
command. Each takes its inputs and options, reports progress through a callback
(:class:`~.common.ProgressEvent`) and returns a :class:`~.common.RunResult`."""
from .common import Interrupted, ProgressEvent, Reporter, RunResult  # noqa: F401
from .breathing import simulate4d, track4d  # noqa: F401
from .angiography import dsa, simulate_dsa  # noqa: F401
from .reconstruct import recon, roundtrip  # noqa: F401
from .registration import register, simulate_xrays  # noqa: F401
from .simulation import simulate  # noqa: F401
