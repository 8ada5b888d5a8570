"""Shared test set-up: hypothesis profiles and a clean plugin registry.

Hypothesis profiles: ``ci`` (derandomized, no deadline, prints the failing blob) is loaded when the
``CI`` environment variable is set, ``dev`` otherwise; ``HYPOTHESIS_PROFILE=<name>`` picks one
explicitly.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import settings

from hicache_sdk.registry import AUTOLOAD_ENV, PluginRegistry, reset_registry

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True, max_examples=40)
settings.register_profile("dev", deadline=None, max_examples=25)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))


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
