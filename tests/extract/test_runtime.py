"""extract.runtime: one device resolver, one autocast rule, one atomic write, one set of validators."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from extract.errors import ConfigError
from extract.runtime import atomic_write, atomic_write_text, autocast_dtype, check_int, is_number, resolve_device

CPU = torch.device("cpu")


def test_explicit_half_precision_is_honoured_on_the_cpu_and_auto_means_fp32_there():
    assert autocast_dtype(CPU, "bf16") is torch.bfloat16
    assert autocast_dtype(CPU, "fp16") is torch.float16
    assert autocast_dtype(CPU, "auto") is None
    assert autocast_dtype(CPU, "fp32") is None
    with pytest.raises(ConfigError, match="The 'precision' parameter must be one of auto, fp32, bf16, fp16"):
        autocast_dtype(CPU, "half")


def test_resolve_device_names_the_parameter_and_refuses_missing_cuda():
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ConfigError, match="The 'device' parameter must be auto, cpu, cuda or cuda:N"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_atomic_write_replaces_whole_files_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "a.json"
    atomic_write_text(path, "one")
    atomic_write(path, lambda f: f.write(b"two"))
    assert path.read_text() == "two"

    def fail(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_text() == "two"  # the old file stays whole
    assert sorted(os.listdir(path.parent)) == ["a.json"]


def test_validators_share_one_message_and_accept_numpy_numbers():
    assert is_number(1) and is_number(np.float32(0.5)) and not is_number(True) and not is_number("1")
    assert not is_number(float("nan")) and is_number(float("nan"), finite=False)
    assert check_int("k", np.int64(3)) == 3
    with pytest.raises(ConfigError, match=r"The 'k' parameter of Thing must be an int >= 2\. Got 1 instead\."):
        check_int("k", 1, minimum=2, owner="Thing")
    with pytest.raises(ConfigError, match="must be an int >= 1"):
        check_int("k", True)
