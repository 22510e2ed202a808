"""The slide manifest: one CSV row per slide, validated up front.

Columns (see data_manifests/README.md): ``slide_id`` (required), ``path`` (segment/extract),
``label`` (train/evaluate), ``case_id``, ``mpp``, ``fold`` or ``split``, ``time`` + ``event``.
Validation collects every problem with its CSV line number and raises one
:class:`~extract.errors.ManifestError`; nothing is written before it passes.
"""

from __future__ import annotations

import csv
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

from extract.errors import ManifestError

log = logging.getLogger(__name__)

KNOWN_COLUMNS = ("slide_id", "path", "label", "case_id", "mpp", "fold", "split", "time", "event")
SPLITS = ("train", "val", "test")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*$")
#: Longest slide_id: it names files such as ``<slide_id>.h5.tmp-<host>-<pid>`` inside folders, and
#: most filesystems stop at 255 bytes per name.
MAX_ID_LENGTH = 200
#: Plausible level-0 resolutions in micrometres per pixel (100x oil ~0.05 to a 0.5x overview ~20).
MPP_RANGE = (0.05, 20.0)


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
        return Manifest(self.path, self.rows[index::count], self.columns)


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
    check_mpp: bool = True,
) -> Manifest:
    """Read and validate a manifest CSV.

    Parameters
    ----------
    path : the CSV file. Relative slide paths resolve against its folder.
    require : columns this stage needs besides ``slide_id`` (e.g. ``("path",)``, ``("label",)``,
        ``("time", "event")``); rows with an empty required cell are errors.
    check_files : whether a ``path`` that does not exist is an error.
    check_mpp : whether an ``mpp`` outside :data:`MPP_RANGE` is an error.
    """
    path = Path(path)
    if path.is_dir():
        raise ManifestError(f"{path}: is a folder; pass the manifest CSV file inside it with --manifest")
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found; pass an existing CSV with --manifest")
    columns, records = read_csv_strict(path)
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
    for line, record in records:
        sid = record["slide_id"]

        def err(msg: str) -> None:
            problems.append(f"line {line} (slide_id {sid or '?'}): {msg}")

        if not sid:
            err("empty slide_id")
        elif not _SAFE_ID.match(sid):
            err("slide_id must use only letters, digits, '.', '_' and '-' (it names output files)")
        elif len(sid) > MAX_ID_LENGTH:
            err(f"slide_id is {len(sid)} characters long; at most {MAX_ID_LENGTH} (it names output files)")
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
        if mpp is not None and check_mpp and not (MPP_RANGE[0] <= mpp <= MPP_RANGE[1]):
            err(f"'mpp' {mpp:g} is outside {MPP_RANGE[0]:g}-{MPP_RANGE[1]:g} micrometres per pixel (40x is about "
                "0.25, 20x about 0.5); fix it, or pass --no-mpp-check for an unusual scanner")
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
    _warn_label_spellings(path, rows)
    return Manifest(path, rows, columns)


def read_csv_strict(path: Path) -> tuple[tuple[str, ...], list[tuple[int, dict[str, str]]]]:
    """The header and rows of a CSV, every cell a string stripped of surrounding spaces.

    Strict where a lenient reader guesses: a row with more or fewer fields than the header is
    an error (pandas would take an extra field as an index and shift every column), so is a
    header naming a column twice or leaving one unnamed. Blank lines are skipped.

    Returns
    -------
    (columns, [(line, {column: value})]) with the CSV line number of each row (header = 1).
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            lines = [(reader.line_num, row) for reader in [csv.reader(f)] for row in reader]
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); save the manifest as a "
                            "UTF-8 CSV") from exc
    except csv.Error as exc:
        raise ManifestError(f"{path}: not a readable CSV ({exc})") from exc
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read the manifest ({exc.strerror or exc})") from exc
    lines = [(n, [c.strip() for c in row]) for n, row in lines if any(c.strip() for c in row)]
    if not lines:
        raise ManifestError(f"{path}: the file is empty; the first line must be a header such as "
                            "'slide_id,path,label'")
    header_line, columns = lines[0]
    problems = []
    seen: dict[str, int] = {}
    for i, name in enumerate(columns):
        if not name:
            problems.append(f"line {header_line}: column {i + 1} of the header has no name")
        elif name in seen:
            problems.append(f"line {header_line}: column '{name}' appears twice (columns {seen[name]} and {i + 1}); "
                            "keep one")
        seen.setdefault(name, i + 1)
    records = []
    for n, row in lines[1:]:
        if len(row) != len(columns):
            problems.append(f"line {n}: {len(row)} field(s) but the header has {len(columns)}; a stray comma or a "
                            "missing one shifts every column after it (quote values that contain commas)")
            continue
        records.append((n, dict(zip(columns, row))))
    if problems and "slide_id" in columns:
        raise ManifestError(f"{path}: {len(problems)} problem(s) in the manifest; fix them and rerun:\n  "
                            + "\n  ".join(problems[:50]))
    return tuple(columns), records


def _warn_label_spellings(path: Path, rows: list[SlideRow]) -> None:
    """Labels are classes as written; warn where two spellings are one number (``1`` and ``1.0``)."""
    by_value: dict[float, set[str]] = {}
    for r in rows:
        try:
            by_value.setdefault(float(r.label), set()).add(r.label)
        except (TypeError, ValueError):
            continue
    for spellings in by_value.values():
        if len(spellings) > 1:
            names = ", ".join(repr(s) for s in sorted(spellings))
            log.warning("%s: labels %s are different classes as written although they are the same number; "
                        "write one spelling if they mean one class", path, names)


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
