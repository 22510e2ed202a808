"""The slide manifest: one CSV row per slide, validated up front.

Columns (see data_manifests/README.md): ``slide_id`` (required), ``path`` (segment/extract),
``label`` (train/evaluate), ``case_id``, ``mpp``, ``fold`` or ``split``, ``time`` + ``event``.
Validation collects every problem with its CSV line number and raises one
:class:`~extract.errors.ManifestError`; nothing is written before it passes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from extract.errors import ManifestError

KNOWN_COLUMNS = ("slide_id", "path", "label", "case_id", "mpp", "fold", "split", "time", "event")
SPLITS = ("train", "val", "test")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*$")


@dataclass(frozen=True)
class SlideRow:
    """One validated manifest row. ``line`` is the CSV line number (header = line 1)."""

    slide_id: str
    line: int
    path: Path | None = None
    label: str | None = None
    case_id: str | None = None
    mpp: float | None = None
    fold: int | None = None
    split: str | None = None
    time: float | None = None
    event: int | None = None


@dataclass
class Manifest:
    """Validated manifest rows in file order."""

    path: Path
    rows: list[SlideRow]
    columns: tuple[str, ...]
    extra: pd.DataFrame = field(repr=False, default=None)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    @property
    def slide_ids(self) -> list[str]:
        return [r.slide_id for r in self.rows]

    def by_id(self) -> dict[str, SlideRow]:
        return {r.slide_id: r for r in self.rows}

    def shard(self, index: int, count: int) -> "Manifest":
        """Rows ``index, index + count, ...`` (deterministic, in file order)."""
        return Manifest(self.path, self.rows[index::count], self.columns, self.extra)


def parse_shard(text: str | None) -> tuple[int, int]:
    """Parse ``--shard i/n`` (0-based ``i`` < ``n``); ``None`` means the whole manifest."""
    if text is None:
        return 0, 1
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match or int(match[2]) < 1 or int(match[1]) >= int(match[2]):
        raise ManifestError(
            f"The '--shard' parameter must look like i/n with 0 <= i < n (e.g. 0/4). Got {text!r} instead."
        )
    return int(match[1]), int(match[2])


def load_manifest(
    path: str | Path,
    require: tuple[str, ...] = (),
    check_files: bool = True,
) -> Manifest:
    """Read and validate a manifest CSV.

    Parameters
    ----------
    path : the CSV file. Relative slide paths resolve against its folder.
    require : columns this stage needs besides ``slide_id`` (e.g. ``("path",)``, ``("label",)``,
        ``("time", "event")``); rows with an empty required cell are errors.
    check_files : whether a ``path`` that does not exist is an error.
    """
    path = Path(path)
    if path.is_dir():
        raise ManifestError(f"{path}: is a folder; pass the manifest CSV file inside it with --manifest")
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found; pass an existing CSV with --manifest")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except pd.errors.EmptyDataError as exc:
        raise ManifestError(f"{path}: the file is empty; the first line must be a header such as "
                            "'slide_id,path,label'") from exc
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: not a readable CSV ({exc})") from exc
    table.columns = [str(c).strip() for c in table.columns]
    columns = tuple(table.columns)

    problems: list[str] = []
    if "slide_id" not in columns:
        if len(columns) == 1 and any(sep in columns[0] for sep in (";", "\t")):
            sep = "';'" if ";" in columns[0] else "tabs"
            raise ManifestError(f"{path}: the columns are separated by {sep}; save the manifest as a "
                                "comma-separated CSV (header such as 'slide_id,path,label')")
        lowered = [c for c in columns if c.lower() in KNOWN_COLUMNS and c not in KNOWN_COLUMNS]
        if any(c.lower() == "slide_id" for c in lowered):
            raise ManifestError(f"{path}: column names must be lower case; rename "
                                + ", ".join(f"'{c}' to '{c.lower()}'" for c in lowered))
        # A header-less CSV shows up as a first slide used as the header; say so rather than
        # silently losing that row (a known trap of the official MHIM code).
        raise ManifestError(
            f"{path}: no 'slide_id' column (columns found: {', '.join(columns) or 'none'}); the "
            "first line must be a header such as 'slide_id,path,label'"
        )
    for column in require:
        if column not in columns:
            problems.append(f"missing required column '{column}'")
    if "fold" in columns and "split" in columns:
        problems.append("use either a 'fold' or a 'split' column, not both")

    rows: list[SlideRow] = []
    seen: dict[str, int] = {}
    base = path.parent
    for i, record in enumerate(table.to_dict("records")):
        line = i + 2
        sid = record["slide_id"].strip()

        def err(msg: str) -> None:
            problems.append(f"line {line} (slide_id {sid or '?'}): {msg}")

        if not sid:
            err("empty slide_id")
        elif not _SAFE_ID.match(sid):
            err("slide_id must use only letters, digits, '.', '_' and '-' (it names output files)")
        if sid in seen:
            err(f"duplicate slide_id (first on line {seen[sid]})")
        seen.setdefault(sid, line)

        for column in require:
            if column in columns and not str(record.get(column, "")).strip():
                err(f"empty '{column}'")

        slide_path = None
        if str(record.get("path", "")).strip():
            slide_path = Path(record["path"].strip()).expanduser()
            if not slide_path.is_absolute():
                slide_path = base / slide_path
            if check_files and not slide_path.exists():
                err(f"slide file not found: {slide_path}")

        mpp = _number(record.get("mpp"), "mpp", err, positive=True)
        time = _number(record.get("time"), "time", err, positive=False)
        if time is not None and time < 0:
            err(f"'time' must be >= 0, got {time}")
        event = _number(record.get("event"), "event", err, positive=False)
        if event is not None and event not in (0.0, 1.0):
            err(f"'event' must be 0 (censored) or 1 (event), got {record.get('event')!r}")
        fold = _number(record.get("fold"), "fold", err, positive=False)
        if fold is not None and (fold != int(fold) or fold < 0):
            err(f"'fold' must be a whole number >= 0, got {record.get('fold')!r}")
        split = str(record.get("split", "")).strip().lower() or None
        if split is not None and split not in SPLITS:
            err(f"'split' must be one of {', '.join(SPLITS)}, got {record.get('split')!r}")

        rows.append(
            SlideRow(
                slide_id=sid,
                line=line,
                path=slide_path,
                label=str(record.get("label", "")).strip() or None,
                case_id=str(record.get("case_id", "")).strip() or None,
                mpp=mpp,
                fold=int(fold) if fold is not None else None,
                split=split,
                time=time,
                event=int(event) if event is not None else None,
            )
        )

    if not rows:
        problems.append("the manifest has no rows")
    if problems:
        shown = problems[:50]
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        raise ManifestError(
            f"{path}: {len(problems)} problem(s) in the manifest; fix them and rerun:\n  "
            + "\n  ".join(shown) + more
        )
    return Manifest(path, rows, columns, table)


def _number(value, column: str, err, positive: bool) -> float | None:
    text = str(value if value is not None else "").strip()
    if not text:
        return None
    try:
        number = float(text)
    except ValueError:
        err(f"'{column}' must be a number, got {text!r}")
        return None
    if not math.isfinite(number) or (positive and number <= 0):
        err(f"'{column}' must be a finite{' positive' if positive else ''} number, got {text!r}")
        return None
    return number
