"""The official MHIM-MIL cross-validation folds, reproduced (``protocol: paper``).

The official v1 code (main.py ``main`` and dataloader.py ``get_kflod``) builds its folds as:

1. ``seed_torch(seed)`` seeds Python's ``random`` with the run's seed;
2. the label CSV's rows (one per patient, file order) are permuted with ``random.shuffle``;
3. ``sklearn.model_selection.StratifiedKFold(n_splits=k)`` (no shuffling of its own) splits the
   permuted rows by label; fold ``i``'s test rows are its ``i``-th test part. With
   ``--val_ratio 0`` (CAMELYON16) the test fold doubles as validation.

:func:`official_folds` repeats those steps on the manifest's cases in file order, so a manifest
written by ``data_manifests/from_official.py`` from the official label CSV gives the official
folds (3 for CAMELYON16, 4 for TCGA-NSCLC).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np

__all__ = ["official_folds", "OFFICIAL_FOLDS"]

#: Folds of the official runs per dataset (README commands: --cv_fold).
OFFICIAL_FOLDS = {"camelyon16": 3, "tcga_nsclc": 4}


def official_folds(case_ids: Sequence[str], labels: Sequence[str], n_folds: int, seed: int) -> dict[str, int]:
    """Test fold of every case, as the official code assigns it.

    Parameters
    ----------
    case_ids : one id per case, in the label file's row order.
    labels : their labels (any hashable values; StratifiedKFold stratifies on them).
    n_folds : ``--cv_fold``.
    seed : ``--seed``.

    Returns
    -------
    dict case_id -> fold index in ``0..n_folds-1``.
    """
    from sklearn.model_selection import StratifiedKFold

    index = list(range(len(case_ids)))
    random.Random(seed).shuffle(index)  # = random.seed(seed); random.shuffle(index)
    p = np.array([case_ids[i] for i in index], dtype=object)
    y = np.array([str(labels[i]) for i in index], dtype=object)
    fold_of: dict[str, int] = {}
    for k, (_, test) in enumerate(StratifiedKFold(n_splits=n_folds).split(p, y)):
        for i in test:
            fold_of[str(p[i])] = k
    return fold_of
