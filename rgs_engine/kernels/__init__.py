"""Taichi kernels. Each op has forward and hand-written backward kernels; see the op modules."""
