"""The student contract (docs/ARCHITECTURE.md, "The student contract") as a base class.

Every MIL student subclasses :class:`MILModel` and implements ``embed``, ``_aggregate`` and
``_instance_class_prob``; the base class owns input checking (2-D bags, empty bags, feature
size, padding masks), so a trainer or MHIM can call ``forward``, ``aggregate`` and
``instance_class_prob`` on any student the same way. The training loop combines losses through
one hook, :meth:`MILModel.training_loss`, and so needs no per-model branches.
"""

from __future__ import annotations

import abc
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from extract.errors import BagError, ConfigError
from extract.runtime import check_int
from mil.evaluation import TASKS

from .output import MILOutput

__all__ = ["MILModel", "BagShapeError", "TASKS"]

# TASKS (mil.evaluation): a ``survival`` student outputs one logit per time bin and skips every
# classification-only auxiliary loss.


class BagShapeError(BagError, ValueError):
    """A bag (or its padding mask) handed to a MIL model has the wrong shape or no instances."""


# --------------------------------------------------------------------------------------------
# parameter checks with one message template (scikit-learn style)


def check_float(
    name: str, value: Any, owner: str, *, low: float, high: float, high_open: bool = False
) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = low <= value < high if high_open else low <= value <= high
    if not ok:
        interval = f"[{low}, {high})" if high_open else f"[{low}, {high}]"
        raise ConfigError(
            f"The {name!r} parameter of {owner} must be a float in the range {interval}. "
            f"Got {value!r} instead."
        )
    return float(value)


def check_choice(name: str, value: Any, owner: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ConfigError(
            f"The {name!r} parameter of {owner} must be one of {options}. Got {value!r} instead."
        )
    return value


def check_bool(name: str, value: Any, owner: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(
            f"The {name!r} parameter of {owner} must be a bool. Got {value!r} instead."
        )
    return value


# --------------------------------------------------------------------------------------------
# small tensor helpers shared by the students


#: Activations of the instance embedding ``Linear -> act -> Dropout`` (``act`` of every student):
#: ReLU as MHIM-MIL v1 and CLAM, GELU as the MHIM-v2 configs (``act: gelu``).
EMBED_ACTIVATIONS = ("relu", "gelu")


def embedding_activation(name: str) -> nn.Module:
    """The embedding's activation module for ``name`` in :data:`EMBED_ACTIVATIONS`."""
    return nn.GELU() if name == "gelu" else nn.ReLU()


def init_weights(module: nn.Module) -> None:
    """Xavier-normal weights, zero biases for Linear/Conv; LayerNorm to identity.

    The initialisation the official MHIM-MIL students use (after CLAM), so baselines trained
    here start where the paper's did.
    """
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor | None, dim: int = -1) -> torch.Tensor:
    """Softmax over ``dim`` ignoring positions where ``mask`` (broadcastable) is False."""
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return logits.softmax(dim=dim)


def fill_invalid(x: torch.Tensor, mask: torch.Tensor | None, value: float) -> torch.Tensor:
    """``x`` [B, N] with padded positions (mask False) set to ``value``."""
    return x if mask is None else x.masked_fill(~mask, value)


def class_confidence(logits: torch.Tensor) -> torch.Tensor:
    """``max_c softmax_c(logits)`` over the last axis; for one logit, ``max(sigmoid, 1 - sigmoid)``.

    The single-logit case is the binary model's equivalent of the top softmax probability, so
    ``n_classes=1`` models rank instances the way ``n_classes=2`` models do.
    """
    if logits.shape[-1] == 1:
        p = torch.sigmoid(logits[..., 0])
        return torch.maximum(p, 1.0 - p)
    return logits.softmax(dim=-1).amax(dim=-1)


def bag_classification_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on class indices; binary cross-entropy when the model has one logit."""
    if logits.shape[-1] == 1:
        return F.binary_cross_entropy_with_logits(
            logits[:, 0], target.reshape(-1).to(logits.dtype)
        )
    return F.cross_entropy(logits, target.reshape(-1).long())


# --------------------------------------------------------------------------------------------


class MILModel(nn.Module, abc.ABC):
    """Base class of every MIL student.

    Subclasses implement

    - ``embed(x)``: ``[B, N, D] -> [B, N, H]`` per-instance embedding;
    - ``_aggregate(h, mask) -> MILOutput`` (``mask`` is None or [B, N] bool with at least
      one True per row; None means every instance is valid);
    - ``_instance_class_prob(h, mask) -> [B, N]``;
    - optionally ``auxiliary_loss(output, target)`` and ``bag_loss_weight``.

    and set ``self.classifier`` to the final bag ``nn.Linear``.

    Parameters
    ----------
    in_dim : int
        Instance feature size ``D`` (1024 for ResNet-50-trunc, 512/768/1536 for others).
    n_classes : int
        Number of outputs ``C`` (classes, or time bins for survival). 1 means one binary logit.
    task : {'classification', 'survival'}
        Survival models output one logit per time bin and have no auxiliary loss.
    """

    #: True when ``aggregate`` handles padded batches (a mask with False entries) natively;
    #: the others take padded batches only as single bags and say so.
    supports_padding: ClassVar[bool] = True
    #: Weight of the trainer's bag loss when the auxiliary loss is present (see training_loss).
    bag_loss_weight: float = 1.0

    classifier: nn.Linear

    def __init__(self, in_dim: int, n_classes: int, *, task: str = "classification") -> None:
        super().__init__()
        owner = type(self).__name__
        self.in_dim = check_int("in_dim", in_dim, owner)
        self.n_classes = check_int("n_classes", n_classes, owner)
        self.task = check_choice("task", task, owner, TASKS)

    # ---------------------------------------------------------------- contract entry points

    @abc.abstractmethod
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, N, D] -> [B, N, H]`` per-instance embedding."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        """Run the student on a bag batch.

        Parameters
        ----------
        x : Tensor [B, N, D] or [N, D]
            Instance features; a 2-D input is one bag.
        mask : Tensor [B, N] (or [N]) of bool, optional
            True marks a real instance, False padding. None means all instances are real.
        """
        x, mask = self._check_bag(x, mask, self.in_dim, "instance features")
        return self._aggregate(self.embed(x), mask)

    def aggregate(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        """Pool embedded instances ``h`` [B, N, H] (or [N, H]) into bag outputs."""
        h, mask = self._check_bag(h, mask, None, "instance embeddings")
        return self._aggregate(h, mask)

    def instance_class_prob(
        self, h: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """MHIM-v2 class-aware instance probability ``[B, N]`` from embeddings ``h`` [B, N, H].

        Padded positions hold 0. What each student computes is in its class docstring.
        """
        h, mask = self._check_bag(h, mask, None, "instance embeddings")
        return fill_invalid(self._instance_class_prob(h, mask), mask, 0.0)

    def auxiliary_loss(self, output: MILOutput, target: torch.Tensor) -> torch.Tensor | None:
        """The student's own extra loss term, already weighted, or None.

        Called only for ``task='classification'`` (see :meth:`training_loss`); ``target`` is
        [B] class indices (0/1 floats or ints when ``n_classes == 1``).
        """
        return None

    def training_loss(
        self, output: MILOutput, target: torch.Tensor, task_loss: torch.Tensor
    ) -> torch.Tensor:
        """Combine the trainer's bag loss with the student's auxiliary loss.

        ``task_loss`` is the trainer's loss on ``output.logits`` (CE, survival NLL, ...). Returns
        ``bag_loss_weight * task_loss + auxiliary_loss(output, target)`` when the student has an
        auxiliary loss for this task, else ``task_loss`` unchanged. Survival models never add
        one. This is the only loss hook a training loop needs, for every student.
        """
        if self.task != "classification":
            return task_loss
        aux = self.auxiliary_loss(output, target)
        if aux is None:
            return task_loss
        return self.bag_loss_weight * task_loss + aux

    def class_probabilities(self, output: MILOutput) -> torch.Tensor:
        """Class probabilities [B, C] reported at validation and test: ``softmax(logits)``.

        A student whose published evaluation combines several heads overrides this (DSMIL v1:
        the mean of the bag-stream and max-instance softmaxes).
        """
        return output.logits.float().softmax(dim=-1)

    @property
    def embed_dim(self) -> int:
        """Size ``H`` of the per-instance embedding."""
        return self._embed_dim

    # ---------------------------------------------------------------- to implement

    @abc.abstractmethod
    def _aggregate(self, h: torch.Tensor, mask: torch.Tensor | None) -> MILOutput:
        """Pool embeddings ``[B, N, H]`` (``mask`` [B, N] True = valid) into a MILOutput."""

    @abc.abstractmethod
    def _instance_class_prob(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """MHIM-v2 class-aware probability ``[B, N]`` of each instance."""

    # ---------------------------------------------------------------- input checks

    def _check_bag(
        self, x: torch.Tensor, mask: torch.Tensor | None, dim: int | None, what: str
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        name = type(self).__name__
        if not isinstance(x, torch.Tensor):
            raise BagShapeError(f"{name} expects {what} as a torch.Tensor; got {type(x).__name__}.")
        if x.dim() == 2:
            x = x.unsqueeze(0)
            if mask is not None and isinstance(mask, torch.Tensor) and mask.dim() == 1:
                mask = mask.unsqueeze(0)
        if x.dim() != 3:
            raise BagShapeError(
                f"{name} expects {what} shaped [B, N, D] or [N, D]; got shape {tuple(x.shape)}."
            )
        b, n, d = x.shape
        if b == 0 or n == 0:
            raise BagShapeError(
                f"{name} got an empty bag ({what} shaped {tuple(x.shape)}): a bag needs at least "
                "one instance. Check the slide's tissue segmentation and patch extraction, and "
                "drop slides with no patches from the manifest."
            )
        if dim is not None and d != dim:
            raise BagShapeError(
                f"{name} was built for {dim}-d instance features but got {d}-d {what}: the bags "
                "come from a different backbone than the model expects; rebuild the model with "
                f"in_dim={d} or use bags of the matching backbone."
            )
        if dim is None and d != self.embed_dim:
            raise BagShapeError(
                f"{name} expects {self.embed_dim}-d {what} (the output of embed()); got {d}-d."
            )
        if x.is_floating_point():
            param = next(self.parameters())
            if x.dtype != param.dtype and not torch.is_autocast_enabled():
                x = x.to(param.dtype)  # bags are often stored as float16
        else:
            raise BagShapeError(f"{name} expects floating-point {what}; got dtype {x.dtype}.")
        if mask is not None:
            mask = self._check_mask(mask, b, n)
        return x, mask

    def _check_mask(self, mask: torch.Tensor, b: int, n: int) -> torch.Tensor | None:
        name = type(self).__name__
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise BagShapeError(
                f"{name} expects the padding mask as a bool tensor (True = real instance); "
                f"got {type(mask).__name__ if not isinstance(mask, torch.Tensor) else mask.dtype}."
            )
        if tuple(mask.shape) != (b, n):
            raise BagShapeError(
                f"{name} expects a padding mask shaped [B, N] = {(b, n)}; got {tuple(mask.shape)}."
            )
        if mask.all():
            return None  # nothing padded: take the exact unpadded path
        empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise BagShapeError(
                f"{name} got bag(s) {empty} of the batch with no real instance (mask all False): "
                "a bag needs at least one instance."
            )
        if not self.supports_padding:
            raise BagShapeError(
                f"{name} does not support padded batches (a mask with False entries); "
                "pass bags one at a time (batch size 1, no padding)."
            )
        return mask
