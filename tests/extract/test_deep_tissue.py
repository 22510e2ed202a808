"""Deep tissue segmenters (GrandQC, HEST): published architectures, local weights only, same outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from extract.deep_tissue import SEGMENTERS, build_segmenter, load_segmenter
from extract.errors import CheckpointError, ConfigError
from extract.segmentation import PRESETS, segment_mask
from pipeline.cli import main

pytest.importorskip("segmentation_models_pytorch", reason="GrandQC's UNet++ needs segmentation-models-pytorch")


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_published_architectures_and_their_output_shapes():
    grandqc, hest = build_segmenter("grandqc"), build_segmenter("hest")
    # UNet++ / EfficientNet-B0, 2 classes; DeepLabV3-ResNet50 with a 2-class head, no aux head
    assert _count(grandqc) == 6_569_726 and type(grandqc).__name__ == "UnetPlusPlus"
    assert hest.classifier[4].out_channels == 2 and hest.aux_classifier is None
    assert 39e6 < _count(hest) < 40e6                                   # 39.6 M, as HEST's card says
    with torch.no_grad():
        assert grandqc.eval()(torch.zeros(1, 3, 256, 256)).shape == (1, 2, 256, 256)
        assert hest.eval()(torch.zeros(1, 3, 256, 256))["out"].shape == (1, 2, 256, 256)
    assert SEGMENTERS["grandqc"].mpp == 10 and SEGMENTERS["grandqc"].tissue_class == 0
    assert SEGMENTERS["hest"].mpp == 1 and SEGMENTERS["hest"].tissue_class == 1


def _decided(name: str, tissue_everywhere: bool):
    """The published model with random weights, except a last layer that outputs one class everywhere."""
    torch.manual_seed(0)
    model = build_segmenter(name)
    head = model.segmentation_head[0] if name == "grandqc" else model.classifier[4]
    wins = SEGMENTERS[name].tissue_class if tissue_everywhere else 1 - SEGMENTERS[name].tissue_class
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([5.0, 0.0] if wins == 0 else [0.0, 5.0]))
    return model


def _hest_checkpoint(path, tissue_everywhere: bool):
    """HEST's layout: a Lightning checkpoint, keys prefixed ``model.``, with an unused aux head."""
    state = {f"model.{k}": v for k, v in _decided("hest", tissue_everywhere).state_dict().items()}
    state["model.aux_classifier.4.weight"] = torch.zeros(21, 10, 1, 1)
    torch.save({"state_dict": state, "epoch": 3}, path)
    return path


def _grandqc_weights(path, tissue_everywhere: bool):
    """GrandQC's layout: a plain state dict."""
    torch.save(_decided("grandqc", tissue_everywhere).state_dict(), path)
    return path


def test_predict_stitches_tiles_into_a_mask_of_the_image_size(tmp_path):
    seg = load_segmenter("grandqc", _grandqc_weights(tmp_path / "g.pth", True), "cpu")
    mask = seg.predict(np.full((700, 530, 3), 200, np.uint8))          # 2 x 2 tiles of 512 px
    assert mask.shape == (700, 530) and mask.dtype == bool and mask.all()
    tissue = segment_mask(mask, PRESETS["bwh_biopsy"], (4.0, 4.0))
    assert tissue.n_contours == 1 and tissue.contours[0].max(0).tolist() == [529 * 4, 699 * 4]
    none = load_segmenter("grandqc", _grandqc_weights(tmp_path / "g0.pth", False), "cpu")
    assert not none.predict(np.full((100, 100, 3), 200, np.uint8)).any()
    hest = load_segmenter("hest", _hest_checkpoint(tmp_path / "h.ckpt", True), "cpu")
    assert hest.predict(np.full((90, 120, 3), 230, np.uint8)).all()   # Lightning layout, aux head dropped


def test_missing_or_wrong_weights_are_one_clear_line(tmp_path):
    with pytest.raises(ConfigError, match="--segmenter grandqc needs --weights PATH.*nothing is downloaded"):
        load_segmenter("grandqc", None)
    with pytest.raises(ConfigError, match="file not found"):
        load_segmenter("hest", tmp_path / "nope.ckpt")
    torch.save(build_segmenter("grandqc").state_dict(), tmp_path / "g.pth")
    with pytest.raises(CheckpointError, match="not hest weights"):
        load_segmenter("hest", tmp_path / "g.pth")


def test_segment_stage_with_a_deep_model_writes_the_same_outputs(tmp_path, slides_dir, capsys):
    m = tmp_path / "m.csv"
    m.write_text(f"slide_id,path\ncmu,{slides_dir / 'cmu_small_region.svs'}\n")
    ws = tmp_path / "ws"
    assert main(["segment", "--manifest", str(m), "--workspace", str(ws), "--segmenter", "grandqc", "-q"]) == 2
    assert "--segmenter grandqc needs --weights PATH" in capsys.readouterr().err
    weights = _grandqc_weights(tmp_path / "grandqc.pth", True)
    assert main(["segment", "--manifest", str(m), "--workspace", str(ws), "--segmenter", "grandqc", "--weights",
                 str(weights), "--seg-device", "cpu", "--preset", "bwh_biopsy", "-q"]) == 0
    seg = ws / "segment" / "mpp0.50_256px_grandqc"
    fc = json.loads((seg / "geojson" / "cmu.geojson").read_text())
    ring = np.asarray(fc["features"][0]["geometry"]["coordinates"][0])
    # all tissue: one contour around the whole 2220 x 2967 slide, traced on its 10 um/px thumbnail
    assert ring.min() == 0 and ring[:, 0].max() >= 2200 and ring[:, 1].max() >= 2940
    with __import__("h5py").File(seg / "coords" / "cmu.h5") as f:
        assert len(f["coords"]) == 9 * 12                               # 256 px at 0.5 um/px over it all
    assert (seg / "previews" / "cmu.png").is_file() and (seg / "coords" / "cmu.h5").is_file()
    params = json.loads((seg / "params.json").read_text())
    assert "weights_sha256" in json.dumps(params)
