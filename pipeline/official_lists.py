"""Official MHIM-MIL data lists -> our manifest (``data_manifests/from_official.py``).

Formats (official repository, ``dataset_csv/`` in v1, ``datasets/dataset_csv/`` in v2):

- classification, ``label_c16.csv`` / ``label_tcga_nsclc.csv``: two columns WITHOUT a header,
  ``<slide or case id>,<label>`` (``tumor_020,1``; ``TCGA-62-A46R,LUAD``). The v1 loader reads
  every row; the v2 loader (``pandas.read_csv``) takes the first row for a header and silently
  drops that slide. Here a first row that is a header (``ID,Label``, ``slide_id,label``, ...)
  is skipped and a header-less file keeps its first row; either way the log says which.
- survival, ``label_{blca,luad,lusc}_surv.csv``: header ``Study,ID,Event,Status,WSI`` with
  ``Event`` the time, ``Status`` 1 for an observed event, ``WSI`` the case's feature files
  separated by ``;`` (one manifest row per slide, ``case_id`` = ``ID``).

The manifest keeps the file's row order: ``protocol: paper`` folds
(:func:`mil.official_splits.official_folds`) depend on it.
"""

from __future__ import annotations

import csv
import logging
import re
from pathlib import Path

from extract.errors import ManifestError

__all__ = ["read_official_labels", "read_official_survival", "convert_official", "write_manifest"]

log = logging.getLogger(__name__)

_HEADER_WORDS = {"id", "slide", "slide_id", "case", "case_id", "patient", "label", "labels", "class", "target"}
#: TCGA case barcode: the first three fields of a slide barcode (project, tissue source site,
#: participant; e.g. TCGA-A7-A0CE of TCGA-A7-A0CE-01Z-00-DX1).
_TCGA_CASE = re.compile(r"^(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})", re.IGNORECASE)


def _case_of(item_id: str) -> str:
    m = _TCGA_CASE.match(item_id)
    return m.group(1).upper() if m else item_id


def read_official_labels(path: str | Path) -> list[dict]:
    """Rows ``{slide_id, case_id, label}`` of a two-column official label CSV, file order kept."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: official label file not found")
    with open(path, newline="") as f:
        lines = [r for r in csv.reader(f) if any(c.strip() for c in r)]
    if not lines:
        raise ManifestError(f"{path}: empty label file")
    bad = [i + 1 for i, r in enumerate(lines) if len(r) != 2]
    if bad:
        raise ManifestError(f"{path}: line(s) {bad[:10]} do not have two columns (id,label); is this an "
                            "official label_*.csv?")
    first = [c.strip().lower() for c in lines[0]]
    if first[0] in _HEADER_WORDS and first[1] in _HEADER_WORDS:
        log.warning("%s: first row %s read as a header and skipped", path, lines[0])
        lines = lines[1:]
    else:
        log.warning("%s: no header row; the first row %s is KEPT as data (the official v2 loader, "
                    "pandas.read_csv, would drop it as a header)", path, lines[0])
    rows = []
    seen: set[str] = set()
    for i, (item, label) in enumerate(lines):
        item, label = item.strip(), label.strip()
        if not item or not label:
            raise ManifestError(f"{path}: row {i + 1} has an empty id or label: {item!r},{label!r}")
        if item in seen:
            raise ManifestError(f"{path}: id {item!r} appears twice; each slide or case once")
        seen.add(item)
        rows.append({"slide_id": item, "case_id": _case_of(item), "label": label})
    return rows


def read_official_survival(path: str | Path) -> list[dict]:
    """Rows ``{slide_id, case_id, time, event}`` of an official survival CSV, one per slide."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: official survival file not found")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        need = {"ID", "Event", "Status", "WSI"}
        missing = need - set(reader.fieldnames or [])
        if missing:
            raise ManifestError(f"{path}: missing column(s) {sorted(missing)}; an official survival CSV has "
                                "Study,ID,Event,Status,WSI")
        records = list(reader)
    rows = []
    for i, r in enumerate(records, start=2):
        try:
            float(r["Event"])
            event = int(float(r["Status"]))
        except ValueError:
            raise ManifestError(f"{path}: line {i}: Event (time) and Status (0/1) must be numbers; got "
                                f"{r['Event']!r}, {r['Status']!r}") from None
        files = [w.strip() for w in (r["WSI"] or "").split(";") if w.strip()]
        if not files:
            raise ManifestError(f"{path}: line {i}: case {r['ID']} lists no slide in WSI")
        for w in files:
            rows.append({"slide_id": Path(w).stem, "case_id": r["ID"].strip(), "time": r["Event"].strip(),
                         "event": str(event)})
    return rows


def convert_official(path: str | Path) -> list[dict]:
    """Manifest rows from any official list: survival when it has a WSI column, else labels."""
    with open(path, newline="") as f:
        head = f.readline()
    return read_official_survival(path) if "WSI" in head.strip().split(",") else read_official_labels(path)


def write_manifest(rows: list[dict], out: str | Path, slide_dir: str | Path | None = None,
                   ext: str = ".svs") -> Path:
    """Write the rows as our manifest CSV (with ``path`` = ``slide_dir/<slide_id><ext>`` if given)."""
    out = Path(out)
    cols = ["slide_id"] + (["path"] if slide_dir is not None else []) + [c for c in rows[0] if c != "slide_id"]
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            row = dict(r)
            if slide_dir is not None:
                row["path"] = str(Path(slide_dir) / f"{r['slide_id']}{ext}")
            w.writerow(row)
    return out
