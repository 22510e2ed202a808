"""Shared fixtures: the real test slides in ../shared/data (or $WSI_TEST_DATA)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _shared_data() -> Path | None:
    env = os.environ.get("WSI_TEST_DATA")
    for candidate in ([Path(env)] if env else []) + [ROOT.parent / "shared" / "data"]:
        if (candidate / "slides").is_dir():
            return candidate
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Folder with slides/ and images/; skips with a reason where it is absent (a user's clone)."""
    found = _shared_data()
    if found is None:
        pytest.skip("real test slides not found: set WSI_TEST_DATA or put them in ../shared/data")
    return found


@pytest.fixture(scope="session")
def slides_dir(shared_data: Path) -> Path:
    return shared_data / "slides"


@pytest.fixture(scope="session")
def images_dir(shared_data: Path) -> Path:
    return shared_data / "images"
