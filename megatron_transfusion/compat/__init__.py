"""Every patch on a pinned dependency's private internals, one module per dependency.

Each patch is a named function (or context manager) in ``compat.<dependency>``, registered
in ``PATCHES`` with the reason it exists. Calling it first checks that the installed
version is the one the patch was written for (setup.py pins it): internals move between
releases, and a patch applied to the wrong version fails far from its cause, or not at all.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
from dataclasses import dataclass

from megatron_transfusion.config import UserError


@dataclass(frozen=True)
class Patch:
    distribution: str  # as pip names it, e.g. "megatron-core"
    written_for: str  # the version whose internals it patches
    name: str  # "<compat module>.<function>"
    why: str  # the first line of its docstring


PATCHES: list[Patch] = []  # filled as the compat modules are imported


def installed_version(distribution: str) -> str:
    """The installed version without a local suffix (torch's "2.14.1+cu130" is "2.14.1")."""
    return importlib.metadata.version(distribution).split("+")[0]


def require_version(distribution: str, written_for: str, module: str) -> None:
    installed = installed_version(distribution)
    if installed != written_for:
        raise UserError(
            f"{module} patches the internals of {distribution} {written_for}, but {distribution} "
            f"{installed} is installed: install {distribution}=={written_for} (pinned in setup.py)"
        )


def patcher(distribution: str, written_for: str, module: str):
    """The decorator a compat module marks its patches with: registers the patch and makes
    each call check the installed version first."""

    def patch(function):
        PATCHES.append(
            Patch(
                distribution,
                written_for,
                f"{module.rsplit('.', 1)[-1]}.{function.__name__}",
                (function.__doc__ or "").strip().splitlines()[0],
            )
        )

        @functools.wraps(function)
        def checked(*args, **kwargs):
            require_version(distribution, written_for, module)
            return function(*args, **kwargs)

        return checked

    return patch


@contextlib.contextmanager
def replaced(owner, name: str, value):
    """``owner.name`` is ``value`` inside the block and its own again after it, error or not."""
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)
