"""Deep tissue segmentation from local weights: GrandQC's and HEST's published models.

Both run on the slide thumbnail read at the model's native resolution, in 512 x 512 tiles, and
return a tissue mask that then goes through the same contour and area filters as CLAM mode
(:func:`extract.segmentation.segment_mask`), so previews, coordinates and GeoJSON look the same.
Nothing is downloaded: the weights are a file the user passes.

=========  =================================================================================
grandqc    GrandQC tissue detection (Weng et al., Nat. Commun. 2024, cpath-ukk/grandqc):
           ``segmentation_models_pytorch.UnetPlusPlus`` with a ``timm-efficientnet-b0`` encoder,
           2 classes (0 = tissue, 1 = background), tiles of 512 px at 10 um/px, ImageNet
           mean/std on RGB in [0, 1]; the thumbnail is JPEG-compressed at quality 80 first, as
           the model was trained on JPEG images. Weights: ``Tissue_Detection_MPP10.pth``
           (a plain state dict). Needs ``pip install segmentation-models-pytorch``.
hest       HEST tissue segmentation (Jaume et al., NeurIPS 2024, mahmoodlab/HEST):
           ``torchvision.models.segmentation.deeplabv3_resnet50`` with the last classifier
           convolution replaced by ``Conv2d(256, 2, 1)`` (no auxiliary head), 2 classes
           (1 = tissue), tiles of 512 px at 1 um/px (2 um/px in HEST's fast mode), ImageNet
           mean/std. Weights: ``deeplabv3_seg_v4.ckpt`` (a Lightning checkpoint whose
           ``state_dict`` keys start with ``model.``).
=========  =================================================================================

    seg = load_segmenter("hest", "deeplabv3_seg_v4.ckpt", device="cpu")
    mask = seg.predict(rgb)        # rgb at seg.spec.mpp um/px -> bool [h, w]
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import CheckpointError, ConfigError
from .runtime import autocast, autocast_dtype

__all__ = ["SegmenterSpec", "SEGMENTERS", "list_segmenters", "build_segmenter", "load_segmenter", "DeepSegmenter"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class SegmenterSpec:
    """How a published tissue model expects its input, and which output class is tissue."""

    name: str
    mpp: float                      # micrometres per pixel of its input
    tile_px: int                    # side of its input tiles
    tissue_class: int               # argmax index meaning tissue
    jpeg_quality: int | None        # JPEG round trip before inference (what it was trained on)
    weights_file: str               # the published file name, for messages
    build: Callable[[], object]     # -> torch.nn.Module with random weights
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


def _grandqc():
    try:
        import segmentation_models_pytorch as smp
    except ImportError as exc:
        raise ConfigError("--segmenter grandqc needs segmentation-models-pytorch: "
                          "pip install segmentation-models-pytorch (or wsi-pipeline[grandqc])") from exc
    import warnings

    # GrandQC's weights use the "timm-efficientnet-b0" encoder's key names, which smp >= 0.5 calls
    # deprecated in favour of "tu-" encoders with other names: the deprecated one is the right one.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return smp.UnetPlusPlus(encoder_name="timm-efficientnet-b0", encoder_weights=None, classes=2,
                                activation=None)


def _hest():
    from torch import nn
    from torchvision.models.segmentation import deeplabv3_resnet50

    model = deeplabv3_resnet50(weights=None, weights_backbone=None, aux_loss=False)
    model.classifier[4] = nn.Conv2d(256, 2, kernel_size=1, stride=1)
    return model


SEGMENTERS: dict[str, SegmenterSpec] = {
    "grandqc": SegmenterSpec("grandqc", mpp=10.0, tile_px=512, tissue_class=0, jpeg_quality=80,
                             weights_file="Tissue_Detection_MPP10.pth", build=_grandqc),
    "hest": SegmenterSpec("hest", mpp=1.0, tile_px=512, tissue_class=1, jpeg_quality=None,
                          weights_file="deeplabv3_seg_v4.ckpt", build=_hest),
}


def list_segmenters() -> list[str]:
    return sorted(SEGMENTERS)


def _spec(name: str) -> SegmenterSpec:
    if name not in SEGMENTERS:
        raise ConfigError(f"The 'segmenter' parameter must be clam or one of {', '.join(list_segmenters())}. "
                          f"Got {name!r} instead.")
    return SEGMENTERS[name]


def build_segmenter(name: str):
    """The published architecture with random weights (``torch.nn.Module``)."""
    return _spec(name).build()


def _state_dict(path: Path) -> dict:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        # A Lightning checkpoint may pickle its hyper-parameters; it is the user's own local file.
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise CheckpointError(f"{path}: not a PyTorch checkpoint ({type(exc).__name__}: {exc})") from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    out = {}
    for key, value in obj.items():
        if "aux_classifier" in key:  # HEST trains with an auxiliary head it does not use
            continue
        for prefix in ("model.", "module."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


class DeepSegmenter:
    """A loaded tissue model; :meth:`predict` maps an RGB image at ``spec.mpp`` to a tissue mask."""

    def __init__(self, model, spec: SegmenterSpec, device):
        self.model, self.spec, self.device = model, spec, device

    def predict(self, rgb: np.ndarray, batch_size: int = 8) -> np.ndarray:
        """bool ``[h, w]`` tissue mask of a uint8 RGB ``[h, w, 3]`` image at ``spec.mpp`` um/px.

        The image is cut into ``tile_px`` tiles (white padding on the right and bottom edges),
        classified tile by tile, and the argmax maps are stitched.
        """
        import cv2
        import torch

        image = np.ascontiguousarray(np.asarray(rgb)[..., :3])
        if image.ndim != 3 or image.dtype != np.uint8:
            raise ConfigError(f"The 'rgb' parameter of predict must be uint8 [h, w, 3]. Got {image.dtype} {image.shape} instead.")
        if self.spec.jpeg_quality:
            ok, buf = cv2.imencode(".jpg", image, [int(cv2.IMWRITE_JPEG_QUALITY), self.spec.jpeg_quality])
            image = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if ok else image
        h, w = image.shape[:2]
        t = self.spec.tile_px
        ph, pw = -(-h // t) * t, -(-w // t) * t
        padded = np.full((ph, pw, 3), 255, np.uint8)
        padded[:h, :w] = image
        tiles = padded.reshape(ph // t, t, pw // t, t, 3).transpose(0, 2, 1, 3, 4).reshape(-1, t, t, 3)
        mean = torch.tensor(self.spec.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.spec.std, device=self.device).view(1, 3, 1, 1)
        labels = np.zeros((len(tiles), t, t), np.uint8)
        half = autocast_dtype(self.device, "auto", preferred="fp16")  # fp16 on CUDA, fp32 on the CPU
        with torch.inference_mode(), autocast(self.device, half):
            for i in range(0, len(tiles), batch_size):
                x = torch.from_numpy(tiles[i:i + batch_size]).to(self.device, non_blocking=True)
                x = (x.permute(0, 3, 1, 2).float() / 255.0 - mean) / std
                out = self.model(x)
                logits = out["out"] if isinstance(out, dict) else out
                labels[i:i + batch_size] = (logits.argmax(1) == self.spec.tissue_class).to(torch.uint8).cpu().numpy()
        mask = labels.reshape(ph // t, pw // t, t, t).transpose(0, 2, 1, 3).reshape(ph, pw)
        return mask[:h, :w].astype(bool)


def load_segmenter(name: str, weights: str | os.PathLike | None, device="cpu") -> DeepSegmenter:
    """The named model with the weights of a local file, in eval mode on ``device``.

    Raises
    ------
    ConfigError
        No weights given or the file is missing (nothing is downloaded), or a package is missing.
    CheckpointError
        The file is not a checkpoint of this architecture (missing/unexpected keys named).
    """
    import torch

    spec = _spec(name)
    if weights is None or not str(weights).strip():
        raise ConfigError(f"--segmenter {name} needs --weights PATH: a local copy of {spec.weights_file} "
                          "(nothing is downloaded)")
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ConfigError(f"--weights {path}: file not found (the {name} segmenter needs a local {spec.weights_file})")
    model = spec.build()
    state = _state_dict(path)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{path}: not {name} weights: {len(result.missing_keys)} missing key(s) "
            f"({', '.join(result.missing_keys[:3])}), {len(result.unexpected_keys)} unexpected "
            f"({', '.join(result.unexpected_keys[:3])})"
        )
    device = torch.device(device)
    return DeepSegmenter(model.to(device).eval(), spec, device)
