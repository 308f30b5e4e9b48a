"""The engine's core: geometry, Gaussians, the differentiable splat / voxelise / project
operators over the Taichi kernels, the PyTorch bridge, the runtime (device), metrics, losses,
rigid-body maths and the error types. Everything else in rgs builds on these."""
