"""Shared test set-up: hypothesis profiles and a clean plugin registry.

Hypothesis profiles: ``ci`` (derandomized, no deadline, prints the failing blob) is loaded when the
``CI`` environment variable is set, ``dev`` otherwise; ``HYPOTHESIS_PROFILE=<name>`` picks one
explicitly.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import settings

import hicache_sdk.registry as registry_module
from hicache_sdk.registry import AUTOLOAD_ENV, DISTRIBUTION, PluginRegistry, reset_registry

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True, max_examples=40)
settings.register_profile("dev", deadline=None, max_examples=25)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))


def _where(ep: Any) -> tuple[str, str]:
    dist = ep.dist
    return (dist.metadata["Name"], str(dist.locate_file(""))) if dist is not None else ("<unknown>", "")


#: Third-party plugins installed in the environment running the suite: hidden from every test, so
#: the suite neither depends on nor breaks with whatever plugins happen to be installed. Plugins a
#: test installs itself (on a path of its own) stay visible.
_ENVIRONMENT_PLUGINS = frozenset(
    _where(ep) for ep in registry_module.entry_points_of_group() if _where(ep)[0] != DISTRIBUTION
)
_all_entry_points = registry_module.entry_points_of_group


@pytest.fixture(autouse=True)
def _hide_environment_plugins(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(
        registry_module,
        "entry_points_of_group",
        lambda: [ep for ep in _all_entry_points() if _where(ep) not in _ENVIRONMENT_PLUGINS],
    )
    if _ENVIRONMENT_PLUGINS:
        reset_registry()  # a registry loaded before the patch may hold them
    yield


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "integration: installs or runs things outside this process (slower)")


@pytest.fixture
def fresh_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[PluginRegistry]:
    """A new process-wide registry (entry points loaded afresh, third-party autoload on); dropped after
    the test, so plugins a test registers do not leak into the next one."""
    monkeypatch.delenv(AUTOLOAD_ENV, raising=False)
    registry = reset_registry()
    yield registry
    reset_registry()


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for a module's tiny batches: fastest, and immune to OpenMP spin-waits on a busy machine.

    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
