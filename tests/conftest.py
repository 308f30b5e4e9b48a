"""One Taichi initialisation for the whole test session (RGS_DEVICE picks cpu/cuda/auto)."""
import pytest
import torch

from rgs_engine.core import runtime


@pytest.fixture(scope="session")
def device() -> torch.device:
    return runtime.init()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
