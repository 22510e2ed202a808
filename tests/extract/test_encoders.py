"""Pathology encoders: registry without torch, documented sizes, published checkpoint layouts, offline loading."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from extract.backbones import backbone_card, backbone_table, create_backbone, list_backbones, parse_backbone_kw
from extract.encoder_weights import load_strict
from extract.encoders import ctranspath_to_timm, hf_vit_to_timm
from extract.errors import CheckpointError, ConfigError

ROOT = Path(__file__).resolve().parents[2]

# docs/ENCODERS.md (shared docs): parameters as published there, and the precision they are given in.
DOCUMENTED_PARAMS = {
    "uni": (303_350_784, 0), "uni2_h": (681_394_176, 0), "virchow": (631_229_184, 0),
    "virchow2": (631_239_424, 0), "gigapath": (1_134_953_984, 0), "h_optimus_0": (1_134_774_272, 0),
    "h_optimus_1": (1_134_774_272, 0), "resnet50_trunc": (8_543_296, 0),
    "kaiko_vits16": (21.67e6, 5e3), "kaiko_vits8": (21.67e6, 5e3), "kaiko_vitb16": (85.80e6, 5e3),
    "kaiko_vitb8": (85.81e6, 5e3), "kaiko_vitl14": (304.37e6, 5e3), "phikon": (85.8e6, 5e4),
    "phikon_v2": (303.4e6, 5e4), "ctranspath": (27.5e6, 5e4),
}
DOCUMENTED_DIMS = {"uni": 1024, "uni2_h": 1536, "virchow": 2560, "virchow2": 2560, "gigapath": 1536,
                   "h_optimus_0": 1536, "h_optimus_1": 1536, "conch_v15": 768, "conch_v1": 512,
                   "phikon": 768, "phikon_v2": 1024, "kaiko_vits16": 384, "kaiko_vits8": 384,
                   "kaiko_vitb16": 768, "kaiko_vitb8": 768, "kaiko_vitl14": 1024, "ctranspath": 768,
                   "resnet50_trunc": 1024, "resnet50": 2048, "resnet18": 512}
CONCH_TRUNK_PARAMS = {"conch_v1": (86.25e6, 5e3), "conch_v15": (304e6, 1e6)}


def test_registry_lists_every_encoder_without_importing_torch_or_timm():
    code = ("import sys; from extract.backbones import list_backbones, backbone_table; t = backbone_table(); "
            "print(len(list_backbones()), 'torch' in sys.modules, 'timm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split() == [str(len(list_backbones())), "False", "False"]
    assert set(DOCUMENTED_DIMS) <= set(list_backbones())
    table = backbone_table()
    for name in DOCUMENTED_DIMS:
        line = next(row for row in table.splitlines() if row.split()[0] == name)
        card = backbone_card(name)
        assert str(card.feature_dim) in line and card.licence in line and f"{card.native_mpp:g} mpp" in line
    assert "pytorch_model.bin (Hugging Face MahmoodLab/UNI)" in table
    assert "ctranspath.pth" in table and "GPL-3.0" in table


@pytest.mark.parametrize("name", sorted(DOCUMENTED_DIMS))
def test_every_encoder_builds_on_meta_with_the_documented_size(name):
    model = create_backbone(name, weights="random", device="meta")
    card = backbone_card(name)
    params = sum(p.numel() for p in model.parameters())
    assert params == card.params
    if name in DOCUMENTED_PARAMS:
        documented, tolerance = DOCUMENTED_PARAMS[name]
        assert abs(params - documented) <= tolerance
    if name in CONCH_TRUNK_PARAMS:
        documented, tolerance = CONCH_TRUNK_PARAMS[name]
        assert abs(sum(p.numel() for p in model.trunk.parameters()) - documented) <= tolerance
    cfg = model.backbone_config
    assert cfg.feature_dim == card.feature_dim == DOCUMENTED_DIMS[name]
    out = model(torch.empty(2, 3, cfg.input_size, cfg.input_size, device="meta"))
    assert tuple(out.shape) == (2, DOCUMENTED_DIMS[name])


def _meta_state(arch: str, **kw) -> dict:
    import timm

    with torch.device("meta"):
        return dict(timm.create_model(arch, pretrained=False, **kw).state_dict())


def _pooler_keys(prefix: str, d_model: int, context: int, extra: dict) -> dict:
    shapes = {"query": (1, d_model), "attn.q_proj_weight": (d_model, d_model),
              "attn.k_proj_weight": (d_model, context), "attn.v_proj_weight": (d_model, context),
              "attn.in_proj_bias": (3 * d_model,), "attn.out_proj.weight": (d_model, d_model),
              "attn.out_proj.bias": (d_model,), "ln_q.weight": (d_model,), "ln_q.bias": (d_model,),
              "ln_k.weight": (context,), "ln_k.bias": (context,)}
    out = {f"{prefix}attn_pool_contrast.{k}": torch.empty(s, device="meta") for k, s in shapes.items()}
    out[f"{prefix}ln_contrast.weight"] = torch.empty(d_model, device="meta")
    out[f"{prefix}ln_contrast.bias"] = torch.empty(d_model, device="meta")
    out.update(extra)
    return out


def _hf_names(timm_state: dict, dinov2: bool) -> dict:
    """A timm ViT state in Hugging Face ViTModel / Dinov2Model names (as transformers saves them)."""
    out = {}
    for k, v in timm_state.items():
        if k == "cls_token":
            out["embeddings.cls_token"] = v
        elif k == "pos_embed":
            out["embeddings.position_embeddings"] = v
        elif k.startswith("patch_embed.proj."):
            out["embeddings.patch_embeddings.projection." + k.split(".")[-1]] = v
        elif k.startswith("norm."):
            out["layernorm." + k.split(".")[-1]] = v
        elif k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            pre = f"encoder.layer.{i}."
            if rest.startswith("attn.qkv."):
                for part, chunk in zip(("query", "key", "value"), v.chunk(3, 0)):
                    out[pre + f"attention.attention.{part}.{rest.split('.')[-1]}"] = chunk
                continue
            names = ({"norm1": "norm1", "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
                      "ls1.gamma": "layer_scale1.lambda1", "ls2.gamma": "layer_scale2.lambda1"} if dinov2 else
                     {"norm1": "layernorm_before", "norm2": "layernorm_after", "mlp.fc1": "intermediate.dense",
                      "mlp.fc2": "output.dense"})
            names["attn.proj"] = "attention.output.dense"
            head = next(n for n in sorted(names, key=len, reverse=True) if rest.startswith(n))
            out[pre + names[head] + rest[len(head):]] = v
    dim = timm_state["cls_token"].shape[-1]
    out["embeddings.mask_token"] = torch.empty(1, dim, device=timm_state["cls_token"].device)
    if not dinov2:
        out["pooler.dense.weight"] = torch.empty(dim, dim, device=timm_state["cls_token"].device)
    return out


def _swiglu():
    from timm.layers import SwiGLUPacked

    return {"mlp_layer": SwiGLUPacked, "act_layer": torch.nn.SiLU}


def _published_layout(layout: str):
    """(state dict in the publisher's names on the meta device, key map the encoder applies)."""
    from extract import encoders as enc

    vit_l = dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0)
    trunk_v1 = {f"visual.trunk.{k}": v for k, v in _meta_state("vit_base_patch16_224", img_size=448, num_classes=0).items()}
    clip_rest = {"text.token_embedding.weight": torch.empty(32007, 768, device="meta"),
                 "visual.attn_pool_caption.query": torch.empty(256, 512, device="meta"),
                 "logit_scale": torch.empty((), device="meta")}
    swin = _meta_state("swin_tiny_patch4_window7_224", num_classes=0, embed_layer=__import__(
        "extract.encoder_modules", fromlist=["ConvStem"]).ConvStem)
    old_swin = {}
    for k, v in swin.items():  # TransPath (timm 0.5.4): patch merging at the end of the previous stage
        if ".downsample." in k:
            i = int(k.split(".")[1])
            k = k.replace(f"layers.{i}.downsample", f"layers.{i - 1}.downsample")
        old_swin[k] = v
    old_swin["layers.0.blocks.1.attn_mask"] = torch.empty(64, 49, 49, device="meta")
    old_swin["layers.0.blocks.0.attn.relative_position_index"] = torch.empty(49, 49, device="meta")
    layouts = {
        "uni": lambda: (_meta_state("vit_large_patch16_224", **vit_l), enc._plain_timm),
        "uni2_h": lambda: (_meta_state("vit_giant_patch14_224", img_size=224, patch_size=14, depth=24, num_heads=24,
                               embed_dim=1536, mlp_ratio=2.66667 * 2, init_values=1e-5, no_embed_class=True,
                               reg_tokens=8, num_classes=0, **_swiglu()), enc._plain_timm),
        "virchow2": lambda: (_meta_state("vit_huge_patch14_224", img_size=224, init_values=1e-5, mlp_ratio=5.3375,
                                 reg_tokens=4, num_classes=0, **_swiglu()), enc._plain_timm),
        "gigapath": lambda: (_meta_state("vit_giant_patch14_dinov2", img_size=224, patch_size=16, embed_dim=1536, depth=40,
                                 num_heads=24, mlp_ratio=5.33334, num_classes=0), enc._plain_timm),
        "h_optimus_0": lambda: (_meta_state("vit_giant_patch14_reg4_dinov2", img_size=224, init_values=1e-5,
                                    num_classes=0), enc._plain_timm),
        "kaiko_vitl14": lambda: (_meta_state("vit_large_patch14_reg4_dinov2", num_classes=0), enc._plain_timm),
        "uni_open_clip_names": lambda: ({f"visual.trunk.{k}": v for k, v in _meta_state("vit_large_patch16_224", **vit_l).items()},
                                enc._plain_timm),
        "conch_v15": lambda: (_pooler_keys("", 768, 1024, {f"trunk.{k}": v for k, v in _meta_state(
            "vit_large_patch16_224", img_size=448, init_values=1.0, num_classes=0).items()}), None),
        "conch_v1": lambda: (_pooler_keys("visual.", 512, 768, {**trunk_v1, **clip_rest}), enc._conch_v1_keys),
        "phikon": lambda: (_hf_names(_meta_state("vit_base_patch16_224", num_classes=0), dinov2=False), enc._hf_or_timm),
        "phikon_v2": lambda: (_hf_names(_meta_state("vit_large_patch16_224", **vit_l), dinov2=True), enc._hf_or_timm),
        "ctranspath": lambda: (old_swin, ctranspath_to_timm),
    }
    return layouts[layout]()


@pytest.mark.parametrize("layout", ["uni", "uni2_h", "virchow2", "gigapath", "h_optimus_0", "kaiko_vitl14",
                                    "uni_open_clip_names", "conch_v15", "conch_v1", "phikon", "phikon_v2",
                                    "ctranspath"])
def test_published_checkpoint_layouts_load_strictly(layout):
    state, key_map = _published_layout(layout)
    name = "uni" if layout == "uni_open_clip_names" else layout
    model = create_backbone(name, weights="random", device="meta")
    target = model.trunk if name in ("virchow", "virchow2") else model  # Virchow's pooling is not in the file
    mapped = key_map(state) if key_map else state
    load_strict(target, mapped, layout)  # raises on any missing, unexpected or mis-shaped key
    assert not any(t.is_meta for t in target.state_dict().values()) or all(
        v.is_meta for v in mapped.values())
    broken = dict(mapped)
    broken.pop(next(iter(broken)))
    with pytest.raises(CheckpointError, match="missing keys"):
        load_strict(create_backbone(name, weights="random", device="meta"), broken, layout,
                    expected=backbone_card(name).expected())


def test_hf_vit_names_map_onto_timm_with_identical_outputs():
    import timm

    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, init_values=0.5).eval()
    mapped = hf_vit_to_timm(_hf_names(ref.state_dict(), dinov2=True))
    twin = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, init_values=0.5).eval()
    load_strict(twin, mapped, "hf")
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(twin(x), ref(x))


def test_ctranspath_file_in_its_published_layout_loads_and_runs(tmp_path):
    import timm

    from extract.encoder_modules import ConvStem

    torch.manual_seed(0)
    ref = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0, embed_layer=ConvStem).eval()
    old = {}
    for k, v in ref.state_dict().items():
        if ".downsample." in k:
            i = int(k.split(".")[1])
            k = k.replace(f"layers.{i}.downsample", f"layers.{i - 1}.downsample")
        old[k] = v.clone()
    old["layers.0.blocks.1.attn_mask"] = torch.zeros(64, 49, 49)
    path = tmp_path / "ctranspath.pth"
    torch.save({"model": old}, path)
    model = create_backbone("ctranspath", weights=tmp_path)  # the folder holding ctranspath.pth
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        got = model(x)
        torch.testing.assert_close(got, ref(x))
    assert got.shape == (1, 768)
    assert model.backbone_config.weights_id.startswith("sha256:")


def test_hub_snapshot_folder_safetensors_and_wrong_files_name_the_expected_file(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    ref = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0).eval()
    snap = tmp_path / "models--kaiko--vits16" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(snap / "model.safetensors"))
    model = create_backbone("kaiko_vits16", weights=tmp_path / "models--kaiko--vits16")
    x = torch.rand(1, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), ref(x))
    cfg = model.backbone_config
    assert cfg.mean == cfg.std == (0.5, 0.5, 0.5) and cfg.input_size == 224

    with pytest.raises(ConfigError, match=r"pytorch_model\.bin \(Hugging Face MahmoodLab/UNI\)"):
        create_backbone("uni")  # no --weights: nothing is downloaded, the file is named
    with pytest.raises(ConfigError, match="no pytorch_model.bin in this folder"):
        create_backbone("uni", weights=tmp_path)
    with pytest.raises(ConfigError, match="not found; expected pytorch_model.bin"):
        create_backbone("uni", weights=tmp_path / "uni.bin")
    with pytest.raises(CheckpointError, match=r"missing keys .*pass pytorch_model\.bin \(Hugging Face MahmoodLab/UNI\)"):
        create_backbone("uni", weights=snap / "model.safetensors")  # a ViT-S file is not UNI


def test_backbone_kw_reaches_timm_and_is_validated():
    assert parse_backbone_kw("img_size=256, init_values=1e-5,global_pool=token,dynamic_img_size=True") == {
        "img_size": 256, "init_values": 1e-5, "global_pool": "token", "dynamic_img_size": True}
    with pytest.raises(ConfigError, match="key=value"):
        parse_backbone_kw("img_size")
    model = create_backbone("timm:vit_tiny_patch16_224", weights="random", img_size=96, init_values=1e-5)
    assert model.backbone_config.input_size == 96 and "blocks.0.ls1.gamma" in model.state_dict()
    with pytest.raises(ConfigError, match="backbone-kw"):
        create_backbone("timm:resnet10t", weights="random", not_an_argument=3)


@pytest.mark.slow
def test_uni_extraction_from_a_local_file_equals_a_direct_timm_forward(tmp_path, slides_dir):
    """``extract --backbone uni --weights <file>`` on a real slide == timm + UNI's published transform."""
    import h5py
    import numpy as np
    import openslide
    import timm
    from torchvision import transforms

    from pipeline.cli import main

    torch.manual_seed(0)
    ref = timm.create_model("vit_large_patch16_224", pretrained=False, num_classes=0, img_size=224,
                            patch_size=16, init_values=1e-5, dynamic_img_size=True).eval()
    with torch.no_grad():  # LayerScale at 1e-5 would leave the blocks out of the comparison
        for name, p in ref.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.2, 0.6)
    ref = ref.half().float()  # the file is stored in fp16, like the published one is in fp32
    weights = tmp_path / "UNI" / "pytorch_model.bin"
    weights.parent.mkdir()
    torch.save({k: v.half() for k, v in ref.state_dict().items()}, weights)

    manifest = tmp_path / "m.csv"
    manifest.write_text(f"slide_id,path\ncmu,{slides_dir / 'cmu_small_region.svs'}\n")
    ws = tmp_path / "ws"
    # 1536-px patches at 0.5 mpp: 2 patches (the second runs past the slide's bottom edge, so the
    # reader's white padding is compared too), so the two CPU ViT-L forwards stay short
    assert main(["segment", "--manifest", str(manifest), "--workspace", str(ws), "--preset", "bwh_biopsy",
                 "--patch-size", "1536", "-q"]) == 0
    assert main(["extract", "--manifest", str(manifest), "--workspace", str(ws), "--backbone", "uni",
                 "--weights", str(weights.parent), "--dtype", "float32", "--num-workers", "0", "-q"]) == 0
    bags = list((ws / "features").glob("uni-sha256_*/*/cmu.h5"))
    assert len(bags) == 1
    with h5py.File(bags[0]) as f:
        features, coords = f["features"][:], f["coords"][:]
        attrs = dict(f.attrs)
        size0 = int(f.attrs["patch_size_level0"])
    assert features.shape == (len(coords), 1024) and len(coords) == 2
    assert attrs["weights"] == f"sha256:{__import__('hashlib').sha256(weights.read_bytes()).hexdigest()}"
    assert '"crop_px": 224' in attrs["preprocessing"] and '"mean": [0.485, 0.456, 0.406]' in attrs["preprocessing"]

    uni_transform = transforms.Compose([  # UNI's published preprocessing
        transforms.Resize(224), transforms.CenterCrop(224), transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    from PIL import Image

    def region(slide, cx, cy):  # outside the slide is background (white), as the reader pads it
        rgba = slide.read_region((int(cx), int(cy)), 0, (size0, size0))
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")

    with openslide.OpenSlide(str(slides_dir / "cmu_small_region.svs")) as slide:
        x = torch.stack([uni_transform(region(slide, cx, cy)) for cx, cy in coords])
    with torch.inference_mode():
        expected = ref(x).numpy()
    cosine = (features * expected).sum(1) / (np.linalg.norm(features, axis=1) * np.linalg.norm(expected, axis=1))
    assert cosine.min() >= 0.999, cosine


def test_a_tiling_off_the_native_geometry_warns_with_the_segment_command():
    from pipeline.encoder_geometry import geometry_warning

    assert geometry_warning("uni", "mpp0.50_256px", {"target_mpp": 0.5, "patch_px": 256}) is None
    line = geometry_warning("ctranspath", "mpp0.50_256px", {"target_mpp": 0.5, "patch_px": 256})
    assert "224 px patches at 1 mpp" in line and "segment --target-mpp 1 --patch-size 224" in line
    line = geometry_warning("conch_v15", "level0_256px", {"patch_level": 0, "patch_px": 256})
    assert "--target-mpp 0.5 --patch-size 512" in line
    assert geometry_warning("timm:vit_small_patch16_224", "x", {"target_mpp": 2.0, "patch_px": 64}) is None


def test_random_weights_have_no_native_geometry_to_warn_about():
    from pipeline.encoder_geometry import geometry_warning

    demo_tiling = {"target_mpp": 1.0, "patch_px": 224}  # configs/demo.yaml: 10x, off ResNet's 20x
    assert geometry_warning("resnet18", "mpp1.00_224px", demo_tiling, "random") is None
    assert geometry_warning("uni", "level0_256px", {"patch_level": 0, "patch_px": 256}, "random") is None
    assert "trained on 256 px patches at 0.5 mpp" in geometry_warning("resnet18", "mpp1.00_224px", demo_tiling,
                                                                      "imagenet")
    assert "segment --target-mpp 0.5" in geometry_warning("uni", "level0_256px", {"patch_level": 0, "patch_px": 256},
                                                          "sha256:1a2b3c4d")
