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


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module of tiny models: on a shared 2-core machine extra
    threads only add contention. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def binary_experiment(tmp_path_factory):
    """16 generated slides and bags, abmil baseline, 2 folds, 8 epochs on the CPU, trained once per
    session by the real train stage. Tests that change the experiment copy it first."""
    from mil.train_config import TrainConfig
    from pipeline.train_stage import run_training

    from tests.helpers import binary_cohort

    root = tmp_path_factory.mktemp("binary")
    ws, features, manifest, _, _ = binary_cohort(root, 16)
    # 8 epochs: the classes separate (test p(tumor) about 0.8 vs 0.3), so heatmaps can be compared
    config = TrainConfig(model="abmil", model_kw={"embed_dim": 16, "attn_dim": 8}, epochs=8, folds=2, lr=1e-2,
                         seeds=(0,), device="cpu", mhim=None, patience=None, val_ratio=0.3)
    run_training(manifest, ws, features, config, "exp", progress=False)
    return {"root": root, "ws": ws, "manifest": manifest, "features": features}
