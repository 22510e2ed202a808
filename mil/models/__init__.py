"""MIL students behind one registry and one contract (docs/ARCHITECTURE.md, "The student contract").

Usage::

    from mil.models import create_model, list_models
    model = create_model("abmil", in_dim=1024, n_classes=2)
    out = model(torch.randn(300, 1024))  # MILOutput: logits [1, 2], bag_feature [1, 512],
                                         # instance_scores [1, 300], extras {...}
    loss = model.training_loss(out, y, F.cross_entropy(out.logits, y))

Importing this package registers every student: abmil, transmil, transmil_mhim, dsmil, clam_sb, clam_mb,
dtfd, meanpool, maxpool.
"""

from ._base import TASKS, BagShapeError, MILModel
from ._registry import (
    ModelInfo,
    ParamCount,
    count_parameters,
    create_model,
    list_models,
    model_info,
    register_model,
)
from .abmil import ABMIL
from .clam import CLAM, CLAMMB, CLAMSB, smooth_top1_svm_loss
from .dsmil import DSMIL
from .dtfd import DTFD
from .nystrom import NystromAttention
from .output import MILOutput
from .pooling import MaxPoolMIL, MeanPoolMIL
from .transmil import TransMIL, borda_fusion, fuse_heads_by_vote
from .transmil_mhim import TransMILMHIM

__all__ = [
    "TASKS",
    "BagShapeError",
    "MILModel",
    "MILOutput",
    "ModelInfo",
    "ParamCount",
    "count_parameters",
    "create_model",
    "list_models",
    "model_info",
    "register_model",
    "ABMIL",
    "TransMIL",
    "TransMILMHIM",
    "DSMIL",
    "CLAM",
    "CLAMSB",
    "CLAMMB",
    "DTFD",
    "MeanPoolMIL",
    "MaxPoolMIL",
    "NystromAttention",
    "borda_fusion",
    "fuse_heads_by_vote",
    "smooth_top1_svm_loss",
]
