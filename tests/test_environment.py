"""The reproducible environment: the lock (requirements/constraints.txt) satisfies every
requirement setup.py states."""

import ast

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import ROOT

LOCK = ROOT / "requirements" / "constraints.txt"


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
    compiles against torch on a GPU machine only: make lock cannot resolve it."""
    pins = lock()
    for group, requirements in setup_requirements().items():
        for requirement in requirements if group != "gpu" else ():
            name = canonicalize_name(requirement.name)
            assert name in pins, f"{requirement} ({group}) is not in {LOCK.name}: run make lock"
            assert requirement.specifier.contains(pins[name], prereleases=True), (
                f"{LOCK.name} pins {name}=={pins[name]}, setup.py asks {requirement}: make lock"
            )
    assert "megatron-transfusion" not in pins  # the project itself is never pinned
