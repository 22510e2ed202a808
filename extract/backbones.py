"""Patch encoders: a timm-style registry of feature extractors with their preprocessing.

    model = create_backbone("resnet50_trunc")                 # ImageNet V1 weights (CLAM's)
    model = create_backbone("resnet50_trunc", weights="random")
    model = create_backbone("timm:vit_small_patch16_224", weights="/ckpt/uni.safetensors")
    cfg = model.backbone_config      # BackboneConfig(name, feature_dim, input_size, mean, std, ...)
    x = preprocess_on_device(uint8_batch_on_gpu, cfg, torch.bfloat16)   # [B, 3, S, S]
    feats = model(x)                                          # [B, feature_dim]

Every model takes float tensors that are already resized and normalised ``[B, 3, S, S]`` and
returns ``[B, feature_dim]``; :func:`preprocess_on_device` does the resize and normalisation
on the accelerator, so the reader only ships uint8 pixels.

Weights are never silently random: ``weights='imagenet'`` downloads through torchvision/timm's
own cache and raises :class:`ConfigError` (saying how to pass a local file) when that fails;
a local checkpoint is loaded strictly and identified by its sha256 in ``weights_id``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .errors import CheckpointError, ConfigError

__all__ = [
    "BackboneConfig",
    "register_backbone",
    "create_backbone",
    "list_backbones",
    "is_backbone",
    "preprocess_on_device",
    "load_state_dict_file",
    "load_strict",
    "file_sha256",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
TIMM_PREFIX = "timm:"

# Keys under which training scripts commonly nest the real state dict.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network")
# Prefixes that wrappers (DataParallel, SSL frameworks) put in front of every key.
_STRIP_PREFIXES = ("module.", "backbone.")


@dataclass(frozen=True)
class BackboneConfig:
    """What travels with a backbone's weights: output size and the preprocessing it expects.

    Attributes
    ----------
    name : str
        Registry name (``resnet50_trunc``, ``timm:vit_small_patch16_224``, ...).
    feature_dim : int
        Length of the feature vector the model returns per patch.
    input_size : int
        Side ``S`` of the square input ``[B, 3, S, S]`` in pixels.
    mean, std : tuple of 3 floats
        Per-channel normalisation for RGB values scaled to [0, 1].
    weights_id : str
        ``'imagenet'``, ``'random'`` or ``'sha256:<hex>'`` of the local checkpoint file.
    interpolation : str
        Resize mode used by :func:`preprocess_on_device` (``'bilinear'`` or ``'bicubic'``,
        always antialiased).
    """

    name: str
    feature_dim: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_id: str
    interpolation: str = "bilinear"


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------
# A builder: builder(weights, **kwargs) -> nn.Module with `backbone_config` attached, where
# weights is 'imagenet', 'random' or a resolved Path (checked to exist) to a local checkpoint.
Builder = Callable[..., nn.Module]
_REGISTRY: dict[str, Builder] = {}


def register_backbone(fn: Builder) -> Builder:
    """Register a builder under its function name (timm's convention). Duplicates raise."""
    name = fn.__name__
    if name in _REGISTRY:
        raise ValueError(f"backbone {name!r} is already registered ({_REGISTRY[name].__module__})")
    _REGISTRY[name] = fn
    return fn


def list_backbones() -> list[str]:
    """Registered backbone names, sorted; any ``timm:<model>`` name is accepted on top."""
    return sorted(_REGISTRY)


def is_backbone(name: str) -> bool:
    return name in _REGISTRY or (isinstance(name, str) and name.startswith(TIMM_PREFIX) and len(name) > len(TIMM_PREFIX))


def create_backbone(name: str, weights: str | os.PathLike = "imagenet", **kwargs) -> nn.Module:
    """Build a patch encoder in eval mode with its :class:`BackboneConfig` attached.

    Parameters
    ----------
    name : str
        One of :func:`list_backbones` or ``'timm:<any timm model name>'``.
    weights : {'imagenet', 'random'} or path
        ``'imagenet'``: the reference weights, downloaded through torchvision/timm's cache
        (a :class:`ConfigError` explains how to pass a local file when that is impossible);
        ``'random'``: a fixed (seed 0) random init, the same in every process (tests, smoke runs);
        a ``.pth/.pt/.bin/.safetensors`` path: loaded strictly (wrappers such as
        ``{'state_dict': ...}`` and ``module.``/``backbone.`` prefixes are undone).
    **kwargs
        Passed to the builder; arguments left as ``None`` are dropped so an unset CLI flag
        never overrides a builder's default.

    Returns
    -------
    nn.Module
        ``model(x [B, 3, S, S] float) -> [B, feature_dim]``; ``model.backbone_config``.
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    resolved = _resolve_weights(weights)
    if isinstance(name, str) and name.startswith(TIMM_PREFIX):
        model_name = name[len(TIMM_PREFIX):]
        if not model_name:
            raise ConfigError(f"The 'name' parameter of create_backbone must name a timm model after 'timm:'. Got {name!r} instead.")
        build = functools.partial(_build_timm, model_name, resolved, **kwargs)
    elif name in _REGISTRY:
        build = functools.partial(_REGISTRY[name], resolved, **kwargs)
    else:
        raise ConfigError(
            f"The 'name' parameter of create_backbone must be one of {list_backbones()} or "
            f"'timm:<model name>'. Got {name!r} instead."
        )
    if resolved == "random":
        # 'random' must mean the same weights in every process and rerun (shards, GPUs,
        # resumes), or the bags of one folder would not share a feature space.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = build()
    else:
        model = build()
    model.eval()
    logger.info("backbone %s: %d-d features, weights %s", model.backbone_config.name,
                model.backbone_config.feature_dim, model.backbone_config.weights_id)
    return model


def _resolve_weights(weights: str | os.PathLike) -> str | Path:
    if isinstance(weights, str) and weights in ("imagenet", "random"):
        return weights
    if isinstance(weights, (str, os.PathLike)):
        path = Path(weights).expanduser()
        if path.suffix.lower() in CHECKPOINT_SUFFIXES:
            if not path.is_file():
                raise ConfigError(f"weights file not found: {path}; check the --weights path")
            return path
    raise ConfigError(
        "The 'weights' parameter of create_backbone must be 'imagenet', 'random' or a path to a "
        f"{'/'.join(CHECKPOINT_SUFFIXES)} file. Got {weights!r} instead."
    )


def _weights_id(weights: str | Path) -> str:
    return f"sha256:{file_sha256(weights)}" if isinstance(weights, Path) else weights


def _attach(model: nn.Module, config: BackboneConfig) -> nn.Module:
    model.backbone_config = config
    return model


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes (streamed)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``{key: tensor}`` on the CPU.

    ``.safetensors`` through safetensors; anything else through ``torch.load`` with
    ``weights_only=True`` (no arbitrary code). Common wrappers are unwrapped and the
    ``module.``/``backbone.`` prefixes stripped.
    """
    path = Path(path)
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch/safetensors raise many types for unreadable files
        hint = ""
        if isinstance(exc, pickle.UnpicklingError):
            hint = (
                "; it stores Python objects besides tensors, which are not unpickled for safety: "
                "re-save only the weights once, e.g. torch.save(torch.load(p, weights_only=False)"
                "['model'], 'clean.pth'), if you trust the file"
            )
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # torch colours its messages
        first_line = (text.splitlines() or [""])[0][:300]
        raise CheckpointError(
            f"{path}: cannot read this checkpoint ({type(exc).__name__}: {first_line}); expected a "
            f"PyTorch state dict (.pth/.pt/.bin) or a .safetensors file{hint}"
        ) from exc
    for _ in range(3):  # {'model': {'state_dict': ...}} happens
        if isinstance(obj, dict):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
            if inner is not None and not _is_tensor_dict(obj):
                obj = inner
                continue
        break
    if not _is_tensor_dict(obj):
        raise CheckpointError(
            f"{path}: no state dict of tensors found (top-level keys: {_preview(list(obj) if isinstance(obj, dict) else [type(obj).__name__])}); "
            f"expected a dict of tensors, possibly under one of {list(_WRAPPER_KEYS)}"
        )
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        for prefix in _STRIP_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def _is_tensor_dict(obj) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _preview(keys: list[str], limit: int = 12) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}] ({len(keys)})"


def load_strict(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    source: str,
    ignore_prefixes: tuple[str, ...] = (),
) -> None:
    """Load ``state`` into ``model`` strictly, except keys under ``ignore_prefixes``.

    Raises :class:`CheckpointError` listing missing, unexpected and shape-mismatched keys.
    """
    state = {k: v for k, v in state.items() if not k.startswith(ignore_prefixes)}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys {_preview(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_preview(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches {_preview(mismatched)}")
        raise CheckpointError(
            f"{source}: checkpoint does not match {type(model).__name__} "
            f"({'; '.join(parts)}); pass the checkpoint of this architecture or pick the "
            "backbone it was trained with"
        )
    model.load_state_dict(state, strict=True)


def _download_error(name: str, what: str, exc: BaseException) -> ConfigError:
    return ConfigError(
        f"cannot obtain the ImageNet weights of backbone {name!r} ({what}: "
        f"{type(exc).__name__}: {exc}); this machine looks offline. Download them on a "
        "connected machine and pass the file with --weights PATH (weights='PATH' in Python; "
        ".pth/.pt/.bin/.safetensors), or copy them into the torch hub / Hugging Face cache, "
        "or use --weights random for a smoke test"
    )


# ---------------------------------------------------------------------------------------------
# torchvision ResNets
# ---------------------------------------------------------------------------------------------
class ResNet50Trunc(nn.Module):
    """torchvision ResNet-50 up to and including ``layer3``, then global average pooling.

    The submodules keep torchvision's names (``conv1, bn1, relu, maxpool, layer1..3``), so a
    full torchvision ``resnet50`` state dict loads once ``layer4.*``/``fc.*`` are dropped.
    Output: ``[B, 1024]`` (layer3 has 1024 channels at stride 16).
    """

    feature_dim = 1024

    def __init__(self):
        super().__init__()
        from torchvision.models import resnet50

        base = resnet50(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = base.conv1, base.bn1, base.relu, base.maxpool
        self.layer1, self.layer2, self.layer3 = base.layer1, base.layer2, base.layer3
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(self.pool(x), 1)


def _torchvision_state(name: str, enum_name: str) -> dict[str, torch.Tensor]:
    """The torchvision ImageNet state dict via torchvision's own download + cache."""
    import torchvision.models as tvm

    weights_enum = getattr(tvm, enum_name).IMAGENET1K_V1
    try:
        return weights_enum.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError, ValueError) as exc:  # URLError is an OSError
        raise _download_error(name, weights_enum.url, exc) from exc


def _resnet_weights(model: nn.Module, name: str, enum_name: str, weights: str | Path,
                    ignore: tuple[str, ...]) -> None:
    if weights == "random":
        return
    if weights == "imagenet":
        load_strict(model, _torchvision_state(name, enum_name), f"torchvision {enum_name}.IMAGENET1K_V1", ignore)
    else:
        load_strict(model, load_state_dict_file(weights), str(weights), ignore)


def _resnet_config(name: str, dim: int, weights: str | Path) -> BackboneConfig:
    return BackboneConfig(name, dim, 224, IMAGENET_MEAN, IMAGENET_STD, _weights_id(weights))


@register_backbone
def resnet50_trunc(weights: str | Path = "imagenet") -> nn.Module:
    """CLAM's baseline: ResNet-50 (torchvision ImageNet V1) truncated after layer3 -> 1024-d.

    Checkpoints are full torchvision ``resnet50`` state dicts (``layer4.*``/``fc.*`` ignored)
    or this module's own state dict.
    """
    model = ResNet50Trunc()
    _resnet_weights(model, "resnet50_trunc", "ResNet50_Weights", weights, ("layer4.", "fc."))
    return _attach(model, _resnet_config("resnet50_trunc", 1024, weights))


def _torchvision_resnet(name: str, builder: str, enum_name: str, dim: int, weights) -> nn.Module:
    import torchvision.models as tvm

    model = getattr(tvm, builder)(weights=None)
    model.fc = nn.Identity()
    _resnet_weights(model, name, enum_name, weights, ("fc.",))
    return _attach(model, _resnet_config(name, dim, weights))


@register_backbone
def resnet50(weights: str | Path = "imagenet") -> nn.Module:
    """Full torchvision ResNet-50 without ``fc`` -> 2048-d."""
    return _torchvision_resnet("resnet50", "resnet50", "ResNet50_Weights", 2048, weights)


@register_backbone
def resnet18(weights: str | Path = "imagenet") -> nn.Module:
    """torchvision ResNet-18 without ``fc`` -> 512-d."""
    return _torchvision_resnet("resnet18", "resnet18", "ResNet18_Weights", 512, weights)


# ---------------------------------------------------------------------------------------------
# timm
# ---------------------------------------------------------------------------------------------
def _build_timm(model_name: str, weights: str | Path, **kwargs) -> nn.Module:
    import timm

    name = TIMM_PREFIX + model_name
    if not timm.is_model(model_name):
        raise ConfigError(
            f"The 'name' parameter of create_backbone names an unknown timm model {model_name!r}; "
            "see timm.list_models() for valid names (optionally with a '.tag')."
        )
    if weights == "imagenet":
        # timm only warns and keeps random weights when a model has no pretrained source.
        cfg = timm.models.get_pretrained_cfg(model_name)
        if cfg is None or not (cfg.url or cfg.hf_hub_id or cfg.file):
            raise ConfigError(
                f"timm model {model_name!r} has no downloadable pretrained weights; pass a "
                "local checkpoint with --weights PATH or use --weights random"
            )
        try:
            model = timm.create_model(model_name, pretrained=True, num_classes=0, **kwargs)
        except Exception as exc:  # HF hub / urllib raise many different types when offline
            raise _download_error(name, cfg.hf_hub_id or cfg.url, exc) from exc
    else:
        model = timm.create_model(model_name, pretrained=False, num_classes=0, **kwargs)
        if isinstance(weights, Path):
            classifier = model.pretrained_cfg.get("classifier") or ()
            heads = (classifier,) if isinstance(classifier, str) else tuple(classifier)
            # num_classes=0 removed the classifier; a classification checkpoint's head is
            # the only thing allowed to be left over.
            load_strict(model, load_state_dict_file(weights), str(weights), tuple(h + "." for h in heads))
    data = timm.data.resolve_data_config({}, model=model)
    _, height, width = data["input_size"]
    if height != width:
        raise ConfigError(f"timm model {model_name!r} wants a non-square input {height}x{width}; only square inputs are supported")
    interpolation = data.get("interpolation", "bilinear")
    config = BackboneConfig(
        name=name,
        feature_dim=int(model.num_features),
        input_size=int(height),
        mean=tuple(float(v) for v in data["mean"]),
        std=tuple(float(v) for v in data["std"]),
        weights_id=_weights_id(weights),
        interpolation=interpolation if interpolation in ("bilinear", "bicubic") else "bilinear",
    )
    return _attach(model, config)


# ---------------------------------------------------------------------------------------------
# Preprocessing on the accelerator
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=32)
def _norm_constants(device: str, mean: tuple, std: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean*255`` and ``std*255`` as ``[1, 3, 1, 1]`` tensors on ``device``, made once.

    Building them per batch would be a blocking host-to-device copy that waits for the
    previous batch's forward pass and serialises reading with the model.
    """
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    return m.to(device), s.to(device)


def preprocess_on_device(
    batch: torch.Tensor, config: BackboneConfig, out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """uint8 patches -> the model's normalised input, computed where ``batch`` lives.

    Parameters
    ----------
    batch : uint8 tensor ``[B, H, W, 3]``
        RGB patches (already on the target device; ``H``/``W`` any size).
    config : BackboneConfig
        Supplies ``input_size``, ``mean``, ``std`` and ``interpolation``.
    out_dtype : torch.dtype
        dtype of the result (e.g. ``torch.bfloat16`` under autocast).

    Returns
    -------
    tensor ``[B, 3, S, S]`` of ``out_dtype`` in channels_last memory format: resized with
    antialiasing when ``H, W != S`` (in float32), then ``(x / 255 - mean) / std``.
    """
    if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
        raise ConfigError(
            "The 'batch' parameter of preprocess_on_device must be a uint8 tensor [B, H, W, 3]. "
            f"Got {batch.dtype} {tuple(batch.shape)} instead."
        )
    size = int(config.input_size)
    x = batch.permute(0, 3, 1, 2).float()
    if x.shape[-2:] != (size, size) and x.shape[0] > 0:
        x = torch.nn.functional.interpolate(
            x, size=(size, size), mode=config.interpolation, align_corners=False, antialias=True
        )
    mean, std = _norm_constants(str(x.device), tuple(config.mean), tuple(config.std))
    x = (x - mean) / std
    return x.to(dtype=out_dtype, memory_format=torch.channels_last)
