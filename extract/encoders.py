"""The registered pathology encoders: exact architectures, embeddings, preprocessing, weight files.

Facts from ``docs/ENCODERS.md`` (shared docs): each builder makes the architecture the authors
published, with timm's modules where timm has them, and loads the publisher's file strictly,
through a key map where the published layout is not timm's. Nothing here is downloaded: the
user points ``--weights`` at the file (or the folder of a Hugging Face snapshot).

Importing this module imports neither torch nor timm; builders do, when called.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Callable

from .backbones import EncoderCard, attach, backbone_card, register_backbone, weights_id
from .encoder_weights import load_state_dict_file, load_strict, select_keys
from .errors import CheckpointError

__all__ = ["build_and_load", "hf_vit_to_timm", "ctranspath_to_timm"]

H_OPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
H_OPTIMUS_STD = (0.211883, 0.230117, 0.177517)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)
NC_ND = "CC-BY-NC-ND-4.0 (gated: accept the terms on Hugging Face)"


# ---------------------------------------------------------------------------------------------
# Building and loading
# ---------------------------------------------------------------------------------------------
def build_and_load(construct: Callable, state: dict | None, source: str, card: EncoderCard):
    """``construct()`` with ``state`` loaded strictly into it, never randomly initialised first.

    With a state dict the module is built on the ``meta`` device and receives the checkpoint's
    tensors; a module whose non-persistent buffers (computed in ``__init__``, like Swin's
    relative position index) would stay empty is built on the CPU instead. Without a state
    the module is built where the caller's default device says (CPU, or ``meta`` for shapes).
    """
    import torch

    if state is None:
        return construct()
    with torch.device("meta"):
        model = construct()
    if any(b.is_meta for name, b in model.named_buffers() if name not in model.state_dict()):
        model = construct()
    load_strict(model, state, source, expected=card.expected())
    return model


def _read(weights: str | Path, key_map: Callable | None = None) -> dict | None:
    if not isinstance(weights, Path):
        return None
    state = load_state_dict_file(weights)
    return key_map(state) if key_map else state


def _grid_img_size(state: dict | None, key: str, patch: int, default: int) -> int:
    """The image size a checkpoint's position embedding was trained at (``default`` without one)."""
    if not state or key not in state:
        return default
    n = int(state[key].shape[1])
    side = math.isqrt(n)
    if side * side != n:  # a class token has its own position
        side = math.isqrt(n - 1)
    return side * patch


def _strip_prefix(state: dict, prefixes: tuple[str, ...]) -> dict:
    """Undo a prefix every key carries (``visual.trunk.`` in open_clip-style files)."""
    for prefix in prefixes:
        if state and all(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items()}
    return state


def _timm_vit(name: str, arch: str, weights, key_map=None, infer_img_size: int = 0, wrap=None, **kw):
    """A timm ViT-family encoder (``num_classes=0``, ``dynamic_img_size=True``) with its card."""
    import timm

    card = backbone_card(name)
    state = _read(weights, key_map)
    if infer_img_size:
        kw["img_size"] = _grid_img_size(state, "pos_embed", infer_img_size, kw.get("img_size", 224))

    def construct():
        return timm.create_model(arch, pretrained=False, num_classes=0, dynamic_img_size=True, **kw)

    model = build_and_load(construct, state, str(weights), card)
    if wrap is not None:
        model = wrap(model)
    return attach(model, card.config(weights_id(weights)))


def _plain_timm(state: dict) -> dict:
    return _strip_prefix(state, ("visual.trunk.", "trunk."))


def _swiglu_silu() -> dict:
    import torch
    from timm.layers import SwiGLUPacked

    return {"mlp_layer": SwiGLUPacked, "act_layer": torch.nn.SiLU}


# ---------------------------------------------------------------------------------------------
# UNI, UNI2-h
# ---------------------------------------------------------------------------------------------
@register_backbone(card=EncoderCard(
    "uni", 1024, 303_350_784, native_patch_px=256, precision="fp16", licence=NC_ND,
    weight_files=("pytorch_model.bin",), source="Hugging Face MahmoodLab/UNI"))
def uni(weights="random"):
    """UNI: ViT-L/16 with LayerScale (``init_values=1e-5``), class token -> 1024-d."""
    return _timm_vit("uni", "vit_large_patch16_224", weights, _plain_timm,
                     img_size=224, patch_size=16, init_values=1e-5)


@register_backbone(card=EncoderCard(
    "uni2_h", 1536, 681_394_176, native_patch_px=256, precision="bf16", licence=NC_ND,
    weight_files=("pytorch_model.bin",), source="Hugging Face MahmoodLab/UNI2-h"))
def uni2_h(weights="random"):
    """UNI2-h: ViT-H/14-like (24 blocks, 1536 wide, SwiGLU, 8 registers), class token -> 1536-d."""
    return _timm_vit("uni2_h", "vit_giant_patch14_224", weights, _plain_timm,
                     img_size=224, patch_size=14, depth=24, num_heads=24, embed_dim=1536,
                     mlp_ratio=2.66667 * 2, init_values=1e-5, no_embed_class=True, reg_tokens=8,
                     **_swiglu_silu())


# ---------------------------------------------------------------------------------------------
# Virchow, Virchow2: class token next to the mean of the patch tokens
# ---------------------------------------------------------------------------------------------
def _virchow(name: str, weights, reg_tokens: int):
    from .encoder_modules import ClsMeanTokens

    extra = {"reg_tokens": reg_tokens} if reg_tokens else {}
    return _timm_vit(name, "vit_huge_patch14_224", weights, _plain_timm, wrap=ClsMeanTokens,
                     img_size=224, init_values=1e-5, mlp_ratio=5.3375, global_pool="",
                     **_swiglu_silu(), **extra)


_VIRCHOW = dict(resize_px=224, interpolation="bicubic", native_patch_px=224, precision="fp16",
                weight_files=("pytorch_model.bin", "model.safetensors"))


@register_backbone(card=EncoderCard("virchow", 2560, 631_229_184, licence="Apache-2.0 (gated)",
                                    source="Hugging Face paige-ai/Virchow", **_VIRCHOW))
def virchow(weights="random"):
    """Virchow: ViT-H/14 (SwiGLU); ``concat(CLS, mean of patch tokens)`` -> 2560-d."""
    return _virchow("virchow", weights, 0)


@register_backbone(card=EncoderCard("virchow2", 2560, 631_239_424, licence=NC_ND,
                                    source="Hugging Face paige-ai/Virchow2", **_VIRCHOW))
def virchow2(weights="random"):
    """Virchow2: Virchow with 4 registers; registers excluded from the mean -> 2560-d."""
    return _virchow("virchow2", weights, 4)


# ---------------------------------------------------------------------------------------------
# Prov-GigaPath, H-optimus
# ---------------------------------------------------------------------------------------------
@register_backbone(card=EncoderCard(
    "gigapath", 1536, 1_134_953_984, resize_px=256, interpolation="bicubic", native_patch_px=256,
    precision="fp16", licence="Apache-2.0 (gated)", weight_files=("pytorch_model.bin", "model.safetensors"),
    source="Hugging Face prov-gigapath/prov-gigapath"))
def gigapath(weights="random"):
    """Prov-GigaPath tile encoder: ViT-g/16 (40 blocks, SwiGLU), class token -> 1536-d."""
    return _timm_vit("gigapath", "vit_giant_patch14_dinov2", weights, _plain_timm,
                     img_size=224, patch_size=16, embed_dim=1536, depth=40, num_heads=24, mlp_ratio=5.33334)


def _h_optimus(name: str, weights):
    return _timm_vit(name, "vit_giant_patch14_reg4_dinov2", weights, _plain_timm,
                     img_size=224, init_values=1e-5, global_pool="token")


_H_OPTIMUS = dict(mean=H_OPTIMUS_MEAN, std=H_OPTIMUS_STD, native_patch_px=224, precision="fp16",
                  weight_files=("pytorch_model.bin", "model.safetensors"))


@register_backbone(card=EncoderCard("h_optimus_0", 1536, 1_134_774_272, licence="Apache-2.0",
                                    source="Hugging Face bioptimus/H-optimus-0", **_H_OPTIMUS))
def h_optimus_0(weights="random"):
    """H-optimus-0: ViT-g/14 with 4 registers, class token -> 1536-d."""
    return _h_optimus("h_optimus_0", weights)


@register_backbone(card=EncoderCard("h_optimus_1", 1536, 1_134_774_272, licence=NC_ND,
                                    source="Hugging Face bioptimus/H-optimus-1", **_H_OPTIMUS))
def h_optimus_1(weights="random"):
    """H-optimus-1: the H-optimus-0 architecture, new weights -> 1536-d."""
    return _h_optimus("h_optimus_1", weights)


# ---------------------------------------------------------------------------------------------
# CONCH v1 and v1.5: timm trunk + our attentional pooler
# ---------------------------------------------------------------------------------------------
def _conch(name: str, arch: str, d_model: int, weights, key_map, **trunk_kw):
    import timm

    from .encoder_modules import ConchVision

    card = backbone_card(name)
    state = _read(weights, key_map)
    trunk_kw["img_size"] = _grid_img_size(state, "trunk.pos_embed", 16, 448)

    def construct():
        trunk = timm.create_model(arch, pretrained=False, num_classes=0, dynamic_img_size=True,
                                  global_pool="", **trunk_kw)
        return ConchVision(trunk, d_model)

    model = build_and_load(construct, state, str(weights), card)
    return attach(model, card.config(weights_id(weights)))


def _conch_v1_keys(state: dict) -> dict:
    # The file is the whole CoCa model: keep the image tower's contrastive path only.
    if any(k.startswith("visual.") for k in state):
        return select_keys(state, ("visual.trunk.", "visual.attn_pool_contrast.", "visual.ln_contrast."), "visual.")
    return state


@register_backbone(card=EncoderCard(
    "conch_v15", 768, 306_714_368, input_size=448, interpolation="bicubic", native_patch_px=512,
    precision="bf16", licence=NC_ND, weight_files=("pytorch_model_vision.bin",),
    source="Hugging Face MahmoodLab/conchv1_5"))
def conch_v15(weights="random"):
    """CONCH v1.5: ViT-L/16 trunk at 448 (``init_values=1.0``), attentional pooler -> 768-d."""
    return _conch("conch_v15", "vit_large_patch16_224", 768, weights, None, init_values=1.0)


@register_backbone(card=EncoderCard(
    "conch_v1", 512, 87_567_104, input_size=448, interpolation="bicubic", mean=CLIP_MEAN, std=CLIP_STD,
    native_patch_px=512, precision="bf16", licence=NC_ND, weight_files=("pytorch_model.bin",),
    source="Hugging Face MahmoodLab/CONCH"))
def conch_v1(weights="random"):
    """CONCH v1: ViT-B/16 trunk at 448, attentional pooler (512-d, keys 768-d) -> 512-d."""
    return _conch("conch_v1", "vit_base_patch16_224", 512, weights, _conch_v1_keys)


# ---------------------------------------------------------------------------------------------
# Phikon, Phikon-v2: Hugging Face ViT / DINOv2 layouts mapped onto timm's ViT
# ---------------------------------------------------------------------------------------------
_HF_BLOCK = [
    (r"attention\.output\.dense\.", "attn.proj."),
    (r"layernorm_before\.", "norm1."),
    (r"layernorm_after\.", "norm2."),
    (r"intermediate\.dense\.", "mlp.fc1."),
    (r"output\.dense\.", "mlp.fc2."),
    (r"layer_scale1\.lambda1", "ls1.gamma"),
    (r"layer_scale2\.lambda1", "ls2.gamma"),
    (r"norm1\.", "norm1."),
    (r"norm2\.", "norm2."),
    (r"mlp\.fc1\.", "mlp.fc1."),
    (r"mlp\.fc2\.", "mlp.fc2."),
]


def hf_vit_to_timm(state: dict) -> dict:
    """A Hugging Face ``ViTModel``/``Dinov2Model`` state dict in timm ``VisionTransformer`` names.

    ``query``/``key``/``value`` are concatenated into ``qkv``; ``mask_token`` and ``pooler``
    (not part of the embedding) are dropped; a ``vit.``/``dinov2.`` model prefix is undone.
    Keys it does not know are kept as they are, so strict loading names them.
    """
    import torch

    state = _strip_prefix(state, ("vit.", "dinov2.", "model."))
    out, qkv = {}, {}
    for key, value in state.items():
        if key.startswith(("pooler.", "embeddings.mask_token")):
            continue
        if key == "embeddings.cls_token":
            out["cls_token"] = value
        elif key == "embeddings.position_embeddings":
            out["pos_embed"] = value
        elif key.startswith("embeddings.patch_embeddings.projection."):
            out["patch_embed.proj." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("layernorm."):
            out["norm." + key.rsplit(".", 1)[1]] = value
        elif (m := re.match(r"encoder\.layer\.(\d+)\.(.+)$", key)):
            block, rest = int(m.group(1)), m.group(2)
            if (q := re.match(r"attention\.attention\.(query|key|value)\.(weight|bias)$", rest)):
                qkv.setdefault((block, q.group(2)), {})[q.group(1)] = value
                continue
            for pattern, repl in _HF_BLOCK:
                if re.match(pattern, rest):
                    rest = re.sub("^" + pattern, repl, rest)
                    break
            out[f"blocks.{block}.{rest}"] = value
        else:
            out[key] = value
    for (block, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise CheckpointError(f"block {block}: attention {kind} has only {sorted(parts)} of query/key/value")
        out[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], 0)
    return out


@register_backbone(card=EncoderCard(
    "phikon", 768, 85_798_656, native_patch_px=224, precision="bf16", licence="Owkin non-commercial",
    weight_files=("model.safetensors", "pytorch_model.bin"), source="Hugging Face owkin/phikon"))
def phikon(weights="random"):
    """Phikon: ViT-B/16 (iBOT), the Hugging Face ``ViTModel`` layout read into timm -> CLS 768-d."""
    import functools

    import torch

    # transformers' ViT normalises with eps 1e-12 (timm's default is 1e-6).
    return _timm_vit("phikon", "vit_base_patch16_224", weights, _hf_or_timm,
                     norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-12), img_size=224)


@register_backbone(card=EncoderCard(
    "phikon_v2", 1024, 303_350_784, native_patch_px=224, precision="bf16", licence="Owkin non-commercial",
    weight_files=("model.safetensors", "pytorch_model.bin"), source="Hugging Face owkin/phikon-v2"))
def phikon_v2(weights="random"):
    """Phikon-v2: DINOv2 ViT-L/16 (LayerScale), the ``Dinov2Model`` layout read into timm -> CLS 1024-d."""
    return _timm_vit("phikon_v2", "vit_large_patch16_224", weights, _hf_or_timm,
                     infer_img_size=16, img_size=224, init_values=1e-5)


def _hf_or_timm(state: dict) -> dict:
    """Hugging Face names are mapped onto timm's; a file already in timm names passes as it is."""
    if any(re.match(r"^(vit\.|dinov2\.|model\.)?(embeddings|encoder\.layer)\.", k) for k in state):
        return hf_vit_to_timm(state)
    return _plain_timm(state)


# ---------------------------------------------------------------------------------------------
# kaiko.ai ViTs
# ---------------------------------------------------------------------------------------------
def _kaiko(name: str, arch: str, weights, **kw):
    return _timm_vit(name, arch, weights, _plain_timm, **kw)


def _kaiko_card(name: str, dim: int, params: int) -> EncoderCard:
    return EncoderCard(name, dim, params, mean=HALF, std=HALF, native_patch_px=224, precision="bf16",
                       licence="see the kaiko.ai model card", weight_files=("model.safetensors", "pytorch_model.bin"),
                       source="kaiko.ai towards_large_pathology_fms (timm release)")


@register_backbone(card=_kaiko_card("kaiko_vits16", 384, 21_665_664))
def kaiko_vits16(weights="random"):
    """kaiko.ai ViT-S/16 -> CLS 384-d."""
    return _kaiko("kaiko_vits16", "vit_small_patch16_224", weights)


@register_backbone(card=_kaiko_card("kaiko_vits8", 384, 21_670_272))
def kaiko_vits8(weights="random"):
    """kaiko.ai ViT-S/8 -> CLS 384-d."""
    return _kaiko("kaiko_vits8", "vit_small_patch8_224", weights)


@register_backbone(card=_kaiko_card("kaiko_vitb16", 768, 85_798_656))
def kaiko_vitb16(weights="random"):
    """kaiko.ai ViT-B/16 -> CLS 768-d."""
    return _kaiko("kaiko_vitb16", "vit_base_patch16_224", weights)


@register_backbone(card=_kaiko_card("kaiko_vitb8", 768, 85_807_872))
def kaiko_vitb8(weights="random"):
    """kaiko.ai ViT-B/8 -> CLS 768-d."""
    return _kaiko("kaiko_vitb8", "vit_base_patch8_224", weights)


@register_backbone(card=_kaiko_card("kaiko_vitl14", 1024, 304_370_688))
def kaiko_vitl14(weights="random"):
    """kaiko.ai ViT-L/14 with 4 registers (DINOv2; position grid of 518 px, run at 224) -> CLS 1024-d."""
    return _kaiko("kaiko_vitl14", "vit_large_patch14_reg4_dinov2", weights, infer_img_size=14, img_size=518)


# ---------------------------------------------------------------------------------------------
# CTransPath: timm's Swin-T with CTransPath's convolutional stem
# ---------------------------------------------------------------------------------------------
def ctranspath_to_timm(state: dict) -> dict:
    """TransPath's checkpoint (timm 0.5.4 Swin) in today's timm names.

    Old Swin merges patches at the end of a stage, timm at the start of the next one
    (``layers.i.downsample`` -> ``layers.{i+1}.downsample``); the attention masks and relative
    position indices are recomputed by the model; the head is an identity in CTransPath.
    """
    old = any(k.startswith("layers.0.downsample.") for k in state)
    out = {}
    for key, value in state.items():
        if key.endswith(("attn_mask", "relative_position_index")) or key.startswith("head."):
            continue
        if old:
            key = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", key)
        out[key] = value
    return out


@register_backbone(card=EncoderCard(
    "ctranspath", 768, 27_520_038, native_mpp=1.0, native_patch_px=224, precision="bf16",
    licence="GPL-3.0 (TransPath code and weights)", weight_files=("ctranspath.pth",),
    source="github.com/Xiyue-Wang/TransPath"))
def ctranspath(weights="random"):
    """CTransPath: Swin-T/4 window 7 with a convolutional stem, mean of the last stage -> 768-d."""
    import timm

    from .encoder_modules import ConvStem

    card = backbone_card("ctranspath")
    state = _read(weights, ctranspath_to_timm)

    def construct():
        return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0, embed_layer=ConvStem)

    model = build_and_load(construct, state, str(weights), card)
    return attach(model, card.config(weights_id(weights)))
