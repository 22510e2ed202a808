"""Small builders shared by the test packages (fixtures over them live in ``tests/conftest.py``).

Everything here writes real files through the product's own writers (``write_bag``,
``write_svs``); nothing stands in for our components.
"""

from __future__ import annotations

import csv
from pathlib import Path

import h5py
import numpy as np

#: Level-0 patch side (pixels) of the bags ``write_cohort`` makes.
PATCH0 = 64
#: Feature dimension of the bags ``write_cohort`` makes.
DIM = 8


def read_status(folder: Path) -> dict[str, dict]:
    """``<stage dir>/status.csv`` as ``{slide_id: row}``."""
    with open(Path(folder) / "status.csv", newline="") as f:
        return {r["slide_id"]: r for r in csv.DictReader(f)}


def coords_of(seg_dir: Path, sid: str) -> tuple[np.ndarray, dict, dict]:
    """A coords file's ``coords`` [N, 2], the dataset's attributes and the file's attributes."""
    with h5py.File(Path(seg_dir) / "coords" / f"{sid}.h5") as f:
        return f["coords"][:], dict(f["coords"].attrs), dict(f.attrs)


def write_bags(folder: Path, feats: dict[str, np.ndarray], attrs: dict | None = None) -> Path:
    """One HDF5 bag per ``{slide_id: features [N, D]}`` (coordinates all zero); returns ``folder``."""
    from extract.bags import write_bag

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for sid, x in feats.items():
        write_bag(folder / f"{sid}.h5", x, np.zeros((len(x), 2), np.int64), attrs=attrs)
    return folder


def write_cohort(root: Path, ids: list[str], labels: list[str] | None, seed: int, features_dir: Path,
                 survival: list[tuple[float, int]] | None = None, with_label_column: bool = True) -> Path:
    """Generated slides (small pyramidal SVS), their bags and a manifest; returns the manifest path.

    Each slide is 960x720 or 1280x640 level-0 pixels at 0.5 um/px with a grid of ``PATCH0``-pixel
    patches; its bag holds one ``DIM``-d feature row per patch, with a few strongly shifted rows
    that make the class (or an early event) learnable.
    """
    from extract.bags import write_bag
    from extract.svs_writer import write_svs

    rng = np.random.default_rng(seed)
    slides = root / "slides"
    slides.mkdir(parents=True, exist_ok=True)
    features_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, sid in enumerate(ids):
        w, h = (1280, 640) if i % 2 else (960, 720)
        image = np.full((h, w, 3), 240, np.uint8)
        coords = np.array([(x, y) for y in range(64, h - PATCH0, PATCH0) for x in range(64, w - PATCH0, PATCH0)])
        for x, y in coords:
            image[y:y + PATCH0, x:x + PATCH0] = rng.integers(120, 220, 3)
        write_svs(slides / f"{sid}.svs", image, mpp=0.5, min_level_px=128)
        feats = rng.normal(0, 1, (len(coords), DIM)).astype(np.float32)
        shift = sorted(set(labels)).index(labels[i]) if labels is not None else int(survival[i][0] < 20)
        if shift:
            feats[: max(3, len(coords) // 4), 2 * shift:2 * shift + 2] += 4.0
        write_bag(features_dir / f"{sid}.h5", feats, coords,
                  attrs={"backbone": "test", "patch_size_level0": PATCH0, "target_mpp": 0.5})
        row = [sid, f"slides/{sid}.svs"]
        if labels is not None and with_label_column:
            row.append(labels[i])
        if survival is not None:
            row += [f"{survival[i][0]:g}", str(survival[i][1])]
        lines.append(",".join(row))
    header = ["slide_id", "path"] + (["label"] if labels is not None and with_label_column else []) \
        + (["time", "event"] if survival is not None else [])
    manifest = root / "manifest.csv"
    manifest.write_text(",".join(header) + "\n" + "\n".join(lines) + "\n")
    return manifest


def binary_cohort(root: Path, n_slides: int, seed: int = 0, prefix: str = "s"):
    """``write_cohort`` of ``n_slides`` alternating normal/tumour slides with their bags in
    ``<root>/ws/features/test_backbone/mpp0.50_64px``; returns (workspace, features, manifest, ids, labels)."""
    ws = root / "ws"
    features = ws / "features" / "test_backbone" / "mpp0.50_64px"
    ids = [f"{prefix}{i:02d}" for i in range(n_slides)]
    labels = ["tumor" if i % 2 else "normal" for i in range(n_slides)]
    return ws, features, write_cohort(root, ids, labels, seed, features), ids, labels


def write_pipeline_config(path: Path, manifest: Path, workspace: str, name: str, folds: int = 3,
                          heatmaps: int = 0, extra: str = "") -> Path:
    """A ``wsi-pipeline run`` config at ``path`` for a ``make_cohort`` cohort: bwh_biopsy at 0.5 um/px
    and 256 px, ResNet-18 with random weights, MHIM(AB-MIL) for 2 epochs per fold; ``name`` is
    the config's and the experiment's name, ``extra`` YAML appended as is (a ``slurm:`` section)."""
    path.write_text(f"""
name: {name}
manifest: {manifest}
workspace: {workspace}
segment: {{preset: bwh_biopsy, target_mpp: 0.5, patch_px: 256}}
extract: {{backbone: resnet18, weights: random, batch_size: 16, num_workers: 0}}
train:
  recipe: mhim_abmil_c16
  experiment: {name}
  folds: {folds}
  seeds: [7]
  epochs: 2
  lr: 1.0e-3
  patience: null
  min_epochs: 0
  val_ratio: 0.25
evaluate: {{heatmaps: {heatmaps}}}
{extra}""")
    return path


def read_png(path: Path) -> np.ndarray:
    """A picture the product wrote, as RGB uint8 [H, W, 3]."""
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert img is not None, f"{path} is not a readable image"
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def panel_box(img: np.ndarray) -> tuple[int, int, int, int]:
    """(x, y, w, h) of a heatmap figure's panel: inside the largest ``FRAME``-coloured rectangle."""
    import cv2

    from pipeline.heatmaps import FRAME

    mask = np.all(img == np.array(FRAME, np.uint8), axis=2).astype(np.uint8)
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    assert n > 1, "no frame found around the heatmap panel"
    best = max(range(1, n), key=lambda i: stats[i, cv2.CC_STAT_WIDTH] * stats[i, cv2.CC_STAT_HEIGHT])
    x, y, w, h = (int(stats[best, k]) for k in (cv2.CC_STAT_LEFT, cv2.CC_STAT_TOP, cv2.CC_STAT_WIDTH, cv2.CC_STAT_HEIGHT))
    return x + 1, y + 1, w - 2, h - 2


def synthetic_bags(
    n_bags: int,
    n_instances: int | tuple[int, int],
    dim: int,
    witness_ratio: tuple[float, float] = (0.01, 0.03),
    shift: float = 4.0,
    seed: int = 0,
    pos_fraction: float = 0.5,
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Generated MIL bags: negatives are noise; positives carry a few witness instances.

    Instances are standard normal in ``dim`` dimensions; a positive bag's witnesses (a random
    share in ``witness_ratio`` of its instances, at least one) are shifted by ``shift`` noise
    standard deviations along a fixed random direction: the signal a MIL model has to find.

    Parameters
    ----------
    n_bags : number of bags (ids ``bag_000`` ...); the first ``round(pos_fraction * n_bags)``
        after a seeded shuffle are positive.
    n_instances : instances per bag, or ``(low, high)`` drawn uniformly per bag.
    dim : feature size.

    Returns
    -------
    features : dict slide_id -> float32 ndarray [N, dim]
    labels : dict slide_id -> 0 or 1
    """
    rng = np.random.default_rng(seed)
    direction = rng.standard_normal(dim).astype(np.float32)
    direction *= shift / np.linalg.norm(direction)
    n_pos = int(round(pos_fraction * n_bags))
    positive = np.zeros(n_bags, dtype=bool)
    positive[rng.permutation(n_bags)[:n_pos]] = True
    features: dict[str, np.ndarray] = {}
    labels: dict[str, int] = {}
    for i in range(n_bags):
        n = n_instances if isinstance(n_instances, int) else int(rng.integers(n_instances[0], n_instances[1] + 1))
        x = rng.standard_normal((n, dim), dtype=np.float32)
        if positive[i]:
            k = max(1, int(round(rng.uniform(*witness_ratio) * n)))
            x[rng.choice(n, size=k, replace=False)] += direction
        sid = f"bag_{i:03d}"
        features[sid] = x
        labels[sid] = int(positive[i])
    return features, labels
