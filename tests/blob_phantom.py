"""A small analytic test volume shared by the SART and recon tests."""
import torch

from rgs_engine import VolumeGrid


def blob_phantom(grid: VolumeGrid) -> torch.Tensor:
    """Ellipsoid of 0.02 /mm with a denser ball and a cavity, float32 (CPU)."""
    c = grid.voxel_centres()
    x = 0.02 * ((c[..., 0] / 40) ** 2 + (c[..., 1] / 32) ** 2 + (c[..., 2] / 38) ** 2 <= 1).double()
    x += 0.02 * ((c - torch.tensor([12.0, 6.0, 8.0], dtype=torch.float64)).norm(dim=-1) < 10)
    x -= 0.01 * ((c - torch.tensor([-14.0, -4.0, -6.0], dtype=torch.float64)).norm(dim=-1) < 8)
    return x.float()
