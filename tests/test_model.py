"""Our Llama-family model against transformers on the same weights: logits, with and without a K,V prefix."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from app.engine.model import DenseAttention
from app.engine.weights import ModelLoadError, load_hf_directory, load_model
from tests.conftest import make_tiny_hf

LLAMA3_ROPE = dict(rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                        high_freq_factor=4.0, original_max_position_embeddings=16))
CASES = {
    "llama": ("llama", {}),
    "llama3-rope-scaling": ("llama", LLAMA3_ROPE),
    "llama-attention-bias": ("llama", dict(attention_bias=True)),
    "mistral": ("mistral", dict(sliding_window=None)),
    "qwen2": ("qwen2", {}),
}


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    arch, overrides = CASES[request.param]
    directory = tmp_path_factory.mktemp(request.param)
    hf = make_tiny_hf(arch, directory, vocab_size=256, **overrides)
    return hf, load_hf_directory(directory, torch.float32, "cpu", request.param)


def batch_of_unequal_lengths(vocab: int):
    torch.manual_seed(3)
    lengths = [11, 7, 3]
    ids = torch.randint(3, vocab, (len(lengths), max(lengths)))
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1  # right padding
    return ids, mask, lengths


def test_logits_equal_transformers(pair):
    hf, ours = pair
    ids, mask, lengths = batch_of_unequal_lengths(hf.config.vocab_size)
    want = hf(input_ids=ids, attention_mask=mask).logits
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    got = ours.model.logits(ours.model(positions, DenseAttention(key_mask=mask.bool()), tokens=ids))
    for row, n in enumerate(lengths):
        assert (got[row, :n] - want[row, :n]).abs().max() < 1e-4


def test_logits_with_kv_prefix_equal_transformers_cache(pair):
    """A per-layer K,V prefix (a deep prompt) read exactly as transformers reads a filled cache at 0..P-1."""
    hf, ours = pair
    args = ours.args
    ids, mask, lengths = batch_of_unequal_lengths(hf.config.vocab_size)
    B, T, P = ids.shape[0], ids.shape[1], 5
    torch.manual_seed(4)
    prefix = [(torch.randn(1, args.num_kv_heads, P, args.head_dim), torch.randn(1, args.num_kv_heads, P, args.head_dim))
              for _ in range(args.num_layers)]
    cache = DynamicCache()
    for layer, (k, v) in enumerate(prefix):
        cache.update(k.expand(B, -1, -1, -1).clone(), v.expand(B, -1, -1, -1).clone(), layer)
    positions = (P + torch.arange(T)).expand(B, T)
    want = hf(input_ids=ids, attention_mask=torch.cat([torch.ones(B, P, dtype=mask.dtype), mask], 1),
              position_ids=positions, past_key_values=cache).logits
    got = ours.model.logits(ours.model(positions, DenseAttention(prefix=prefix, key_mask=mask.bool()), tokens=ids))
    for row, n in enumerate(lengths):
        assert (got[row, :n] - want[row, :n]).abs().max() < 1e-4


def test_forward_runs_with_autograd_through_frozen_weights(pair):
    """Training learns only inputs (a prompt) through the frozen model: gradients reach the input, not weights."""
    _, ours = pair
    embeds = torch.randn(1, 4, ours.args.hidden_size, requires_grad=True)
    hidden = ours.model(torch.arange(4)[None], DenseAttention(), embeds=embeds)
    ours.model.logits(hidden).logsumexp(-1).sum().backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0
    assert all(p.grad is None for p in ours.model.parameters())


def test_unknown_path_and_unsupported_architecture_are_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "n_embd": 8}')
    with pytest.raises(ModelLoadError, match="unsupported architecture 'gpt2'"):
        load_model(str(tmp_path))


def test_missing_weights_file_is_a_clear_error(tmp_path):
    make_tiny_hf("llama", tmp_path, vocab_size=64)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no model.safetensors"):
        load_model(str(tmp_path))


def test_bfloat16_load_keeps_the_fingerprint(pair, tmp_path):
    """A prompt trained on float32 weights must be accepted by a bfloat16 deployment of the same model."""
    hf, ours = pair
    hf.save_pretrained(tmp_path)
    bf16 = load_hf_directory(tmp_path, torch.bfloat16, "cpu", "bf16")
    assert bf16.model.embed_tokens.weight.dtype == torch.bfloat16
    assert bf16.fingerprint == ours.fingerprint


def test_serving_context_stops_at_a_sliding_window(tmp_path):
    """Attention here is always full, which equals sliding-window attention only up to the window."""
    make_tiny_hf("mistral", tmp_path, vocab_size=64, sliding_window=64)
    assert load_hf_directory(tmp_path, torch.float32, "cpu", "m").args.max_context == 64
