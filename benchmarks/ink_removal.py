"""Ink removal measured on the real inked biopsy: ink kept as tissue and tissue elsewhere, before/after.

    .venv/bin/python benchmarks/ink_removal.py                      # prints the numbers
    .venv/bin/python benchmarks/ink_removal.py --figure docs/qc_ink_before_after.png

Writes ``../shared/data/images/biopsy_he_with_ink.jpeg`` (5600 x 1000, a real prostate biopsy with a
blue ink smear) as a 2-level pyramidal SVS, segments it at level 1 (1400 x 250 px) with the
``bwh_biopsy`` preset (CLAM, today's behaviour) and with ``biopsy_ink`` (the same plus ink
removal), and measures against a reference drawn independently of the colour rules: the pixels
bluer than red (B > R) and saturated (S > 20) inside the smear's bounding box, at full
resolution, then downsampled by area (majority) to the segmentation level. "Tissue elsewhere" is
the kept tissue more than 12 segmentation pixels away from that reference. tests/extract/test_ink.py
asserts the same numbers within bounds.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from extract.segmentation import PRESETS, segment_tissue, segmentation_image, tissue_mask  # noqa: E402
from extract.slide import Slide  # noqa: E402
from extract.svs_writer import write_svs  # noqa: E402
from extract.tiling import tile_tissue  # noqa: E402

SMEAR = (slice(620, 1000), slice(3500, 4150))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("WSI_TEST_DATA", HERE.parent.parent / "shared" / "data")))
    parser.add_argument("--figure", type=Path, help="write a before/after crop of the previews here (PNG)")
    args = parser.parse_args()

    full = cv2.cvtColor(cv2.imread(str(args.data / "images" / "biopsy_he_with_ink.jpeg")), cv2.COLOR_BGR2RGB)
    r, b = full[..., 0].astype(int), full[..., 2].astype(int)
    sat = cv2.cvtColor(full, cv2.COLOR_RGB2HSV)[..., 1]
    ref = np.zeros(full.shape[:2], np.float32)
    ref[SMEAR] = ((b > r) & (sat > 20))[SMEAR]
    reference = cv2.resize(ref, (1400, 250), interpolation=cv2.INTER_AREA) >= 0.5
    near = cv2.dilate(reference.astype(np.uint8), np.ones((25, 25), np.uint8)).astype(bool)

    with tempfile.TemporaryDirectory() as tmp:
        path = write_svs(Path(tmp) / "biopsy.svs", full, mpp=2.0, min_level_px=200)
        with Slide(path) as slide:
            image, scale = segmentation_image(slide, mode="clam", downsample=4)
            wh = slide.dimensions
    results = {}
    for preset in ("bwh_biopsy", "biopsy_ink"):
        tissue = segment_tissue(image, PRESETS[preset], scale)
        kept = tissue_mask(tissue)
        coords = tile_tissue(tissue, 32, wh)
        centres = (coords + 16) // 4
        results[preset] = (tissue, coords)
        print(f"{preset:11s} ink kept as tissue {int((kept & reference).sum()):5d} px of {int(reference.sum())}; "
              f"tissue elsewhere {int((kept & ~near).sum())} px; patches {len(coords)} "
              f"({int(reference[centres[:, 1], centres[:, 0]].sum())} centred in the ink); "
              f"removed {100 * tissue.ink_fraction:.2f}% of tissue {tissue.ink_px or ''}")
    if args.figure:
        from pipeline.previews import draw_preview, save_png

        crop = (slice(None), slice(800, 1160))
        panels = []
        for preset, (tissue, coords) in results.items():
            pic = draw_preview(image, scale, tissue.contours, tissue.holes, coords, 32, ink=tissue.ink_contours)
            panels.append(pic[crop])
        gap = np.full((panels[0].shape[0], 8, 3), 255, np.uint8)
        save_png(args.figure, np.hstack([panels[0], gap, panels[1]]))
        print(f"figure: {args.figure} ({args.figure.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
