"""The C kernels for RMSNorm, RoPE and SiLU-and-mul (app/engine/native/layer_ops.c) against the model's torch
forms, the model's logits with them against transformers' reference path, and training left on torch."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from app.engine import native_library
from app.engine.model import DenseAttention, apply_rope
from app.engine.native_layer_ops import LayerOps, use_layer_ops
from tests.test_model import batch_of_unequal_lengths, pair  # pair: a fixture (every architecture), used by name

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.fixture(scope="module")
def ops() -> LayerOps:
    library = native_library.load()
    assert library is not None, "this machine (and CI's) has a C compiler: the kernels must build"
    return LayerOps(library)


def close(got, want, dtype):
    assert got.shape == want.shape and got.dtype == want.dtype
    assert (got.float() - want.float()).abs().max().item() <= TOLERANCE[dtype] * max(1.0, want.float().abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_hf_llama_rms_norm(ops, dtype):
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(2, 5, 576, generator=g)).to(dtype)
    weight = torch.rand(576, generator=g).to(dtype)
    want = weight * F.rms_norm(x.float(), (576,), eps=1e-5).to(dtype)
    close(ops.rms_norm(x, weight, 1e-5), want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_matches_the_two_torch_ops(ops, dtype):
    g = torch.Generator().manual_seed(1)
    gate_up = (4 * torch.randn(1, 9, 2 * 1536, generator=g)).to(dtype)
    gate, up = gate_up.chunk(2, -1)
    close(ops.silu_and_mul(gate_up), F.silu(gate) * up, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch, tokens", [(1, 11), (6, 1)])  # a step's flat token list; a static decode step
def test_rope_in_place_on_views_of_one_projection_matches_apply_rope(ops, dtype, batch, tokens):
    heads, kv_heads, head_dim = 9, 3, 64
    g = torch.Generator().manual_seed(2)
    qkv = torch.randn(batch, tokens, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
    q, k = q.view(batch, tokens, heads, head_dim), k.view(batch, tokens, kv_heads, head_dim)
    v_before = v.clone()
    angles = torch.rand(batch, tokens, 1, head_dim // 2, generator=g) * 100
    cos = torch.cat((angles.cos(), angles.cos()), -1).to(dtype)
    sin_signed = torch.cat((-angles.sin(), angles.sin()), -1).to(dtype)
    want_q, want_k = apply_rope(q, cos, sin_signed), apply_rope(k, cos, sin_signed)
    got_q, got_k = ops.rope(q, k, cos, sin_signed)
    close(got_q, want_q, dtype)
    close(got_k, want_k, dtype)
    assert torch.equal(v, v_before)  # the values beside them are untouched


def test_the_model_with_the_c_kernels_gives_transformers_logits(pair):
    """Every architecture of test_model.py (biases, Llama 3 RoPE scaling, Qwen2), a batch of unequal lengths."""
    hf, ours = pair
    ids, mask, lengths = batch_of_unequal_lengths(hf.config.vocab_size)
    want = hf(input_ids=ids, attention_mask=mask).logits
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    assert use_layer_ops(ours.model, "native") == "native"
    try:
        with torch.inference_mode():  # the kernels run at inference only
            got = ours.model.logits(ours.model(positions, DenseAttention(key_mask=mask.bool()), tokens=ids))
    finally:
        use_layer_ops(ours.model, "torch")
    for row, n in enumerate(lengths):
        assert (got[row, :n] - want[row, :n]).abs().max() < 1e-4


def test_with_autograd_on_the_model_runs_its_torch_forms_and_gradients_flow(tiny_llama):
    _, loaded = tiny_llama
    model = loaded.model
    assert use_layer_ops(model, "native") == "native"
    norm = model.layers[0].input_layernorm
    x = torch.randn(1, 4, model.args.hidden_size, requires_grad=True)
    out = norm(x)  # grad enabled: the torch form, which autograd can differentiate
    assert out.grad_fn is not None
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with torch.inference_mode():
        assert (norm(x.detach()) - out.detach()).abs().max() < 1e-5  # the kernel, at inference


def test_the_layer_ops_setting(tiny_llama):
    _, loaded = tiny_llama
    model = loaded.model
    assert use_layer_ops(model, "torch") == "torch"
    assert model.layers[0].input_layernorm.kernel is None and model.layers[0].mlp.act_kernel is None
    assert use_layer_ops(model, "auto") == "native"  # a CPU with a compiler
    assert model.norm.kernel is not None and model.layers[-1].self_attn.rope_kernel is not None
    with pytest.raises(ValueError, match="auto, native, torch"):
        use_layer_ops(model, "fast")


def test_strided_inputs_are_read_as_they_lie(ops):
    """A row-slice of a wider tensor (rows further apart than their length) and a transposed one (a copy)."""
    g = torch.Generator().manual_seed(4)
    wide = torch.randn(6, 700, generator=g)
    x, weight = wide[:, :576], torch.rand(576, generator=g)
    close(ops.rms_norm(x, weight, 1e-6), weight * F.rms_norm(x, (576,), eps=1e-6), torch.float32)
    transposed = torch.randn(2 * 64, 5, generator=g).t()  # (5, 128), last dim strided
    gate, up = transposed.chunk(2, -1)
    close(ops.silu_and_mul(transposed), F.silu(gate) * up, torch.float32)
