"""Shared fixtures: a fresh plugin host per test, and fake installed distributions for plugin tests."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch

from adaptive.plugins import reset_host
from adaptive.testing.strategies import register_profiles

register_profiles()  # hypothesis: 'ci' by default, HYPOTHESIS_PROFILE=thorough for more examples

PLUGIN_ENV = ("ADAPTIVE_STRICT_PLUGINS", "ADAPTIVE_LOAD_PLUGINS")


@pytest.fixture(autouse=True)
def fresh_plugin_host(monkeypatch):
    """Every test starts from the installed plugins only, loaded anew, whatever the caller's environment."""
    for name in PLUGIN_ENV:
        monkeypatch.delenv(name, raising=False)
    reset_host()
    yield
    reset_host()


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread per test: pytest-xdist runs two workers on two cores, and oversubscribed
    micro-model matmuls run several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fake_dist(tmp_path):
    """``fake_dist(name, source)`` writes an installed distribution ``name`` (module ``name``, entry point
    ``name`` in the group ``adaptive``) under one site folder, returned; put it on sys.path or PYTHONPATH."""
    site = tmp_path / "site"
    site.mkdir()
    modules = []

    def write(name: str, source: str, entry_point: str | None = None) -> Path:
        info = site / f"{name}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[adaptive]\n{entry_point or name} = {name}\n")
        (site / f"{name}.py").write_text(textwrap.dedent(source))
        modules.append(name)
        return site

    yield write
    for name in modules:
        sys.modules.pop(name, None)
