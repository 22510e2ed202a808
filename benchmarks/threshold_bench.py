"""Which binary threshold to trust on a small validation split: Youden's J or argmax (p >= 0.5).

Simulates the positive-class probabilities a MIL model gives on validation bags and measures the
EXPECTED test accuracy and balanced accuracy of the threshold each rule picks (computed in
closed form, so no test-set noise enters). Model of the scores, per fold:

    x | y ~ Normal(+-d/2, 1)                       d sets the AUC: AUC = Phi(d / sqrt(2))
    logit p = s * (d * x + log(pi / (1 - pi))) + c  the Bayes posterior, miscalibrated by a
                                                    random scale s (log s ~ N(0, 0.5)) and a
                                                    random shift c ~ N(0, sigma_c)

sigma_c = 0 is a calibrated model (argmax is Bayes-optimal for accuracy); sigma_c = 1 and 2 are
models whose 0.5 cut lands away from the best one (class imbalance, early stopping, overfit),
which is what Youden is there to fix.

Part A: per-class validation count m (the validation split holds m positives and
round(m (1-pi)/pi) negatives) against the mean test balanced accuracy of both rules.
Part B: cohorts of 60, 200 and 1,000 bags, 5-fold CV with 15 % of each training fold carved out
for validation (the trainer's default): always-argmax, always-Youden and the ``auto`` rule of
``mil.evaluation.choose_threshold``.

    python benchmarks/threshold_bench.py            # ~1 min on one core
    python benchmarks/threshold_bench.py --reps 400 # quicker, noisier
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scipy.stats import norm  # noqa: E402

from mil.evaluation import ARGMAX_THRESHOLD, MIN_PER_CLASS_FOR_YOUDEN, choose_threshold  # noqa: E402

PREVALENCE = 0.4  # CAMELYON16: 160 tumour slides of 399
AUCS = (0.80, 0.95)
SIGMA_C = (0.0, 1.0, 2.0)


def _logit(p: float) -> float:
    p = min(max(p, 1e-12), 1 - 1e-12)
    return math.log(p / (1 - p))


def _expected(thr: float, d: float, s: float, c: float, pi: float) -> tuple[float, float]:
    """Expected test (accuracy, balanced accuracy) of ``p >= thr`` under the score model."""
    if not math.isfinite(thr):
        sens, spec = 0.0, 1.0
    else:
        x_t = ((_logit(thr) - c) / s - _logit(pi)) / d
        sens = 1.0 - norm.cdf(x_t - d / 2)
        spec = norm.cdf(x_t + d / 2)
    return pi * sens + (1 - pi) * spec, 0.5 * (sens + spec)


def _val_scores(rng, n_pos: int, n_neg: int, d: float, s: float, c: float, pi: float):
    y = np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)]
    x = rng.normal(np.where(y == 1, d / 2, -d / 2), 1.0)
    z = s * (d * x + _logit(pi)) + c
    return y, 1.0 / (1.0 + np.exp(-z))


def _trial(rng, n_pos, n_neg, d, sigma_c, pi):
    s = math.exp(rng.normal(0.0, 0.5))
    c = rng.normal(0.0, sigma_c) if sigma_c else 0.0
    y, p = _val_scores(rng, n_pos, n_neg, d, s, c, pi)
    choice = choose_threshold(y, p, "auto")
    youden = choice.youden if choice.youden is not None else ARGMAX_THRESHOLD
    return (_expected(ARGMAX_THRESHOLD, d, s, c, pi), _expected(youden, d, s, c, pi),
            _expected(choice.value, d, s, c, pi))


def part_a(reps: int, rng) -> None:
    counts = (2, 3, 5, 8, 10, 12, 15, 20, 30, 50)
    print(f"\nA. test balanced accuracy (mean of {reps} folds) by per-class validation count m; "
          f"prevalence {PREVALENCE}")
    print("   " + " ".join(f"{'m=' + str(m):>8}" for m in counts) + "   (youden - argmax, points)")
    table = []
    for auc in AUCS:
        d = math.sqrt(2) * norm.ppf(auc)
        for sc in SIGMA_C:
            diffs = []
            for m in counts:
                n_neg = max(1, round(m * (1 - PREVALENCE) / PREVALENCE))
                r = np.array([_trial(rng, m, n_neg, d, sc, PREVALENCE) for _ in range(reps)])
                diffs.append(100 * (r[:, 1, 1].mean() - r[:, 0, 1].mean()))
            table.append(diffs)
            print(f"   AUC {auc:.2f} sigma_c {sc:.0f}: " + " ".join(f"{v:+8.2f}" for v in diffs))
    worst = np.min(table, axis=0)
    print(f"   {'worst Youden loss':>20}: " + " ".join(f"{v:+8.2f}" for v in worst))
    ok = [m for m, w in zip(counts, worst) if w >= -2.0]
    print(f"   smallest m with a worst-case loss under 2 points: {ok[0] if ok else 'none'} "
          f"(the auto rule uses {MIN_PER_CLASS_FOR_YOUDEN})")


def part_b(reps: int, rng) -> None:
    print(f"\nB. cohorts, 5-fold CV, validation = 15 % of each training fold; auto = Youden when "
          f">= {MIN_PER_CLASS_FOR_YOUDEN} of each class; mean test accuracy / balanced accuracy (%) "
          f"over {reps} folds")
    print(f"   {'bags':>5} {'val pos/neg':>11} {'AUC':>5} {'sigma_c':>7} | {'argmax':>13} | {'youden':>13} | "
          f"{'auto':>13}")
    for n in (60, 200, 1000):
        n_train = n * 4 // 5
        n_val = round(0.15 * n_train)
        n_pos = round(n_val * PREVALENCE)
        n_neg = n_val - n_pos
        for auc in AUCS:
            d = math.sqrt(2) * norm.ppf(auc)
            for sc in SIGMA_C:
                r = 100 * np.array([_trial(rng, n_pos, n_neg, d, sc, PREVALENCE) for _ in range(reps)])
                cells = [f"{r[:, k, 0].mean():5.1f} / {r[:, k, 1].mean():5.1f}" for k in range(3)]
                print(f"   {n:>5} {f'{n_pos}/{n_neg}':>11} {auc:>5.2f} {sc:>7.0f} | " + " | ".join(cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    t0, c0 = time.perf_counter(), time.process_time()
    part_a(args.reps, rng)
    part_b(args.reps, rng)
    print(f"\n{time.perf_counter() - t0:.1f} s wall, {time.process_time() - c0:.1f} s CPU")


if __name__ == "__main__":
    main()
