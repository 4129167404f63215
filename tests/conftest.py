import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def megatron_world():
    """A one-process world with Megatron-Core's parallel state, for in-process models."""
    from megatron_transfusion import platform
    from megatron_transfusion.config import ParallelConfig
    from megatron_transfusion.parallel import destroy_distributed, init_distributed

    plat = platform.activate()
    init_distributed(ParallelConfig(), plat)
    yield plat
    destroy_distributed()


@pytest.fixture(scope="session")
def fid_weights(tmp_path_factory):
    """A random pt_inception-2015-12-05-6726825d.pth (tests/metric_models.py)."""
    from tests.metric_models import random_fid_inception

    return random_fid_inception(tmp_path_factory.mktemp("fid") / "pt_inception-random.pth")


@pytest.fixture(scope="session")
def clip_model(tmp_path_factory):
    """A random tiny CLIP directory with its processor (tests/metric_models.py)."""
    from tests.metric_models import tiny_clip

    return tiny_clip(tmp_path_factory.mktemp("clip"))


def run_torchrun(script: str, nproc: int, *args: str, timeout: int = 300):
    """Launch ``script`` under torchrun over gloo; fail the test with its output on error."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--standalone",
        str(ROOT / script),
        *args,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}")
    return result
