"""Runtime: lazy initialisation, device choice and honest errors (in fresh processes)."""
import os
import subprocess
import sys

import pytest
import torch


def run_py(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full_env, timeout=120)


def test_import_does_not_initialise_taichi():
    res = run_py("import rgs_engine, rgs_engine.core.splatting, taichi as ti\n"
                 "from taichi.lang import impl\n"
                 "assert not rgs_engine.core.runtime.is_initialised()\n"
                 "assert impl.get_runtime().prog is None, 'taichi initialised at import'\n"
                 "print('ok')")
    assert res.returncode == 0, res.stderr
    assert "ok" in res.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_request_without_gpu_is_an_error():
    res = run_py("import rgs_engine\n"
                 "try:\n    rgs_engine.init('cuda')\nexcept rgs_engine.RgsDeviceError as e:\n"
                 "    print('refused:', e)\n")
    assert "refused: device 'cuda' was requested" in res.stdout, res.stdout + res.stderr
    res = run_py("import rgs_engine\ntry:\n    rgs_engine.init()\nexcept rgs_engine.RgsDeviceError:\n"
                 "    print('refused')\n", RGS_DEVICE="cuda")
    assert "refused" in res.stdout


def test_env_and_switch_rules():
    res = run_py("import rgs_engine\nd = rgs_engine.init()\nprint(d.type)\n"
                 "assert rgs_engine.init() == d\n"
                 "other = 'cuda' if d.type == 'cpu' else 'cpu'\n"
                 "try:\n    rgs_engine.init(other)\nexcept rgs_engine.RgsDeviceError as e:\n    print('switch refused')\n",
                 RGS_DEVICE="cpu")
    assert res.stdout.split()[0] == "cpu" and "switch refused" in res.stdout, res.stdout + res.stderr
    res = run_py("import rgs_engine\ntry:\n    rgs_engine.init('tpu')\nexcept rgs_engine.RgsInputError as e:\n    print(e)\n")
    assert "unknown device 'tpu'" in res.stdout


def test_device_name_reads_describes_brackets():
    from rgs_engine.core import runtime

    assert runtime.device_name("cuda:0 (NVIDIA H100 80GB HBM3)") == "NVIDIA H100 80GB HBM3"
    assert runtime.device_name("cpu (AMD EPYC (Zen 4), 2 threads)") == "AMD EPYC (Zen 4), 2 threads"
    assert runtime.device_name(runtime.describe(torch.device("cpu"))).endswith("threads")
    assert runtime.device_name("cpu") == "cpu"
