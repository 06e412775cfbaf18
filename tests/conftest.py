"""Shared pytest fixtures: locating ../shared/data (skipping cleanly when absent)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["tests.engine_fixtures"]

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEGATRON_DAPO_SHARED", REPO_ROOT.parent / "shared"))


def shared_path(*parts: str) -> Path:
    """Return ``../shared/<parts>`` or skip the calling test when it does not exist."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared data not available: {p}")
    return p


@pytest.fixture
def shared():
    """Fixture form of :func:`shared_path`."""
    return shared_path


@pytest.fixture
def qwen_tokenizer_dir():
    return shared_path("data", "qwen2.5-tokenizer")
