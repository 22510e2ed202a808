"""Checkpoint layouts: the official MHIM-MIL state dicts mapped onto our students.

The official v1 code saves ``MHIM`` modules whose keys are ``patch_to_emb.*`` (instance
embedding), ``online_encoder.*`` (the aggregator) and ``predictor.*`` (bag classifier); its
standalone baselines use ``_fc1``/``_fc2`` (TransMIL) and ``i_classifier``/``b_classifier``
(DSMIL). :func:`from_official_layout` renames (and, for DSMIL's ``Conv1d`` bag classifier,
reshapes) those tensors into our layout; loading then stays strict, so every tensor of the
model must be filled and every tensor of the file used (:func:`mil.mhim.MHIM.init_teacher_from`
names whatever is left over).

Key maps (official -> ours), read from the official v1 modules (mhim.py, datten.py, satten.py,
emb_position.py, transmil.py, dsmil.py) and checked on a released C16 AB-MIL teacher:

==============================================  =================================
``patch_to_emb.0`` / ``_fc1.0`` /               ``feature.0``
``i_classifier.embed.0``
``predictor`` / ``_fc2``                         ``classifier``
``online_encoder.attention.attention.0``         ``attention.branch_a.0`` (AB-MIL)
``online_encoder.attention.attention.2``         ``attention.out``
``online_encoder.attention.attention_a.0``       ``attention.branch_a.0`` (gated)
``online_encoder.attention.attention_b.0``       ``attention.branch_b.0``
``online_encoder.attention.attention_c``         ``attention.out``
``online_encoder.{cls_token,layer1,layer2,norm}``  the same names (TransMIL)
``online_encoder.pos_embedding.proj{,1,2}`` /    ``ppeg.proj{7,5,3}``
``pos_layer.proj{,1,2}``
``online_encoder.i_classifier.0`` /              ``instance_classifier`` (DSMIL)
``i_classifier.fc.0``
``[online_encoder.]b_classifier.q.{0,2}``        ``query.{0,2}``
``[online_encoder.]b_classifier.v.1``            ``value.1``
``[online_encoder.]b_classifier.fcc``            ``classifier`` (weight [C, C, E] -> [C, C*E])
==============================================  =================================
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = ["OFFICIAL_PREFIXES", "is_official_layout", "from_official_layout"]

#: Top-level key prefixes that only the official code's checkpoints use.
OFFICIAL_PREFIXES = ("patch_to_emb.", "online_encoder.", "predictor.", "_fc1.", "_fc2.", "pos_layer.",
                     "i_classifier.", "b_classifier.")

_RULES: tuple[tuple[str, str], ...] = (
    (r"^(patch_to_emb|_fc1|i_classifier\.embed)\.0\.", "feature.0."),
    (r"^(predictor|_fc2)\.", "classifier."),
    (r"^online_encoder\.attention\.attention\.0\.", "attention.branch_a.0."),
    (r"^online_encoder\.attention\.attention\.2\.", "attention.out."),
    (r"^online_encoder\.attention\.attention_a\.0\.", "attention.branch_a.0."),
    (r"^online_encoder\.attention\.attention_b\.0\.", "attention.branch_b.0."),
    (r"^online_encoder\.attention\.attention_c\.", "attention.out."),
    (r"^(online_encoder\.pos_embedding|pos_layer)\.proj\.", "ppeg.proj7."),
    (r"^(online_encoder\.pos_embedding|pos_layer)\.proj1\.", "ppeg.proj5."),
    (r"^(online_encoder\.pos_embedding|pos_layer)\.proj2\.", "ppeg.proj3."),
    (r"^online_encoder\.(cls_token|layer1\.|layer2\.|norm\.)", r"\1"),
    (r"^(online_encoder\.i_classifier\.0|i_classifier\.fc\.0)\.", "instance_classifier."),
    (r"^(online_encoder\.)?b_classifier\.q\.", "query."),
    (r"^(online_encoder\.)?b_classifier\.v\.", "value."),
    (r"^(online_encoder\.)?b_classifier\.fcc\.", "classifier."),
)


def is_official_layout(state_dict: Mapping[str, Any]) -> bool:
    """True when any key has an official-only prefix (``patch_to_emb.``, ``online_encoder.``, ...)."""
    return any(str(k).startswith(OFFICIAL_PREFIXES) for k in state_dict)


def _rename(key: str) -> str:
    for pattern, repl in _RULES:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key  # left as it is: the strict load names it as unexpected


def from_official_layout(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """An official-layout state dict in our key names; any other state dict unchanged.

    Keys no rule covers keep their official name, so a strict load reports them ("unexpected")
    next to our keys they left empty ("missing"). DSMIL's ``Conv1d(C, C, E)`` bag-classifier
    weight becomes the equivalent ``Linear(C*E, C)`` weight.
    """
    if not is_official_layout(state_dict):
        return dict(state_dict)
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        new = _rename(str(key))
        if new == "classifier.weight" and "b_classifier.fcc." in str(key) and getattr(value, "dim", lambda: 0)() == 3:
            value = value.reshape(value.shape[0], -1)  # Conv1d over the C class vectors = Linear on their concat
        if new in out:
            raise KeyError(f"two official keys map to {new!r} (the second is {key!r})")
        out[new] = value
    return out
