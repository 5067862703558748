"""The C linear kernel for few rows (app/engine/native/few_rows_linear.c) against F.linear, the row split between
it and oneDNN, the model's logits through it against transformers, and the linear_kernel setting."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from app.engine import native_linear
from app.engine.linear_kernels import RowSplitLinear, use_linear_kernel
from app.engine.model import DenseAttention
from app.engine.native_linear import MAX_ROWS, FewRowsLinear
from app.engine.weights import load_hf_directory
from tests.conftest import make_tiny_hf
from tests.test_model import batch_of_unequal_lengths, pair  # pair: a fixture (every architecture), used by name


@pytest.fixture(scope="module")
def function():
    function = native_linear.load_kernel()
    assert function is not None, "this machine (and CI's) has a C compiler and AVX-512: the kernel must build"
    return function


def assert_close(got, want):
    assert got.shape == want.shape and got.dtype == torch.float32
    assert torch.allclose(got, want, rtol=0, atol=1e-5 * max(1.0, want.abs().max().item() if want.numel() else 0))


@pytest.mark.parametrize("rows", [0, 1, 5, 6, 7, 13, 24, MAX_ROWS])
@pytest.mark.parametrize("in_features", [64, 50, 576])
def test_every_row_and_output_count_matches_f_linear(function, rows, in_features):
    """Matrices of 7, 3 and 9 outputs (tiles of 4 cut short at each end), in-features not a multiple of 16,
    row counts around the kernel's 6-row groups, and a bias."""
    g = torch.Generator().manual_seed(rows * 1000 + in_features)
    weights = [torch.randn(n, in_features, generator=g) for n in (7, 3, 9)]
    bias = torch.randn(19, generator=g)
    x = torch.randn(rows, in_features, generator=g)
    assert_close(FewRowsLinear(function, weights, bias)(x), F.linear(x, torch.cat(weights), bias))


def test_outputs_over_many_tiles_and_both_threads_land_in_their_columns(function):
    """Enough tiles that both threads stream, and prefetching runs across the boundary between two matrices."""
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(1000, 96, generator=g), torch.randn(522, 96, generator=g)]
    x = torch.randn(24, 96, generator=g)
    assert_close(FewRowsLinear(function, weights, None)(x), F.linear(x, torch.cat(weights)))


def test_inputs_are_read_as_they_lie_and_keep_their_leading_shape(function):
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(40, 64, generator=g)
    wide = torch.randn(2, 5, 100, generator=g)
    x = wide[..., :64]  # rows 100 values apart
    got = FewRowsLinear(function, [weight], None)(x)
    assert got.shape == (2, 5, 40)
    assert_close(got, F.linear(x, weight))
    assert_close(FewRowsLinear(function, [weight], None)(x.transpose(0, 1)), F.linear(x.transpose(0, 1), weight))


def test_too_many_rows_or_another_dtype_is_refused(function):
    kernel = FewRowsLinear(function, [torch.randn(8, 16)], None)
    with pytest.raises(ValueError, match=f"at most {MAX_ROWS} rows"):
        kernel(torch.randn(MAX_ROWS + 1, 16))
    with pytest.raises(ValueError, match="float32"):
        kernel(torch.randn(2, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="float32 weights"):
        FewRowsLinear(function, [torch.randn(8, 16, dtype=torch.bfloat16)], None)


def test_the_row_split_sends_few_rows_to_c_and_more_to_onednn_and_both_agree(function, monkeypatch):
    g = torch.Generator().manual_seed(3)
    weights, biases = [torch.randn(48, 32, generator=g), torch.randn(16, 32, generator=g)], [None, torch.randn(16)]
    kernel = RowSplitLinear(function, weights, biases)
    reference = torch.cat(weights), torch.cat([torch.zeros(48), biases[1]])
    calls = []
    for side in ("few", "many"):
        monkeypatch.setattr(kernel, side, lambda x, run=getattr(kernel, side), side=side: calls.append(side) or run(x))
    for rows in (1, MAX_ROWS, MAX_ROWS + 1, 200):
        x = torch.randn(rows, 32, generator=g)
        assert_close(kernel(x), F.linear(x, *reference))
    assert calls == ["few", "few", "many", "many"]
    monkeypatch.undo()
    assert kernel.matches_reference()  # the start-up check covers both sides


def test_the_model_through_the_c_linear_kernel_gives_transformers_logits(pair):
    """Every architecture of test_model.py (biases, Llama 3 RoPE scaling, Qwen2); 33 tokens, so every linear layer
    and the LM head run through the C kernel."""
    hf, ours = pair
    ids, mask, lengths = batch_of_unequal_lengths(hf.config.vocab_size)
    want = hf(input_ids=ids, attention_mask=mask).logits
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    assert use_linear_kernel(ours.model, "native") == "native"
    assert isinstance(ours.model.lm_head_kernel, RowSplitLinear)
    try:
        with torch.inference_mode():
            got = ours.model.logits(ours.model(positions, DenseAttention(key_mask=mask.bool()), tokens=ids))
    finally:
        use_linear_kernel(ours.model, "torch")
    for row, n in enumerate(lengths):
        assert (got[row, :n] - want[row, :n]).abs().max() < 1e-4


def test_the_setting_takes_native_on_this_cpu_and_onednn_where_native_cannot_run(tiny_llama, monkeypatch):
    _, loaded = tiny_llama
    model = loaded.model
    try:
        assert use_linear_kernel(model, "auto") == "native"  # float32, a compiler, AVX-512 (this machine and CI's)
        assert use_linear_kernel(model, "onednn") == "onednn"
        assert not isinstance(model.lm_head_kernel, RowSplitLinear)
        monkeypatch.setattr(native_linear, "load_kernel", lambda: None)
        assert use_linear_kernel(model, "auto") == "onednn"
        with pytest.raises(ValueError, match="native linear kernel cannot run here"):
            use_linear_kernel(model, "native")
        with pytest.raises(ValueError, match="auto, native, onednn, torch"):
            use_linear_kernel(model, "fast")
    finally:
        use_linear_kernel(model, "torch")


def test_a_c_kernel_that_disagrees_with_f_linear_is_not_used(tiny_llama, monkeypatch, caplog):
    _, loaded = tiny_llama
    model = loaded.model
    monkeypatch.setattr(FewRowsLinear, "__call__", lambda self, x: torch.zeros(*x.shape[:-1], self.out_features))
    try:
        assert use_linear_kernel(model, "auto") == "onednn"
        assert "C few-rows linear kernel disagrees with F.linear" in caplog.text
        with pytest.raises(ValueError, match="native linear kernel failed its start-up check"):
            use_linear_kernel(model, "native")
    finally:
        use_linear_kernel(model, "torch")


def test_a_bfloat16_model_keeps_onednn(tmp_path):
    make_tiny_hf("llama", tmp_path, vocab_size=256)
    model = load_hf_directory(tmp_path, torch.bfloat16, "cpu", "tiny-bf16").model
    assert use_linear_kernel(model, "auto") == "onednn"
    with pytest.raises(ValueError, match="float32 model"):
        use_linear_kernel(model, "native")
