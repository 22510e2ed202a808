"""mil.train_config: the typed MHIM section and what checkpoints and fingerprints record of it."""

from __future__ import annotations

import dataclasses

import pytest

from extract.errors import ConfigError
from mil.train_config import MHIMConfig, TrainConfig, config_fingerprint

RECIPE_MHIM = {"mask_ratio": 0.5, "mask_ratio_h": 0.01, "mask_ratio_hr": 0.5, "mrh_schedule": "cosine"}


def test_the_mhim_section_is_one_typed_object():
    config = TrainConfig(mhim=RECIPE_MHIM)
    assert isinstance(config.mhim, MHIMConfig) and config.mhim.mask_ratio_hr == 0.5
    assert config.mhim.cl_alpha == MHIMConfig().cl_alpha  # unset fields keep their defaults
    assert TrainConfig(mhim=None).mhim is None and config.baseline().mhim is None
    assert dataclasses.replace(config, epochs=3).mhim == config.mhim


def test_checkpoints_and_fingerprints_record_the_section_as_written():
    # Fingerprints of experiments trained while the section was a plain dict must still match:
    # to_dict gives back the keys that were written, not all twenty fields.
    config = TrainConfig(mhim=RECIPE_MHIM)
    assert config.to_dict()["mhim"] == RECIPE_MHIM
    assert MHIMConfig(mask_ratio=0.3).to_dict() == {"mask_ratio": 0.3}  # however it is built
    assert TrainConfig(mhim={}).to_dict()["mhim"] == {}
    typed = TrainConfig(mhim=MHIMConfig(**RECIPE_MHIM))
    assert config_fingerprint(typed) == config_fingerprint(config)
    assert config_fingerprint(TrainConfig(mhim={**RECIPE_MHIM, "cl_alpha": 0.2})) != config_fingerprint(config)


@pytest.mark.parametrize("mhim, message", [
    ({"mask_ration": 0.5}, "'mhim.mask_ration' (did you mean 'mask_ratio'?)"),
    ({"mask_ratio": 1.5}, "The 'mask_ratio' parameter of MHIMConfig must be a float in [0, 1)"),
    ("strong", "The 'mhim' parameter of TrainConfig must be None or a mapping of MHIMConfig fields"),
])
def test_bad_mhim_sections_are_named(mhim, message):
    with pytest.raises(ConfigError) as err:
        TrainConfig(mhim=mhim)
    assert message in str(err.value)


def test_unknown_model_and_model_kw_are_refused_without_the_registry():
    with pytest.raises(ConfigError, match="The 'model' parameter of TrainConfig must be one of abmil"):
        TrainConfig(model="abmill")
    with pytest.raises(ConfigError, match="key\\(s\\) 'gatted' that model 'abmil' does not take"):
        TrainConfig(model="abmil", model_kw={"gatted": True})
