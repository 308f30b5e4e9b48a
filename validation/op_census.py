"""Counts of the host-side operations of a piece of code, by the function they came from.

Issue 19's 0.3 s target is set by the host, not the GPU (``registration_design.md``: 96 ms
of kernels in a 0.41 s registration). :class:`Census` counts, while it is active:

* ``torch``: dispatched torch operators that do work (on a GPU each launches at least one
  kernel); views, detaches and allocations without a fill are counted apart as ``views``;
* ``taichi``: launches of rgs's Taichi kernels (:class:`rgs_engine.kernels.launch.Kernel`);
* ``reads``: reads of a tensor's values on the host (``.item()``, ``float(t)``,
  ``nonzero``, ``.cpu()``). On a GPU, a read of a device tensor waits for the device; on the
  CPU every tensor counts, so the figure is an upper bound of the syncs a GPU would have;
* ``uploads``: copies of a host tensor to the device (``.to(device)``, ``copy_``; a factory
  given host values and a device, ``torch.tensor(..., device=...)``, is not seen). From
  pageable memory each one waits for the device, so on a GPU they are syncs too; on the CPU
  there are none.

Each count goes to the *site*: the outermost function below ``anchor`` (a function name in
``anchor_file``) on the call stack, e.g. the stage of a registration (``climb``,
``final_score``); ``top`` keeps the busiest (operator, source line) pairs per site.
Counting costs time: a census run measures operations, not seconds.
"""
from __future__ import annotations

import collections
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rgs_engine.kernels import launch

# operators that only make or reinterpret a tensor's metadata, or allocate without a fill
NO_WORK = frozenset({
    "detach", "view", "slice", "select", "unsqueeze", "squeeze", "expand", "as_strided", "t",
    "permute", "transpose", "_unsafe_view", "lift_fresh", "alias", "empty", "empty_like",
    "empty_strided", "reshape", "_reshape_alias", "unbind", "split", "split_with_sizes",
    "narrow", "diagonal", "unflatten", "flatten", "real", "imag", "conj"})
READS = frozenset({"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2"})


def _upload(name: str, args: tuple, kwargs: dict) -> bool:
    """Whether an operator copies a host tensor to another device."""
    if name == "_to_copy" and "device" in kwargs and isinstance(args[0], torch.Tensor):
        return args[0].device.type == "cpu" and torch.device(kwargs["device"]).type != "cpu"
    if name == "copy_" and len(args) > 1 and isinstance(args[1], torch.Tensor):
        return args[1].device.type == "cpu" and args[0].device.type != "cpu"
    return False


class Census(TorchDispatchMode):
    """``with Census(anchor_file, anchor, device) as c: ...``; then :meth:`summary` (per
    call of ``anchor`` when ``calls`` is given). ``device``: the runtime device (on a GPU
    only reads of its tensors count)."""

    def __init__(self, anchor_file: str, anchor: str, device: torch.device):
        super().__init__()
        self.anchor_file, self.anchor = anchor_file, anchor
        self.all_reads = torch.device(device).type == "cpu"  # the CPU: every read counts
        self.counts = {k: collections.Counter() for k in ("torch", "views", "taichi", "reads", "uploads")}
        self.top: collections.Counter = collections.Counter()
        self._patched: list = []

    def site(self) -> str:
        """The outermost function below ``anchor`` on the stack (or ``anchor`` / ``other``)."""
        f, below = sys._getframe(2), None
        while f is not None:
            code = f.f_code
            if code.co_filename.endswith(self.anchor_file):
                if code.co_name == self.anchor:
                    return below or self.anchor
                below = code.co_name
            f = f.f_back
        return "other"

    @staticmethod
    def _line() -> str:
        """The innermost source line outside torch."""
        f = sys._getframe(2)
        while f is not None and ("/torch/" in f.f_code.co_filename or f.f_code.co_filename == __file__):
            f = f.f_back
        return "?" if f is None else f"{f.f_code.co_filename.rsplit('/', 1)[-1]}:{f.f_lineno}"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name, kwargs = func.overloadpacket.__name__, kwargs or {}
        site = self.site()
        if name in NO_WORK:
            self.counts["views"][site] += 1
        else:
            self.counts["torch"][site] += 1
            line = self._line()
            self.top[(site, name, line)] += 1
            if _upload(name, args, kwargs):  # a copy does work: its line is known
                self.counts["uploads"][site] += 1
                self.top[(site, "upload", line)] += 1
        if name in READS and (self.all_reads or not isinstance(args[0], torch.Tensor)
                              or args[0].device.type != "cpu"):
            self.counts["reads"][site] += 1
        return func(*args, **kwargs)

    def __enter__(self):
        census = self
        kernel_call, cpu = launch.Kernel.__call__, torch.Tensor.cpu

        def counted_launch(kernel, *args, **kwargs):
            site = census.site()
            census.counts["taichi"][site] += 1
            census.top[(site, f"taichi {kernel.__name__}", "")] += 1
            return kernel_call(kernel, *args, **kwargs)

        def counted_cpu(t, *args, **kwargs):
            if census.all_reads or t.device.type != "cpu":
                census.counts["reads"][census.site()] += 1
            return cpu(t, *args, **kwargs)

        launch.Kernel.__call__, torch.Tensor.cpu = counted_launch, counted_cpu
        self._patched = [(launch.Kernel, "__call__", kernel_call), (torch.Tensor, "cpu", cpu)]
        return super().__enter__()

    def __exit__(self, *exc):
        for owner, attr, original in self._patched:
            setattr(owner, attr, original)
        self._patched = []
        return super().__exit__(*exc)

    def summary(self, calls: int = 1, top: int = 25) -> dict:
        """Per call: the totals, the totals per site, and the ``top`` busiest (site, operator,
        line) rows."""
        per = {k: {s: v / calls for s, v in c.most_common()} for k, c in self.counts.items()}
        return {"calls": calls, "total": {k: sum(c.values()) / calls for k, c in self.counts.items()},
                "by_site": per,
                "top": [{"site": s, "op": o, "line": ln, "count": v / calls} for (s, o, ln), v in self.top.most_common(top)]}


def format_summary(summary: dict, label: str) -> str:
    """A few lines of text of :meth:`Census.summary`."""
    t = summary["total"]
    lines = [f"{label}: per call {t['torch']:.0f} torch ops that do work (+{t['views']:.0f} views), "
             f"{t['taichi']:.0f} Taichi launches, {t['reads']:.0f} host reads, {t['uploads']:.0f} uploads"]
    for kind in ("torch", "taichi", "reads", "uploads"):
        sites = ", ".join(f"{s} {v:.0f}" for s, v in list(summary["by_site"][kind].items())[:10])
        lines.append(f"  {kind} by site: {sites}")
    lines.append("  busiest: " + "; ".join(f"{r['site']}/{r['op']} {r['line']} {r['count']:.0f}"
                                          for r in summary["top"][:12]))
    return "\n".join(lines)
