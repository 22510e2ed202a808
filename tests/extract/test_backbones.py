"""Backbone registry: CLAM's truncated ResNet-50, dims, checkpoints, offline errors, preprocessing."""

from __future__ import annotations

import hashlib
import urllib.error

import pytest
import torch
import torchvision
from torch import nn

from extract.backbones import (
    BackboneConfig,
    create_backbone,
    list_backbones,
    preprocess_on_device,
    register_backbone,
)
from extract.errors import CheckpointError, ConfigError

TINY_TIMM = "timm:resnet10t"


@pytest.fixture(scope="module")
def tv_resnet50_ckpt(tmp_path_factory):
    """A torchvision resnet50 state dict with random weights (and non-trivial BN stats)."""
    torch.manual_seed(0)
    tv = torchvision.models.resnet50(weights=None)
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("ckpt") / "resnet50_tv.pth"
    torch.save(tv.state_dict(), path)
    return tv.eval(), path


def test_registry_lists_builders_and_rejects_duplicates_and_unknown_names():
    assert {"resnet50_trunc", "resnet50", "resnet18"} <= set(list_backbones())
    with pytest.raises(ValueError, match="already registered"):
        @register_backbone
        def resnet50_trunc(weights="imagenet"):  # noqa: F811 - the duplicate is the point
            raise AssertionError
    with pytest.raises(ConfigError, match="resnet50_trunc"):
        create_backbone("resnet51", weights="random")
    with pytest.raises(ConfigError, match="'weights' parameter"):
        create_backbone("resnet18", weights="imagenet21k")
    with pytest.raises(ConfigError, match="not found"):
        create_backbone("resnet18", weights="/nonexistent/w.pth")


def test_resnet50_trunc_is_torchvision_conv1_to_layer3():
    torch.manual_seed(0)
    model = create_backbone("resnet50_trunc", weights="random")
    tv = torchvision.models.resnet50(weights=None)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {k: tuple(v.shape) for k, v in tv.state_dict().items() if not k.startswith(("layer4.", "fc."))}
    assert ours == expected
    names = {name for name, _ in model.named_children()}
    assert {"conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3"} <= names
    assert "layer4" not in names and "fc" not in names
    with torch.inference_mode():
        out = model(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 1024)
    cfg = model.backbone_config
    assert isinstance(cfg, BackboneConfig)
    assert (cfg.name, cfg.feature_dim, cfg.input_size, cfg.weights_id) == ("resnet50_trunc", 1024, 224, "random")
    assert cfg.mean == (0.485, 0.456, 0.406) and cfg.std == (0.229, 0.224, 0.225)
    with pytest.raises(AttributeError):
        cfg.feature_dim = 3  # frozen


def test_resnet50_trunc_loads_torchvision_state_dict_and_matches_manual_forward(tv_resnet50_ckpt):
    tv, path = tv_resnet50_ckpt
    model = create_backbone("resnet50_trunc", weights=path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert model.backbone_config.weights_id == f"sha256:{digest}"
    x = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        h = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        h = tv.layer3(tv.layer2(tv.layer1(h)))
        expected = torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1)
        got = model(x)
    assert got.shape == (2, 1024)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_checkpoint_wrappers_and_prefixes_are_undone(tmp_path, tv_resnet50_ckpt):
    tv, _ = tv_resnet50_ckpt
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in tv.state_dict().items()}}
    path = tmp_path / "wrapped.pt"
    torch.save(wrapped, path)
    model = create_backbone("resnet50", weights=path)
    torch.testing.assert_close(model.conv1.weight, tv.conv1.weight)

    from safetensors.torch import save_file

    small = torchvision.models.resnet18(weights=None)
    st = tmp_path / "r18.safetensors"
    save_file({f"backbone.{k}": v.contiguous() for k, v in small.state_dict().items()}, str(st))
    model = create_backbone("resnet18", weights=st)
    torch.testing.assert_close(model.layer4[1].conv2.weight, small.layer4[1].conv2.weight)
    assert model.backbone_config.weights_id.startswith("sha256:")


def test_strict_load_lists_missing_and_unexpected_keys(tmp_path, tv_resnet50_ckpt):
    tv, _ = tv_resnet50_ckpt
    state = dict(tv.state_dict())
    del state["layer2.0.conv1.weight"]
    state["extra_head.weight"] = torch.zeros(3)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        create_backbone("resnet50_trunc", weights=path)
    message = str(err.value)
    assert "missing keys" in message and "layer2.0.conv1.weight" in message
    assert "unexpected keys" in message and "extra_head.weight" in message
    assert str(path) in message

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        create_backbone("resnet18", weights=garbage)


def test_offline_imagenet_raises_config_error_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("network is unreachable (test)")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(ConfigError, match="--weights PATH") as err:
        create_backbone("resnet50_trunc")  # weights='imagenet' is the default
    assert "resnet50_trunc" in str(err.value) and "offline" in str(err.value)


def test_offline_timm_imagenet_raises_config_error(monkeypatch):
    builder = pytest.importorskip("timm.models._builder")
    if not hasattr(builder, "load_state_dict_from_hf"):
        pytest.skip("this timm version fetches weights differently")

    def no_network(*args, **kwargs):
        raise OSError("we cannot find the requested files in the local cache (test)")

    monkeypatch.setattr(builder, "load_state_dict_from_hf", no_network)
    monkeypatch.setattr(builder, "load_state_dict_from_url", no_network)
    with pytest.raises(ConfigError, match="--weights PATH"):
        create_backbone(TINY_TIMM, weights="imagenet")


# The pathology encoders are ViT-L/g: built on the meta device in test_encoders.py instead.
@pytest.mark.parametrize("name", ["resnet50_trunc", "resnet50", "resnet18", TINY_TIMM, "timm:mobilenetv3_small_050"])
def test_feature_dims_match_config(name):
    torch.manual_seed(0)
    model = create_backbone(name, weights="random")
    cfg = model.backbone_config
    # MobileNetV3: 288 pooled trunk channels, then a 1024-d conv_head before the (removed) classifier
    expected = {"resnet50_trunc": 1024, "resnet50": 2048, "resnet18": 512, TINY_TIMM: 512,
                "timm:mobilenetv3_small_050": 1024}[name]
    assert cfg.feature_dim == expected
    with torch.inference_mode():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, cfg.feature_dim)
    assert not model.training


def test_timm_backbone_config_and_local_checkpoint(tmp_path):
    import timm

    model = create_backbone(TINY_TIMM, weights="random")
    cfg = model.backbone_config
    data = timm.data.resolve_data_config({}, model=model)
    assert cfg.name == TINY_TIMM and cfg.feature_dim == model.num_features == 512
    assert cfg.input_size == data["input_size"][1] and cfg.mean == tuple(data["mean"])
    # A classification checkpoint (with its fc head) loads; the head is the only leftover allowed.
    full = timm.create_model("resnet10t", pretrained=False, num_classes=7)
    path = tmp_path / "r10t.pth"
    torch.save({"model": full.state_dict()}, path)
    loaded = create_backbone(TINY_TIMM, weights=path)
    torch.testing.assert_close(loaded.layer1[0].conv1.weight, full.layer1[0].conv1.weight)
    with pytest.raises(ConfigError, match="unknown timm model"):
        create_backbone("timm:not_a_model_xyz", weights="random")


def test_preprocess_on_device_resizes_normalises_channels_last():
    cfg = BackboneConfig("x", 8, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "random")
    batch = torch.empty(3, 256, 256, 3, dtype=torch.uint8)
    batch[..., 0], batch[..., 1], batch[..., 2] = 124, 116, 104  # ~ the ImageNet mean
    batch[2] = 255
    x = preprocess_on_device(batch, cfg, torch.float32)
    assert x.shape == (3, 3, 224, 224) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert x[:2].abs().max() < 0.01
    torch.testing.assert_close(x[2, 0], torch.full((224, 224), (1 - 0.485) / 0.229), rtol=1e-5, atol=1e-4)
    same = preprocess_on_device(batch[:, :224, :224], cfg, torch.bfloat16)  # no resize needed
    assert same.dtype == torch.bfloat16 and same.shape == (3, 3, 224, 224)
    with pytest.raises(ConfigError, match="uint8"):
        preprocess_on_device(batch.float(), cfg)
