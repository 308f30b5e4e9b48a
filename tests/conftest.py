"""One Taichi initialisation for the whole test session (RGS_DEVICE picks cpu/cuda/auto) and the
registration tests' CT case (tests/registration_case.py), shared by their modules."""
import pytest
import torch

import registration_case
from rgs_engine.core import runtime
from rgs_engine.registration import report
from rgs_engine.registration.ct_gaussians import gaussians_for_ct


@pytest.fixture(scope="session")
def device() -> torch.device:
    return runtime.init()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def ct_path(tmp_path_factory):
    return registration_case.write_ct(tmp_path_factory.mktemp("ct"))


@pytest.fixture(scope="session")
def params(ct_path, device):
    return gaussians_for_ct(ct_path, **registration_case.FIT)[0]


@pytest.fixture(scope="session")
def points(ct_path):
    return report.target_points(ct_path)
