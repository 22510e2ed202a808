"""Evaluation figures: ROC curves per fold with their mean, Kaplan-Meier curves of risk groups.

Pure drawing functions: arrays in, an RGB ``uint8 [h, w, 3]`` image out, rendered with
Matplotlib's Agg canvas on a private ``Figure`` (no pyplot, no global backend switch, safe in
worker processes and on machines without a display). Writing the PNG is the caller's job
(:func:`pipeline.previews.save_png`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["roc_plot", "km_plot", "mean_roc", "evaluation_figures"]

#: False-positive-rate grid on which fold ROC curves are interpolated and averaged.
FPR_GRID = np.linspace(0.0, 1.0, 201)


def _render(fig) -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[..., :3])


def _figure(size_in: tuple[float, float] = (6.0, 5.0), dpi: int = 120):
    from matplotlib.figure import Figure

    fig = Figure(figsize=size_in, dpi=dpi)
    return fig, fig.add_subplot(1, 1, 1)


def mean_roc(curves: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vertical average of ROC curves on :data:`FPR_GRID`.

    Parameters
    ----------
    curves : sequence of ``(y_true [n], score [n])``; curves whose ``y_true`` holds one class
        (ROC undefined) are skipped.

    Returns
    -------
    fpr [201], mean_tpr [201], std_tpr [201] (NaN where no curve is defined).
    """
    from sklearn.metrics import roc_curve

    tprs = []
    for y, s in curves:
        y = np.asarray(y)
        if len(np.unique(y)) < 2:
            continue
        fpr, tpr, _ = roc_curve(y, np.asarray(s, dtype=np.float64))
        interp = np.interp(FPR_GRID, fpr, tpr)
        interp[0] = 0.0
        tprs.append(interp)
    if not tprs:
        nan = np.full_like(FPR_GRID, np.nan)
        return FPR_GRID.copy(), nan, nan.copy()
    stack = np.vstack(tprs)
    mean = stack.mean(axis=0)
    mean[-1] = 1.0
    std = stack.std(axis=0, ddof=1) if len(stack) > 1 else np.zeros_like(mean)
    return FPR_GRID.copy(), mean, std


def roc_plot(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    title: str = "ROC",
    subtitle: str = "",
    ensemble: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """ROC curve of each fold (thin) and their mean with a +-1 std band (thick).

    Parameters
    ----------
    curves : ``{name: (y_true [n] of 0/1, score [n])}``, e.g. ``{"seed 0 fold 1": (y, p)}``.
    title : figure title.
    subtitle : a second, smaller line (e.g. the evaluation protocol).
    ensemble : ``(y_true, score)`` of an ensemble of the folds, drawn dashed in red (external
        test sets).

    Returns
    -------
    uint8 RGB ``[h, w, 3]``.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = _figure()
    aucs = []
    for name, (y, s) in curves.items():
        y = np.asarray(y)
        if len(np.unique(y)) < 2:
            continue
        fpr, tpr, _ = roc_curve(y, np.asarray(s, dtype=np.float64))
        auc = float(roc_auc_score(y, s))
        aucs.append(auc)
        ax.plot(fpr, tpr, lw=1.0, alpha=0.55, label=f"{name} (AUC {auc:.3f})")
    if aucs:
        fpr, mean, std = mean_roc(list(curves.values()))
        spread = f" ± {np.std(aucs, ddof=1):.3f}" if len(aucs) > 1 else ""
        ax.plot(fpr, mean, color="black", lw=2.2, label=f"mean (AUC {np.mean(aucs):.3f}{spread})")
        if len(aucs) > 1:
            ax.fill_between(fpr, np.clip(mean - std, 0, 1), np.clip(mean + std, 0, 1),
                            color="grey", alpha=0.2, label="± 1 std")
    if ensemble is not None and len(np.unique(np.asarray(ensemble[0]))) == 2:
        y, s = np.asarray(ensemble[0]), np.asarray(ensemble[1], dtype=np.float64)
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, color="#d62728", lw=2.0, ls="--", label=f"ensemble (AUC {roc_auc_score(y, s):.3f})")
    if not aucs:
        ax.text(0.5, 0.5, "ROC undefined: every fold has one class", ha="center", va="center")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title(title + (f"\n{subtitle}" if subtitle else ""), fontsize=10)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    return _render(fig)


def _km_steps(time: np.ndarray, event: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from mil.metrics import kaplan_meier

    times, surv = kaplan_meier(time, event)
    end = float(np.max(time)) if len(time) else 0.0
    x = np.concatenate([[0.0], times, [max(end, times[-1] if len(times) else 0.0)]])
    y = np.concatenate([[1.0], surv, [surv[-1] if len(surv) else 1.0]])
    return x, y


def km_plot(
    groups: Mapping[str, tuple[np.ndarray, np.ndarray]],
    p_value: float | None = None,
    title: str = "Kaplan-Meier",
    subtitle: str = "",
    time_unit: str = "",
) -> np.ndarray:
    """Kaplan-Meier survival curves, one per group, with censoring marks and the log-rank p.

    Parameters
    ----------
    groups : ``{name: (time [n] >= 0, event [n] of 0/1)}``, e.g. high and low predicted risk.
    p_value : log-rank p-value printed on the plot (NaN or None: "n/a").
    title, subtitle : figure title and a smaller second line.
    time_unit : unit of the time axis for its label (e.g. "months").

    Returns
    -------
    uint8 RGB ``[h, w, 3]``.
    """
    from mil.metrics import kaplan_meier

    fig, ax = _figure()
    colours = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd"]
    for k, (name, (t, e)) in enumerate(groups.items()):
        t = np.asarray(t, dtype=np.float64)
        e = np.asarray(e).astype(np.int64)
        colour = colours[k % len(colours)]
        if len(t) == 0:
            ax.plot([], [], color=colour, label=f"{name} (n=0)")
            continue
        x, y = _km_steps(t, e)
        ax.step(x, y, where="post", color=colour, lw=1.8, label=f"{name} (n={len(t)}, events={int(e.sum())})")
        # censoring marks at the survival level in force at each censored time
        cens = t[e == 0]
        if len(cens):
            times, surv = kaplan_meier(t, e)
            idx = np.searchsorted(times, cens, side="right") - 1
            level = np.where(idx >= 0, surv[np.clip(idx, 0, None)] if len(surv) else 1.0, 1.0)
            ax.plot(cens, level, "|", color=colour, ms=8, mew=1.2)
    p_text = "n/a" if p_value is None or not np.isfinite(p_value) else (
        f"{p_value:.2e}" if p_value < 1e-3 else f"{p_value:.3f}")
    ax.text(0.02, 0.04, f"log-rank p = {p_text}", transform=ax.transAxes, fontsize=9)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(left=0)
    ax.set_xlabel("time" + (f" ({time_unit})" if time_unit else ""))
    ax.set_ylabel("survival probability")
    ax.set_title(title + (f"\n{subtitle}" if subtitle else ""), fontsize=10)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return _render(fig)


def evaluation_figures(metrics: Mapping[str, Any], pred, classes: Sequence[str] | None, title: str,
                       ensemble=None) -> dict[str, np.ndarray]:
    """The figures of an evaluation, by file name: ``roc.png`` (binary: each fold's test or
    external rows, and the ensemble's) or ``km.png`` (survival: the first seed's test slides by
    their fold's risk group, or the ensemble's); none for multi-class.

    ``metrics`` and ``pred`` are what :func:`mil.evaluation.evaluate_predictions` (or
    ``external_metrics``) returned; ``ensemble`` the ensemble rows of an external set.
    """
    from mil.evaluation import first_seed, unit_rows

    subtitle = f"protocol: {metrics['protocol']}"
    several_seeds = len({f["seed"] for f in metrics["folds"]}) > 1
    if metrics["kind"] == "binary":
        pos = f"prob_{classes[1]}"
        curves = {}
        for f in metrics["folds"]:
            rows = unit_rows(pred, f["seed"], f["fold"])
            rows = rows[(rows["split"] == "test") | (rows["split"] == "external")]
            name = f"seed {f['seed']} fold {f['fold']}" if several_seeds else f"fold {f['fold']}"
            curves[name] = (rows["label"].astype(str).to_numpy() == classes[1], rows[pos].to_numpy(float))
        extra = None
        if ensemble is not None and "label" in ensemble:
            extra = (ensemble["label"].astype(str) == classes[1], ensemble[pos].to_numpy(float))
        return {"roc.png": roc_plot(curves, title=f"{title}: ROC ({classes[1]} positive)", subtitle=subtitle,
                                    ensemble=extra)}
    if metrics["kind"] != "survival":
        return {}
    rows = ensemble if ensemble is not None else first_seed(pred[pred["split"] == "test"])
    km = metrics.get("km") or {}
    if ensemble is not None:
        how = "ensemble risk split at the mean of the folds' median validation risks"
    else:
        how = "test slides split at the median validation risk of their fold"
        if several_seeds:
            how += f" (seed {km.get('seed')})"
    high = (rows["risk_group"] == "high").to_numpy()
    t, e = rows["time"].to_numpy(float), rows["event"].to_numpy(float).astype(int)
    return {"km.png": km_plot({"high predicted risk": (t[high], e[high]), "low predicted risk": (t[~high], e[~high])},
                              p_value=km.get("logrank_p"), title=f"{title}: Kaplan-Meier",
                              subtitle=subtitle + "\n" + how)}
