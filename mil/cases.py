"""One bag per CASE (``bag: case``): a patient's slides concatenated into one bag.

MHIM-v2 runs survival this way (one bag per patient, all slides concatenated), and the
CAMELYON16 / TCGA labels are per patient too. Here:

- :func:`group_cases` turns slide rows into one row per case (``slide_id`` = the case id, so
  splits, training and predictions work unchanged on cases), checking that every slide of a case
  carries the same label (or time and event);
- :func:`case_bags` concatenates the slides' feature rows in MANIFEST order and records where
  each slide's instances sit (:class:`Span`), so per-instance scores map back to their slide
  (:func:`split_by_slide`) for per-slide heatmaps;
- :func:`survival_strata` stratifies survival folds by time bin x event (the bins here are
  quartiles of the cohort's uncensored times, used only to balance folds; the model's training
  bins are still fitted on each training fold).

Pure functions on manifest rows and :class:`~mil.data.BagSet`; no files.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from extract.errors import ConfigError

__all__ = ["BAG_UNITS", "Span", "group_cases", "case_bags", "split_by_slide", "expand_to_slides", "survival_strata",
           "spans_table"]

BAG_UNITS = ("slide", "case")


@dataclass(frozen=True)
class Span:
    """Where one slide's instances sit in its case's bag: rows ``start:stop``."""

    case_id: str
    slide_id: str
    start: int
    stop: int


def _listing(items: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(map(str, items[:limit]))
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def group_cases(rows: Sequence[Any], task: str) -> tuple[list[Any], dict[str, list[str]]]:
    """One row per case and each case's slides in manifest order.

    Parameters
    ----------
    rows : manifest rows (``slide_id``, ``case_id`` defaulting to ``slide_id``, ``label`` or
        ``time``/``event``, ``fold``, ``split``).
    task : 'classification' or 'survival'.

    Returns
    -------
    case_rows : copies of each case's first row with ``slide_id`` set to the case id (manifest
        order of first appearance).
    members : case id -> its slide ids, in manifest order.

    Raises
    ------
    ConfigError
        Slides of one case disagree on the label (time/event), fold or split; the message names
        every such case and its values.
    """
    members: dict[str, list[str]] = defaultdict(list)
    first: dict[str, Any] = {}
    values: dict[str, set] = defaultdict(set)
    fields = ("label",) if task == "classification" else ("time", "event")
    for r in rows:
        case = r.case_id or r.slide_id
        members[case].append(r.slide_id)
        first.setdefault(case, r)
        values[case].add(tuple(str(getattr(r, f)) for f in fields + ("fold", "split")))
    bad = [f"{c} ({'; '.join(sorted('/'.join(v) for v in vals))})" for c, vals in values.items() if len(vals) > 1]
    if bad:
        raise ConfigError(
            f"bag: case needs the same {'/'.join(fields)} (and fold/split) on every slide of a case; "
            f"{len(bad)} case(s) disagree: {_listing(bad)}. Fix the manifest or use bag: slide"
        )
    case_rows = [replace(first[c], slide_id=c, case_id=c) for c in members]
    return case_rows, dict(members)


def case_bags(bags: Any, members: Mapping[str, Sequence[str]]) -> tuple[Any, list[Span]]:
    """A BagSet keyed by case: each case's slide bags concatenated in the given order.

    Returns the case BagSet (coordinates concatenated too when every slide has them) and the
    :class:`Span` of every slide. Slides without a bag are skipped; a case with none is left out.
    """
    from mil.data import BagSet

    features: dict[str, torch.Tensor] = {}
    coords: dict[str, np.ndarray] = {}
    spans: list[Span] = []
    for case, slides in members.items():
        present = [s for s in slides if s in bags]
        if not present:
            continue
        parts = [bags.host(s) for s in present]
        start = 0
        for s, t in zip(present, parts):
            spans.append(Span(case, s, start, start + int(t.shape[0])))
            start += int(t.shape[0])
        dtype = parts[0].dtype if all(p.dtype == parts[0].dtype for p in parts) else torch.float32
        features[case] = torch.cat([p.to(dtype) for p in parts], dim=0)
        slide_coords = [bags.coords(s) for s in present]
        if all(c is not None for c in slide_coords):
            coords[case] = np.concatenate(slide_coords, axis=0)
    return BagSet(features, coords, {sp.slide_id: bags.attrs(sp.slide_id) for sp in spans}), spans


def split_by_slide(case_id: str, values: np.ndarray, spans: Sequence[Span]) -> dict[str, np.ndarray]:
    """Per-instance ``values`` [N] of a case's bag, cut back into its slides' rows."""
    out = {}
    for sp in spans:
        if sp.case_id == case_id:
            out[sp.slide_id] = np.asarray(values)[sp.start : sp.stop]
    return out


def spans_table(spans: Sequence[Span]) -> list[dict]:
    """Rows for ``bags.csv`` (case_id, slide_id, start, stop)."""
    return [{"case_id": s.case_id, "slide_id": s.slide_id, "start": s.start, "stop": s.stop} for s in spans]


def survival_strata(case_rows: Sequence[Any], n_bins: int = 4) -> dict[str, str]:
    """``'<time bin>|<event>'`` per case for stratified survival folds.

    Bin edges are the ``n_bins``-quantiles of the uncensored times of the whole cohort (a fold
    balance device only: the model's bins are fitted on each training fold). Fewer distinct
    uncensored times than bins: event status alone.
    """
    times = np.array([float(r.time) for r in case_rows])
    events = np.array([int(r.event) for r in case_rows])
    unc = times[events == 1]
    if len(np.unique(unc)) < n_bins:
        return {r.slide_id: str(int(r.event)) for r in case_rows}
    inner = np.quantile(unc, np.linspace(0, 1, n_bins + 1)[1:-1])
    bins = np.searchsorted(inner, times, side="right")
    return {r.slide_id: f"{int(b)}|{int(e)}" for r, b, e in zip(case_rows, bins, events)}


def expand_to_slides(items: Sequence[Mapping[str, Any]], spans: Sequence[Span]) -> list[dict]:
    """Per-case heatmap items (``slide_id`` = case, ``coords`` [N, 2], ``scores`` [N], ``title``)
    as one item per slide of the case, with that slide's rows of coordinates and scores."""
    out = []
    for item in items:
        case = item["slide_id"]
        for sp in (s for s in spans if s.case_id == case):
            coords = item.get("coords")
            out.append({**item, "slide_id": sp.slide_id,
                        "coords": None if coords is None else np.asarray(coords)[sp.start : sp.stop],
                        "scores": np.asarray(item["scores"])[sp.start : sp.stop],
                        "title": f"{item.get('title', case)} [slide {sp.slide_id} of case {case}]"})
    return out
