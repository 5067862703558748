"""One name for each idea: the task and kind enums, a prompt's width, the base identity, dtype and device."""
import torch

from app.engine.weights import base_identity, resolve_device, resolve_dtype
from prompt_store.format import KINDS, TASKS, BaseIdentity, Kind, Task, embedding_width


def test_one_task_and_kind_vocabulary():
    assert [t.value for t in Task] == list(TASKS) == ["generate", "tag", "classify"]
    assert list(KINDS) == ["prompt", "prefix"]
    assert Task.TAG == "tag" and f"{Kind.PREFIX}" == "prefix" and Task("classify") is Task.CLASSIFY


def test_embedding_width_of_a_base_and_of_the_engines_shape(tiny_llama):
    _, tiny = tiny_llama
    base = BaseIdentity("llama", 64, 2, 2, 16, 1000, "f")
    assert embedding_width(Kind.PROMPT, base) == 64
    assert embedding_width(Kind.PREFIX, base) == 2 * 2 * 2 * 16
    assert embedding_width("prefix", tiny.args) == tiny.args.num_layers * 2 * tiny.args.kv_width


def test_base_identity_of_a_loaded_model(tiny_llama):
    _, tiny = tiny_llama
    a = tiny.args
    assert base_identity(tiny) == BaseIdentity(a.architecture, a.hidden_size, a.num_layers, a.num_kv_heads,
                                               a.head_dim, a.vocab_size, tiny.fingerprint)


def test_auto_dtype_and_device():
    assert resolve_device("cuda:1") == "cuda:1"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("auto", "cuda:0") is torch.bfloat16
    assert resolve_dtype("float16", "cpu") is torch.float16
