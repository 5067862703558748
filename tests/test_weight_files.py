"""Weights read through a child process (app/engine/weight_files.py): the tensors safetensors wrote, and a clear
error for a file that is missing, cut short or not safetensors."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from app.engine.weight_files import WeightsReadError, read_weights_file


def test_every_tensor_comes_back_as_written(tmp_path):
    tensors = {"w": torch.randn(3, 4), "half": torch.randn(5).to(torch.bfloat16), "scalar": torch.tensor(3.0),
               "empty": torch.zeros(0, 4), "ids": torch.arange(7), "mask": torch.tensor([True, False])}
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    read = read_weights_file(tmp_path / "model.safetensors", stall_timeout_s=30)
    assert read.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert read[name].dtype == tensor.dtype and read[name].shape == tensor.shape and torch.equal(read[name], tensor)


def test_a_missing_short_or_foreign_file_is_a_clear_error(tmp_path):
    save_file({"w": torch.randn(64)}, tmp_path / "whole.safetensors")
    (tmp_path / "short.safetensors").write_bytes((tmp_path / "whole.safetensors").read_bytes()[:-8])
    (tmp_path / "text.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(WeightsReadError, match="No such file"):
        read_weights_file(tmp_path / "missing.safetensors", stall_timeout_s=30)
    with pytest.raises(WeightsReadError, match="short.safetensors: the file ends early"):
        read_weights_file(tmp_path / "short.safetensors", stall_timeout_s=30)
    with pytest.raises(WeightsReadError, match="text.safetensors: not a safetensors file"):
        read_weights_file(tmp_path / "text.safetensors", stall_timeout_s=30)
