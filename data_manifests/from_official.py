"""Convert an official MHIM-MIL data list into a wsi-pipeline manifest.

    python data_manifests/from_official.py label_c16.csv c16.csv --slides /data/c16/slides
    python data_manifests/from_official.py label_blca_surv.csv blca.csv

Label lists (``label_c16.csv``, ``label_tcga_nsclc.csv``: ``id,label`` rows, no header) and the
survival lists (``label_{blca,luad,lusc}_surv.csv``: one row per case, its slides in ``WSI``)
become one manifest row per slide, in the file's order (``protocol: paper`` folds depend on it).
See ``pipeline/official_lists.py`` for the formats and the header handling.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extract.errors import PipelineError  # noqa: E402
from pipeline.official_lists import convert_official, write_manifest  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("official", type=Path, help="official label_*.csv")
    ap.add_argument("out", type=Path, help="manifest CSV to write")
    ap.add_argument("--slides", type=Path, help="folder of the slide files (adds a path column)")
    ap.add_argument("--ext", default=".svs", help="slide file extension for --slides (default .svs)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        rows = convert_official(args.official)
        out = write_manifest(rows, args.out, args.slides, args.ext)
    except PipelineError as exc:
        logging.error("%s", exc)
        return 2
    print(f"wrote {len(rows)} slide(s) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
