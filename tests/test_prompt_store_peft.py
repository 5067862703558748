"""Importing real PEFT adapters: the imported tensors must be exactly what PEFT itself feeds the model."""

import dataclasses
import json

import pytest
import torch

peft = pytest.importorskip("peft")
from peft import LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from prompt_store import BaseIdentity, PromptFormatError, PromptRegistry, import_peft_dir, import_peft_files

P = 5
NUM_LABELS = 3
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    num_labels=NUM_LABELS,
    pad_token_id=0,
)
LLAMA = LlamaConfig(head_dim=16, **TINY)
QWEN2 = Qwen2Config(**TINY)


def base_identity(config) -> BaseIdentity:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return BaseIdentity(
        architecture=config.model_type,
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        num_kv_heads=config.num_key_value_heads,
        head_dim=head_dim,
        vocab_size=config.vocab_size,
        fingerprint=f"{config.model_type}-tiny-test",
    )


def save_adapter(tmp_path, model_cls, config, peft_config, **save_kwargs):
    torch.manual_seed(0)
    peft_model = get_peft_model(model_cls(config), peft_config)
    peft_model.eval()
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir, **save_kwargs)
    return peft_model, adapter_dir


def prefix_kv_as_engine_reads_it(embeddings, base: BaseIdentity):
    """The reshape the engine does: [P, L*2*kv*hd] -> per layer (K, V), each [kv_heads, P, head_dim]."""
    rows = embeddings.view(P, base.num_layers * 2, base.num_kv_heads, base.head_dim)  # (P, L*2, kv, hd)
    per_layer = rows.permute(1, 2, 0, 3).split(2)  # L x (2, kv, P, hd)
    return [(kv[0], kv[1]) for kv in per_layer]


CASES = {
    "llama prompt tuning": (
        LlamaForCausalLM,
        LLAMA,
        lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P),
    ),
    "llama p-tuning mlp": (
        LlamaForCausalLM,
        LLAMA,
        lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, encoder_hidden_size=32),
    ),
    "llama p-tuning lstm": (
        LlamaForCausalLM,
        LLAMA,
        lambda: PromptEncoderConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=P, encoder_hidden_size=32, encoder_reparameterization_type="LSTM"
        ),
    ),
    "llama prefix": (LlamaForCausalLM, LLAMA, lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)),
    "llama prefix projection": (
        LlamaForCausalLM,
        LLAMA,
        lambda: PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=True, encoder_hidden_size=32
        ),
    ),
    "qwen2 prompt tuning": (
        Qwen2ForCausalLM,
        QWEN2,
        lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P),
    ),
    "qwen2 prefix projection": (
        Qwen2ForCausalLM,
        QWEN2,
        lambda: PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=True, encoder_hidden_size=32
        ),
    ),
    "llama seq-cls prompt tuning": (
        LlamaForSequenceClassification,
        LLAMA,
        lambda: PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=P),
    ),
    "llama seq-cls prefix": (
        LlamaForSequenceClassification,
        LLAMA,
        lambda: PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=P),
    ),
    "llama token-cls prompt tuning": (
        LlamaForTokenClassification,
        LLAMA,
        lambda: PromptTuningConfig(task_type="TOKEN_CLS", num_virtual_tokens=P),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_imported_prompt_equals_what_peft_uses(tmp_path, case):
    model_cls, config, make_peft_config = CASES[case]
    peft_config = make_peft_config()
    base = base_identity(config)
    peft_model, adapter_dir = save_adapter(tmp_path, model_cls, config, peft_config)

    pf = import_peft_dir(adapter_dir, "task", base)
    assert pf.source == f"peft:{peft_config.peft_type.value}"
    assert pf.num_virtual_tokens == P and pf.prompt_embeddings.dtype == torch.float32

    with torch.no_grad():
        peft_prompt = peft_model.get_prompt(batch_size=1)
    if pf.kind == "prompt":
        torch.testing.assert_close(pf.prompt_embeddings, peft_prompt[0])
    else:
        ours = prefix_kv_as_engine_reads_it(pf.prompt_embeddings, base)
        assert len(peft_prompt.layers) == base.num_layers
        for (key, value), layer in zip(ours, peft_prompt.layers):
            torch.testing.assert_close(key, layer.keys[0])
            torch.testing.assert_close(value, layer.values[0])

    task = {"CAUSAL_LM": "generate", "SEQ_CLS": "classify", "TOKEN_CLS": "tag"}[peft_config.task_type]
    assert pf.task == task
    if task == "generate":
        assert pf.head_weight is None and pf.labels == []
    else:
        score = peft_model.base_model.score.modules_to_save["default"]
        assert pf.labels == [f"LABEL_{i}" for i in range(NUM_LABELS)]
        torch.testing.assert_close(pf.head_weight, score.weight)
        if score.bias is None:  # LlamaForSequenceClassification's score has no bias, the token one has
            assert pf.head_bias is None
        else:
            torch.testing.assert_close(pf.head_bias, score.bias)


def test_bytes_entry_point_matches_directory_import(tmp_path):
    _, adapter_dir = save_adapter(
        tmp_path, LlamaForTokenClassification, LLAMA, PromptTuningConfig(task_type="TOKEN_CLS", num_virtual_tokens=P)
    )
    base = base_identity(LLAMA)
    labels = ["O", "B-PER", "I-PER"]
    from_dir = import_peft_dir(adapter_dir, "ner", base, labels=labels, description="names")
    from_bytes = import_peft_files(
        json.loads((adapter_dir / "adapter_config.json").read_text()),
        (adapter_dir / "adapter_model.safetensors").read_bytes(),
        "ner",
        base,
        labels=labels,
        description="names",
    )
    assert from_bytes.labels == labels and from_bytes.description == "names"
    assert torch.equal(from_dir.prompt_embeddings, from_bytes.prompt_embeddings)
    assert torch.equal(from_dir.head_weight, from_bytes.head_weight)
    assert torch.equal(from_dir.head_bias, from_bytes.head_bias)


def test_imported_adapter_round_trips_through_the_registry(tmp_path):
    _, adapter_dir = save_adapter(
        tmp_path, LlamaForCausalLM, LLAMA, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)
    )
    registry = PromptRegistry(tmp_path / "store", base_identity(LLAMA))
    pf = import_peft_dir(adapter_dir, "deep", base_identity(LLAMA))
    registry.add(pf)
    stored = PromptRegistry(tmp_path / "store", base_identity(LLAMA)).get("deep")
    assert (stored.kind, stored.task, stored.version, stored.source) == ("prefix", "generate", 1, "peft:PREFIX_TUNING")
    assert torch.equal(stored.prompt_embeddings, pf.prompt_embeddings)


def _adapter(tmp_path, model_cls, peft_config, **save_kwargs):
    return save_adapter(tmp_path, model_cls, LLAMA, peft_config, **save_kwargs)[1]


def _edit_config(adapter_dir, **changes):
    path = adapter_dir / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return adapter_dir


BAD_ADAPTERS = {
    "lora": (
        lambda tmp: _adapter(tmp, LlamaForCausalLM, LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"])),
        {},
        "PEFT type 'LORA' is not supported; supported: PROMPT_TUNING, P_TUNING, PREFIX_TUNING",
    ),
    "pickle weights": (
        lambda tmp: _adapter(
            tmp,
            LlamaForCausalLM,
            PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P),
            safe_serialization=False,
        ),
        {},
        "pickle files are refused",
    ),
    "labels count != head rows": (
        lambda tmp: _adapter(
            tmp, LlamaForSequenceClassification, PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=P)
        ),
        {"labels": ["neg", "pos"]},
        "2 labels given but the adapter's head has 3 rows",
    ),
    "labels on a generate adapter": (
        lambda tmp: _adapter(tmp, LlamaForCausalLM, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)),
        {"labels": ["a"]},
        "must have no labels",
    ),
    "unsupported task type": (
        lambda tmp: _edit_config(
            _adapter(tmp, LlamaForCausalLM, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)),
            task_type="SEQ_2_SEQ_LM",
        ),
        {},
        "task type 'SEQ_2_SEQ_LM' is not supported",
    ),
    "config disagrees with tensor": (
        lambda tmp: _edit_config(
            _adapter(tmp, LlamaForCausalLM, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)),
            num_virtual_tokens=7,
        ),
        {},
        r"shape \[5, 64\] but adapter_config.json says num_virtual_tokens=7",
    ),
    "shallow prompt for a wider base": (
        lambda tmp: _adapter(tmp, LlamaForCausalLM, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)),
        {"base": dataclasses.replace(base_identity(LLAMA), hidden_size=128)},
        r"must be 128 wide \(hidden_size\), got 64",
    ),
    "prefix for another layer count": (
        lambda tmp: _adapter(tmp, LlamaForCausalLM, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)),
        {"base": dataclasses.replace(base_identity(LLAMA), num_layers=4)},
        "prefix adapter was made for num_layers=2, this server's base needs num_layers=4",
    ),
    "prefix with another head split": (
        lambda tmp: _adapter(tmp, LlamaForCausalLM, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)),
        {"base": dataclasses.replace(base_identity(LLAMA), num_kv_heads=4, head_dim=8)},
        "prefix adapter was made for num_attention_heads=2, this server's base needs num_attention_heads=4",
    ),
    "hostile name": (
        lambda tmp: _adapter(tmp, LlamaForCausalLM, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)),
        {"name": "../escape"},
        "invalid prompt name",
    ),
}


@pytest.mark.parametrize("case", list(BAD_ADAPTERS))
def test_bad_adapters_are_refused_and_store_unchanged(tmp_path, case):
    make_dir, overrides, message = BAD_ADAPTERS[case]
    adapter_dir = make_dir(tmp_path)
    registry = PromptRegistry(tmp_path / "store", base_identity(LLAMA))
    before = sorted((tmp_path / "store").rglob("*"))
    kwargs = {"name": "task", "base": base_identity(LLAMA), **overrides}
    with pytest.raises(PromptFormatError, match=message):
        registry.add(import_peft_dir(adapter_dir, **kwargs))
    assert sorted((tmp_path / "store").rglob("*")) == before


def test_classify_adapter_without_head_needs_label_words(tmp_path):
    adapter_dir = _adapter(tmp_path, LlamaForCausalLM, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    config = {**json.loads((adapter_dir / "adapter_config.json").read_text()), "task_type": "SEQ_CLS"}
    weights = (adapter_dir / "adapter_model.safetensors").read_bytes()
    base = base_identity(LLAMA)
    with pytest.raises(PromptFormatError, match="has no head: give its labels"):
        import_peft_files(config, weights, "yesno", base)
    pf = import_peft_files(config, weights, "yesno", base, labels=["yes", "no"])
    assert (pf.task, pf.labels, pf.head_weight) == ("classify", ["yes", "no"], None)
