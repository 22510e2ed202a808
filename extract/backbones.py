"""Patch encoders: a timm-style registry of feature extractors with their preprocessing.

    list_backbones()                                          # names; imports neither torch nor timm
    backbone_card("uni")                                      # EncoderCard: dim, params, geometry, licence, file
    model = create_backbone("resnet50_trunc")                 # ImageNet V1 weights (CLAM's)
    model = create_backbone("uni", weights="/models/uni")     # a file or the folder of a hub snapshot
    model = create_backbone("timm:vit_small_patch16_224", weights="random", img_size=256)
    model = create_backbone("gigapath", weights="random", device="meta")   # shapes only, no memory
    cfg = model.backbone_config      # BackboneConfig(name, feature_dim, input_size, mean, std, ...)
    x = preprocess_on_device(uint8_batch_on_gpu, cfg, torch.bfloat16)   # [B, 3, S, S]
    feats = model(x)                                          # [B, feature_dim]

A builder and its :class:`EncoderCard` are registered together (``@register_backbone(card=...)``),
so the registry answers "what is there, how big, at which resolution, under which licence,
from which file" without building anything. Every model takes float tensors that are already
resized, cropped and normalised ``[B, 3, S, S]`` and returns ``[B, feature_dim]``;
:func:`preprocess_on_device` does that on the accelerator, so the reader only ships uint8 pixels.

Weights are never silently random and never downloaded for the pathology encoders:
``weights='imagenet'`` (the ResNets, ``timm:<name>``) goes through torchvision/timm's own cache and
raises :class:`ConfigError` (saying how to pass a local file) when that fails; a local file or
folder is loaded strictly (through the encoder's key map where the published layout differs) and
identified by its sha256 in ``weights_id``.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .encoder_weights import (CHECKPOINT_SUFFIXES, file_sha256, find_weights_file, load_state_dict_file,
                              load_strict)
from .errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from torch import nn

__all__ = [
    "BackboneConfig",
    "EncoderCard",
    "register_backbone",
    "create_backbone",
    "list_backbones",
    "backbone_card",
    "backbone_table",
    "is_backbone",
    "parse_backbone_kw",
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
TIMM_PREFIX = "timm:"


@dataclass(frozen=True)
class BackboneConfig:
    """What travels with a backbone's weights: output size and the preprocessing it expects.

    Attributes
    ----------
    name : str
        Registry name (``resnet50_trunc``, ``uni``, ``timm:vit_small_patch16_224``, ...).
    feature_dim : int
        Length of the feature vector the model returns per patch.
    input_size : int
        Side ``S`` of the square input ``[B, 3, S, S]`` in pixels (after the centre crop).
    mean, std : tuple of 3 floats
        Per-channel normalisation for RGB values scaled to [0, 1].
    weights_id : str
        ``'imagenet'``, ``'random'`` or ``'sha256:<hex>'`` of the local checkpoint file.
    interpolation : str
        Resize mode used by :func:`preprocess_on_device` (``'bilinear'`` or ``'bicubic'``,
        always antialiased).
    resize_px : int or None
        Side the patch is resized to before a centre crop of ``input_size`` (torchvision's
        ``Resize(r) + CenterCrop(S)``); ``None`` resizes straight to ``input_size``.
    """

    name: str
    feature_dim: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_id: str
    interpolation: str = "bilinear"
    resize_px: int | None = None

    def preprocessing(self) -> dict:
        """The preprocessing as plain values, as recorded in every bag."""
        return {"resize_px": int(self.resize_px or self.input_size), "crop_px": int(self.input_size),
                "interpolation": self.interpolation, "antialias": True,
                "mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std]}


@dataclass(frozen=True)
class EncoderCard:
    """The frozen facts of a registered encoder, readable without building it.

    Attributes
    ----------
    feature_dim : int
        Embedding length.
    params : int
        Parameters of the encoder as built here (classifier heads removed); tests build every
        encoder on the ``meta`` device and compare.
    input_size, resize_px, interpolation, mean, std
        The preprocessing (see :class:`BackboneConfig`).
    native_mpp : float
        Micrometres per pixel the encoder was trained at (0.5 = 20x).
    native_patch_px : int
        Patch side in pixels at ``native_mpp`` (resized to ``input_size`` by the preprocessing).
    precision : str
        Autocast dtype on a GPU under ``--precision auto`` (``bf16``, ``fp16`` or ``fp32``).
    licence : str
        The weights' licence, as the publisher states it.
    weight_files : tuple of str
        File names the publisher ships, preferred first (empty: downloadable 'imagenet' weights).
    source : str
        Where the publisher ships them (Hugging Face repo id or URL).
    """

    name: str
    feature_dim: int
    params: int
    input_size: int = 224
    resize_px: int | None = None
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    native_mpp: float = 0.5
    native_patch_px: int = 224
    precision: str = "bf16"
    licence: str = ""
    weight_files: tuple[str, ...] = ()
    source: str = ""

    @property
    def needs_local_weights(self) -> bool:
        return bool(self.weight_files)

    def config(self, weights_id: str) -> BackboneConfig:
        return BackboneConfig(self.name, self.feature_dim, self.input_size, tuple(self.mean), tuple(self.std),
                              weights_id, self.interpolation, self.resize_px)

    def expected(self) -> str:
        """``pytorch_model.bin (Hugging Face MahmoodLab/UNI)``: what --weights should point at."""
        files = " or ".join(self.weight_files) or "a .pth/.pt/.bin/.safetensors file"
        return f"{files} ({self.source})" if self.source else files


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------
# A builder: builder(weights, **kwargs) -> nn.Module with `backbone_config` attached, where
# weights is 'imagenet', 'random' or a resolved Path (checked to exist) to a local checkpoint.
Builder = Callable[..., "nn.Module"]
_REGISTRY: dict[str, tuple[Builder, EncoderCard | None]] = {}
_LICENCE_SHOWN: set[str] = set()


def register_backbone(fn: Builder | None = None, *, card: EncoderCard | None = None):
    """Register a builder under its function name (timm's convention), with its card.

    Use bare (``@register_backbone``) or with the card (``@register_backbone(card=EncoderCard(...))``);
    the card's name must be the function's. Duplicates raise.
    """

    def add(builder: Builder) -> Builder:
        name = builder.__name__
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is already registered ({_REGISTRY[name][0].__module__})")
        if card is not None and card.name != name:
            raise ValueError(f"backbone {name!r} registered with the card of {card.name!r}")
        _REGISTRY[name] = (builder, card)
        return builder

    return add(fn) if fn is not None else add


def list_backbones() -> list[str]:
    """Registered backbone names, sorted; any ``timm:<model>`` name is accepted on top."""
    return sorted(_REGISTRY)


def backbone_card(name: str) -> EncoderCard | None:
    """The registered card of ``name`` (``None`` for ``timm:<model>`` and bare registrations)."""
    entry = _REGISTRY.get(name)
    return entry[1] if entry else None


def is_backbone(name: str) -> bool:
    return name in _REGISTRY or (isinstance(name, str) and name.startswith(TIMM_PREFIX) and len(name) > len(TIMM_PREFIX))


def backbone_table() -> str:
    """One line per registered encoder: what ``wsi-pipeline extract --list-backbones`` prints."""
    head = ("name", "dim", "params", "input", "native patch", "precision", "licence", "weights file (publisher)")
    rows = [head]
    for name in list_backbones():
        c = backbone_card(name)
        if c is None:
            rows.append((name, "?", "?", "?", "?", "?", "?", "?"))
            continue
        resize = f" (resize {c.resize_px}, crop)" if c.resize_px and c.resize_px != c.input_size else ""
        rows.append((name, str(c.feature_dim), f"{c.params / 1e6:.1f}M", f"{c.input_size}{resize} {c.interpolation}",
                     f"{c.native_patch_px} px @ {c.native_mpp:g} mpp", c.precision, c.licence,
                     c.expected() if c.weight_files else f"imagenet download or --weights FILE ({c.source})"))
    rows.append(("timm:<name>", "", "", "", "", "", "", "any timm model; --backbone-kw key=value,... for its arguments"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)) + "  " + r[-1] for r in rows)


def parse_backbone_kw(text: str | None) -> dict:
    """``"img_size=256,init_values=1e-5,global_pool=token"`` -> ``{'img_size': 256, ...}``.

    Values are read as Python literals (ints, floats, True/False/None, tuples) and kept as
    strings otherwise.
    """
    import ast

    out = {}
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ConfigError(f"The '--backbone-kw' parameter must be key=value pairs separated by commas. Got {part!r} instead.")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def create_backbone(name: str, weights: str | os.PathLike = "imagenet", device: str | None = None, **kwargs) -> "nn.Module":
    """Build a patch encoder in eval mode with its :class:`BackboneConfig` attached.

    Parameters
    ----------
    name : str
        One of :func:`list_backbones` or ``'timm:<any timm model name>'``.
    weights : {'imagenet', 'random'} or path
        ``'imagenet'``: the reference weights of the ResNets and timm models, downloaded through
        torchvision/timm's cache (a :class:`ConfigError` explains how to pass a local file when
        that is impossible; the pathology encoders always need a local file);
        ``'random'``: a fixed (seed 0) random init, the same in every process (tests, smoke runs);
        a file or folder: the checkpoint, loaded strictly (a folder must hold the file the
        encoder's publisher ships, directly or in a hub ``snapshots/<rev>/`` folder).
    device : str, optional
        ``'meta'`` builds shapes only (no memory, no weights): parameter counts, key checks.
    **kwargs
        Passed to the builder (for ``timm:<name>``: to ``timm.create_model``); arguments left
        as ``None`` are dropped so an unset CLI flag never overrides a builder's default.

    Returns
    -------
    nn.Module
        ``model(x [B, 3, S, S] float) -> [B, feature_dim]``; ``model.backbone_config``.
    """
    import torch

    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if isinstance(name, str) and name.startswith(TIMM_PREFIX):
        model_name = name[len(TIMM_PREFIX):]
        if not model_name:
            raise ConfigError(f"The 'name' parameter of create_backbone must name a timm model after 'timm:'. Got {name!r} instead.")
        resolved = _resolve_weights(weights, None)
        build = functools.partial(_build_timm, model_name, resolved, **kwargs)
    elif name in _REGISTRY:
        builder, card = _REGISTRY[name]
        resolved = _resolve_weights(weights, card)
        build = functools.partial(builder, resolved, **kwargs)
    else:
        raise ConfigError(
            f"The 'name' parameter of create_backbone must be one of {list_backbones()} or "
            f"'timm:<model name>'. Got {name!r} instead."
        )
    if device == "meta":
        if resolved != "random":
            raise ConfigError("create_backbone(device='meta') builds shapes only; pass weights='random'")
        with torch.device("meta"):
            model = build()
    elif resolved == "random":
        # 'random' must mean the same weights in every process and rerun (shards, GPUs,
        # resumes), or the bags of one folder would not share a feature space.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = build()
    else:
        model = build()
    model.eval()
    cfg = model.backbone_config
    card = backbone_card(name) if isinstance(name, str) else None
    if card is not None and card.licence and isinstance(resolved, Path) and name not in _LICENCE_SHOWN:
        _LICENCE_SHOWN.add(name)
        logger.warning("backbone %s: weights under %s; you are responsible for complying with it", name, card.licence)
    logger.info("backbone %s: %d-d features, weights %s", cfg.name, cfg.feature_dim, cfg.weights_id)
    return model


def _resolve_weights(weights: str | os.PathLike, card: EncoderCard | None) -> str | Path:
    if isinstance(weights, str) and weights in ("imagenet", "random"):
        if weights == "imagenet" and card is not None and card.needs_local_weights:
            raise ConfigError(
                f"backbone {card.name!r} needs its weights from a local file: pass --weights PATH to "
                f"{card.expected()} or its folder (licence: {card.licence}); nothing is downloaded"
            )
        return weights
    if isinstance(weights, (str, os.PathLike)) and str(weights):
        path = Path(weights).expanduser()
        expected = card.weight_files if card is not None else ()
        what = f"backbone {card.name!r} ({card.source})" if card is not None and card.source else ""
        if path.is_dir() or path.suffix.lower() in CHECKPOINT_SUFFIXES or expected:
            return find_weights_file(path, expected, what)
    raise ConfigError(
        "The 'weights' parameter of create_backbone must be 'imagenet', 'random' or a path to a "
        f"{'/'.join(CHECKPOINT_SUFFIXES)} file or its folder. Got {weights!r} instead."
    )


def weights_id(weights: str | Path) -> str:
    """``'imagenet'``, ``'random'`` or ``'sha256:<hex>'`` of a local file."""
    return f"sha256:{file_sha256(weights)}" if isinstance(weights, Path) else weights


def attach(model: "nn.Module", config: BackboneConfig) -> "nn.Module":
    model.backbone_config = config
    return model


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
def _torchvision_state(name: str, enum_name: str) -> dict:
    """The torchvision ImageNet state dict via torchvision's own download + cache."""
    import torchvision.models as tvm

    weights_enum = getattr(tvm, enum_name).IMAGENET1K_V1
    try:
        return weights_enum.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError, ValueError) as exc:  # URLError is an OSError
        raise _download_error(name, weights_enum.url, exc) from exc


def _resnet_weights(model, name: str, enum_name: str, weights: str | Path, ignore: tuple[str, ...]) -> None:
    if weights == "random":
        return
    if weights == "imagenet":
        load_strict(model, _torchvision_state(name, enum_name), f"torchvision {enum_name}.IMAGENET1K_V1", ignore)
    else:
        load_strict(model, load_state_dict_file(weights), str(weights), ignore)


def _resnet_card(name: str, dim: int, params: int, patch_px: int = 224) -> EncoderCard:
    return EncoderCard(name, dim, params, native_patch_px=patch_px, precision="bf16",
                       licence="BSD-3-Clause (torchvision ImageNet weights)", source="torchvision IMAGENET1K_V1")


@register_backbone(card=_resnet_card("resnet50_trunc", 1024, 8_543_296, patch_px=256))
def resnet50_trunc(weights: str | Path = "imagenet") -> "nn.Module":
    """CLAM's baseline: ResNet-50 (torchvision ImageNet V1) truncated after layer3 -> 1024-d.

    Checkpoints are full torchvision ``resnet50`` state dicts (``layer4.*``/``fc.*`` ignored)
    or this module's own state dict.
    """
    from .encoder_modules import ResNet50Trunc

    model = ResNet50Trunc()
    _resnet_weights(model, "resnet50_trunc", "ResNet50_Weights", weights, ("layer4.", "fc."))
    return attach(model, backbone_card("resnet50_trunc").config(weights_id(weights)))


def _torchvision_resnet(name: str, builder: str, enum_name: str, weights) -> "nn.Module":
    import torchvision.models as tvm
    from torch import nn

    model = getattr(tvm, builder)(weights=None)
    model.fc = nn.Identity()
    _resnet_weights(model, name, enum_name, weights, ("fc.",))
    return attach(model, backbone_card(name).config(weights_id(weights)))


@register_backbone(card=_resnet_card("resnet50", 2048, 23_508_032, patch_px=256))
def resnet50(weights: str | Path = "imagenet") -> "nn.Module":
    """Full torchvision ResNet-50 without ``fc`` -> 2048-d."""
    return _torchvision_resnet("resnet50", "resnet50", "ResNet50_Weights", weights)


@register_backbone(card=_resnet_card("resnet18", 512, 11_176_512, patch_px=256))
def resnet18(weights: str | Path = "imagenet") -> "nn.Module":
    """torchvision ResNet-18 without ``fc`` -> 512-d."""
    return _torchvision_resnet("resnet18", "resnet18", "ResNet18_Weights", weights)


# ---------------------------------------------------------------------------------------------
# timm
# ---------------------------------------------------------------------------------------------
def _build_timm(model_name: str, weights: str | Path, **kwargs) -> "nn.Module":
    import timm

    name = TIMM_PREFIX + model_name
    if not timm.is_model(model_name):
        raise ConfigError(
            f"The 'name' parameter of create_backbone names an unknown timm model {model_name!r}; "
            "see timm.list_models() for valid names (optionally with a '.tag')."
        )
    try:
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
            except TypeError:
                raise
            except Exception as exc:  # HF hub / urllib raise many different types when offline
                raise _download_error(name, cfg.hf_hub_id or cfg.url, exc) from exc
        else:
            model = timm.create_model(model_name, pretrained=False, num_classes=0, **kwargs)
    except TypeError as exc:  # an argument the architecture does not take
        raise ConfigError(f"--backbone-kw for {name}: {exc}") from exc
    if isinstance(weights, Path):
        classifier = model.pretrained_cfg.get("classifier") or ()
        heads = (classifier,) if isinstance(classifier, str) else tuple(classifier)
        # num_classes=0 removed the classifier; a classification checkpoint's head is
        # the only thing allowed to be left over.
        load_strict(model, load_state_dict_file(weights), str(weights), tuple(h + "." for h in heads))
    data = timm.data.resolve_data_config({}, model=model)
    _, height, width = data["input_size"]
    if "img_size" in kwargs:  # the pretrained config keeps its own size; the model was built for this one
        height = width = int(kwargs["img_size"] if isinstance(kwargs["img_size"], int) else kwargs["img_size"][0])
    if height != width:
        raise ConfigError(f"timm model {model_name!r} wants a non-square input {height}x{width}; only square inputs are supported")
    interpolation = data.get("interpolation", "bilinear")
    config = BackboneConfig(
        name=name,
        # what forward returns: a pre-logits layer after the pooling (MobileNetV3's conv_head) is
        # timm's head_hidden_size, wider than num_features (the pooled trunk)
        feature_dim=int(getattr(model, "head_hidden_size", None) or model.num_features),
        input_size=int(height),
        mean=tuple(float(v) for v in data["mean"]),
        std=tuple(float(v) for v in data["std"]),
        weights_id=weights_id(weights),
        interpolation=interpolation if interpolation in ("bilinear", "bicubic") else "bilinear",
    )
    return attach(model, config)


# ---------------------------------------------------------------------------------------------
# Preprocessing on the accelerator
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=32)
def _norm_constants(device: str, mean: tuple, std: tuple):
    """``mean*255`` and ``std*255`` as ``[1, 3, 1, 1]`` tensors on ``device``, made once.

    Building them per batch would be a blocking host-to-device copy that waits for the
    previous batch's forward pass and serialises reading with the model.
    """
    import torch

    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    return m.to(device), s.to(device)


def preprocess_on_device(batch: "torch.Tensor", config: BackboneConfig, out_dtype=None) -> "torch.Tensor":
    """uint8 patches -> the model's normalised input, computed where ``batch`` lives.

    Parameters
    ----------
    batch : uint8 tensor ``[B, H, W, 3]``
        RGB patches (already on the target device; ``H``/``W`` any size).
    config : BackboneConfig
        Supplies ``input_size``, ``resize_px``, ``mean``, ``std`` and ``interpolation``.
    out_dtype : torch.dtype
        dtype of the result (e.g. ``torch.bfloat16`` under autocast; default float32).

    Returns
    -------
    tensor ``[B, 3, S, S]`` of ``out_dtype`` in channels_last memory format: resized to
    ``resize_px`` (default ``S``) with antialiasing when the size differs (in float32),
    centre-cropped to ``S``, then ``(x / 255 - mean) / std``.
    """
    import torch

    if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
        raise ConfigError(
            "The 'batch' parameter of preprocess_on_device must be a uint8 tensor [B, H, W, 3]. "
            f"Got {batch.dtype} {tuple(batch.shape)} instead."
        )
    size = int(config.input_size)
    resize = int(getattr(config, "resize_px", None) or size)
    x = batch.permute(0, 3, 1, 2).float()
    if x.shape[-2:] != (resize, resize) and x.shape[0] > 0:
        x = torch.nn.functional.interpolate(
            x, size=(resize, resize), mode=config.interpolation, align_corners=False, antialias=True
        )
        if config.interpolation == "bicubic":
            x = x.clamp_(0.0, 255.0)  # bicubic overshoots; PIL and torchvision clamp to 8 bits too
    if resize != size:
        top = int(round((resize - size) / 2.0))  # torchvision CenterCrop's offset
        x = x[:, :, top:top + size, top:top + size]
    mean, std = _norm_constants(str(x.device), tuple(config.mean), tuple(config.std))
    x = (x - mean) / std
    return x.to(dtype=out_dtype or torch.float32, memory_format=torch.channels_last)


from . import encoders as _encoders  # noqa: E402,F401  registers the pathology encoders
