"""prompt_store: the file format, validation and the on-disk registry (no PEFT needed here)."""

import dataclasses
import hashlib
import io
import json
import logging
import os
import pickle
import threading
import time

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from prompt_store import (
    BaseIdentity,
    PromptExists,
    PromptFile,
    PromptFormatError,
    PromptNotFound,
    PromptRegistry,
    dump_prompt,
    import_peft_files,
    load_prompt_bytes,
    load_prompt_file,
    validate_name,
    validate_prompt,
)
from prompt_store import registry as registry_module
from prompt_store.format import MAX_DESCRIPTION_CHARS, MAX_JSON_DEPTH, MAX_METADATA_BYTES, embedding_width
from prompt_store.peft_import import parse_adapter_config
from prompt_store.registry import LOCK_FILE, VersionConflict

# The tiny Llama of the PEFT tests: hidden 64, 2 layers, 2 KV heads of 16.
BASE = BaseIdentity("llama", 64, 2, 2, 16, 128, "llama-tiny-fingerprint")


def make_prompt(name="task", kind="prompt", task="generate", P=4, labels=(), head=False, bias=False, base=BASE):
    width = embedding_width(kind, base)
    n = len(labels)
    return PromptFile(
        name=name,
        kind=kind,
        task=task,
        num_virtual_tokens=P,
        labels=list(labels),
        description=f"{kind} {task} prompt",
        base=base,
        prompt_embeddings=torch.randn(P, width),
        head_weight=torch.randn(n, base.hidden_size) if head else None,
        head_bias=torch.randn(n) if bias else None,
        created_at="2025-01-01T00:00:00+00:00",
    )


def assert_same_prompt(a: PromptFile, b: PromptFile):
    """Same content; `digest` is left out (a PromptFile built in memory has none until it is written)."""
    for field in dataclasses.fields(PromptFile):
        if field.name == "digest":
            continue
        x, y = getattr(a, field.name), getattr(b, field.name)
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            assert x is not None and y is not None, field.name
            assert torch.equal(x, y), field.name
        else:
            assert x == y, field.name


def files_under(directory):
    """Every file and folder, hidden ones included, so leftovers of a failed write show up (not the writers'
    lock file, which stays once a write happened)."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p != directory / LOCK_FILE)


# --- format -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kind="prompt", task="generate"),
        dict(kind="prefix", task="generate"),
        dict(kind="prompt", task="tag", labels=["O", "B-PER", "I-PER"], head=True, bias=True),
        dict(kind="prefix", task="classify", labels=["neg", "pos"], head=True),
        dict(kind="prompt", task="classify", labels=["yes", "no"]),  # label words, no head
    ],
)
def test_dump_load_round_trip(kwargs):
    pf = make_prompt(**kwargs)
    pf.version = 7
    validate_prompt(pf, BASE)
    data = dump_prompt(pf)
    loaded = load_prompt_bytes(data)
    assert_same_prompt(pf, loaded)
    assert loaded.digest == hashlib.sha256(data).hexdigest()
    validate_prompt(loaded, BASE)


def test_file_layout_is_float32_tensors_plus_string_metadata(tmp_path):
    pf = make_prompt(task="tag", labels=["O", "X"], head=True, bias=True)
    pf.prompt_embeddings = pf.prompt_embeddings.to(torch.bfloat16)
    path = tmp_path / "p.safetensors"
    path.write_bytes(dump_prompt(pf))
    with safe_open(str(path), "pt") as f:
        assert sorted(f.keys()) == ["head.bias", "head.weight", "prompt_embeddings"]
        assert all(f.get_tensor(key).dtype == torch.float32 for key in f.keys())
        meta = f.metadata()
    assert meta["softserve.format_version"] == "1"
    assert meta["softserve.kind"] == "prompt" and meta["softserve.task"] == "tag"
    assert meta["softserve.labels"] == '["O", "X"]'
    assert meta["softserve.num_virtual_tokens"] == "4"
    assert '"fingerprint": "llama-tiny-fingerprint"' in meta["softserve.base"]
    assert load_prompt_file(path).prompt_embeddings.dtype == torch.float32


def _torch_save_bytes(obj, **kwargs):
    buffer = io.BytesIO()
    torch.save(obj, buffer, **kwargs)
    return buffer.getvalue()


def _valid_metadata():
    data = dump_prompt(make_prompt())
    header_len = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + header_len])["__metadata__"]


def _safetensors_with(tensors, **metadata_changes):
    """A prompt file with valid metadata except for the given changes (None removes a key)."""
    metadata = {**_valid_metadata(), **metadata_changes}
    return safetensors.torch.save(tensors, metadata={k: v for k, v in metadata.items() if v is not None})


GOOD_TENSORS = {"prompt_embeddings": torch.randn(4, 64)}


@pytest.mark.parametrize(
    "make_bytes, message",
    [
        (lambda: dump_prompt(make_prompt())[:-10], "not a valid safetensors file"),
        (lambda: dump_prompt(make_prompt())[:5], "not a valid safetensors file"),
        (lambda: b"hello world, not a tensor file", "not a valid safetensors file"),
        (lambda: _torch_save_bytes({"prompt_embeddings": torch.randn(4, 64)}), "pickle files are refused"),
        (
            lambda: _torch_save_bytes(torch.randn(4, 64), _use_new_zipfile_serialization=False),
            "pickle files are refused",
        ),
        (lambda: pickle.dumps({"a": 1}, protocol=4), "pickle files are refused"),
        (lambda: safetensors.torch.save(GOOD_TENSORS), "softserve.format_version is missing"),
        (lambda: _safetensors_with(GOOD_TENSORS, **{"softserve.format_version": "2"}), "unsupported prompt format"),
        (lambda: _safetensors_with({"other": torch.randn(4, 64)}), "missing tensor 'prompt_embeddings'"),
        (lambda: _safetensors_with({**GOOD_TENSORS, "lm_head.weight": torch.randn(2, 2)}), "unexpected tensors"),
        (lambda: _safetensors_with(GOOD_TENSORS, **{"softserve.kind": "lora"}), "unknown prompt kind 'lora'"),
        (lambda: _safetensors_with(GOOD_TENSORS, **{"softserve.task": "summarize"}), "unknown task 'summarize'"),
        (lambda: _safetensors_with(GOOD_TENSORS, **{"softserve.name": None}), "missing metadata key softserve.name"),
        (lambda: _safetensors_with(GOOD_TENSORS, **{"softserve.base": "{}"}), "invalid base identity"),
    ],
)
def test_load_refuses_bad_files(make_bytes, message):
    with pytest.raises(PromptFormatError, match=message):
        load_prompt_bytes(make_bytes())


@pytest.mark.parametrize(
    "name", ["", "../x", "a/b", "base", ".hidden", "-dash", "x" * 65, "a b", "a\\b", "ü", "..", "a\x00b",
             "evil\n", "evil\r", "a\tb", "x\x7f", None, 3, ["ner"]]
)
def test_hostile_names_are_refused(name):
    with pytest.raises(PromptFormatError, match="prompt name"):
        validate_name(name)


@pytest.mark.parametrize("name", ["ner", "sentiment.v2", "A_b-3", "x" * 64, "0"])
def test_good_names_pass(name):
    validate_name(name)


def test_mismatch_names_the_first_differing_field():
    assert BASE.mismatch(BASE) is None
    assert BASE.mismatch(dataclasses.replace(BASE, num_layers=30)) == (
        "prompt was trained for a base with num_layers=2, this server's base has num_layers=30"
    )
    assert BASE.mismatch(dataclasses.replace(BASE, fingerprint="other")) == (
        "prompt was trained for another base model (fingerprint llama-tiny-fingerprint != other)"
    )
    assert BaseIdentity.from_dict(BASE.to_dict()) == BASE


def _with(**changes):
    def build():
        fields = {k: v for k, v in changes.items() if k in ("kind", "task", "P", "labels", "head", "bias", "base")}
        pf = make_prompt(**fields)
        for key, value in changes.items():
            if key not in fields:
                setattr(pf, key, value(pf) if callable(value) else value)
        return pf

    return build


def _nan_at_0(t):
    t = t.clone()
    t[0, 0] = float("nan")
    return t


BAD_PROMPTS = [
    (_with(prompt_embeddings=lambda pf: torch.randn(4, 32)), r"must be 64 wide \(hidden_size\), got 32"),
    (
        _with(kind="prefix", prompt_embeddings=lambda pf: torch.randn(4, 64)),
        r"must be 128 wide \(num_layers\*2\*num_kv_heads\*head_dim = 2\*2\*2\*16\), got 64",
    ),
    (_with(base=dataclasses.replace(BASE, fingerprint="another")), "trained for another base model"),
    (_with(base=dataclasses.replace(BASE, num_layers=3)), "num_layers=3, this server's base has num_layers=2"),
    (_with(prompt_embeddings=lambda pf: _nan_at_0(pf.prompt_embeddings)), "NaN or infinite"),
    (_with(prompt_embeddings=lambda pf: pf.prompt_embeddings / 0), "NaN or infinite"),
    (_with(prompt_embeddings=lambda pf: torch.randn(1, 4, 64)), "must be 2-D"),
    (_with(num_virtual_tokens=5), "has 4 rows but num_virtual_tokens is 5"),
    (_with(P=600), "between 1 and 512"),
    (_with(kind="deep"), "unknown prompt kind"),
    (_with(task="translate"), "unknown task"),
    (_with(name="../x"), "invalid prompt name"),
    (_with(name="a/b"), "invalid prompt name"),
    (_with(name="base"), "reserved"),
    (_with(name=""), "invalid prompt name"),
    (_with(task="generate", labels=["a"]), "must have no labels"),
    (_with(task="generate", head_weight=lambda pf: torch.randn(1, 64)), "must have no head"),
    (_with(task="tag", labels=["O", "X"]), "a tag prompt needs a head"),
    (_with(task="classify"), "needs a non-empty list of labels"),
    (_with(task="classify", labels=["a", "a"]), "labels must be unique"),
    (_with(task="classify", labels=["a", "b"], head_weight=lambda pf: torch.randn(3, 64)), r"\[2, 64\], got \[3, 64\]"),
    (_with(task="tag", labels=["a", "b"], head=True, head_bias=lambda pf: torch.randn(3)), r"head.bias must be"),
    (
        _with(task="tag", labels=["a", "b"], head=True, head_weight=lambda pf: _nan_at_0(pf.head_weight)),
        "head.weight contains NaN",
    ),
]


@pytest.mark.parametrize("build, message", BAD_PROMPTS)
def test_validate_refuses(build, message):
    with pytest.raises(PromptFormatError, match=message):
        validate_prompt(build(), BASE)


def test_validate_without_base_skips_only_base_checks():
    other = make_prompt(base=dataclasses.replace(BASE, hidden_size=32, fingerprint="x"))
    validate_prompt(other, None)
    with pytest.raises(PromptFormatError, match="NaN"):
        other.prompt_embeddings[0, 0] = float("nan")
        validate_prompt(other, None)


# --- registry -----------------------------------------------------------------------------------------


@pytest.fixture
def registry(tmp_path):
    return PromptRegistry(tmp_path / "store", BASE)


def test_versions_get_list_and_files(registry):
    first = registry.add(make_prompt("ner", task="tag", labels=["O", "PER"], head=True, bias=True))
    second = registry.add(make_prompt("ner", task="tag", labels=["O", "PER"], head=True))
    assert (first.version, second.version) == (1, 2)
    assert registry.versions("ner") == [1, 2]
    assert registry.get("ner").version == 2
    assert torch.equal(registry.get("ner").prompt_embeddings, second.prompt_embeddings)
    assert torch.equal(registry.get("ner", 1).prompt_embeddings, first.prompt_embeddings)
    assert registry.get("ner", 1).head_bias is not None and registry.get("ner").head_bias is None
    assert registry.path("ner") == registry.directory / "ner" / "v2.safetensors"
    assert_same_prompt(load_prompt_bytes(registry.read_bytes("ner", 1)), registry.get("ner", 1))

    [info] = registry.list()
    assert (info.name, info.kind, info.task, info.labels) == ("ner", "prompt", "tag", ("O", "PER"))
    assert (info.version, info.versions, info.num_virtual_tokens) == (2, [1, 2], 4)
    assert info.size_bytes == registry.path("ner").stat().st_size
    assert info.created_at == second.created_at and info.source == "softserve-train"


def test_old_versions_are_pruned(tmp_path):
    registry = PromptRegistry(tmp_path, BASE, keep_versions=1)
    for _ in range(4):
        registry.add(make_prompt("gen"))
    assert registry.versions("gen") == [3, 4]
    assert files_under(tmp_path) == ["gen", "gen/v3.safetensors", "gen/v4.safetensors"]


def test_replace_false_refuses_an_existing_name(registry):
    registry.add(make_prompt("gen"))
    with pytest.raises(PromptExists, match="already exists"):
        registry.add(make_prompt("gen"), replace=False)
    assert registry.versions("gen") == [1]


def test_missing_prompts_raise_prompt_not_found(registry):
    registry.add(make_prompt("gen"))
    with pytest.raises(PromptNotFound) as err:
        registry.get("nope")
    assert isinstance(err.value, KeyError) and str(err.value) == "no prompt named 'nope'"
    with pytest.raises(PromptNotFound, match=r"has no version 9 \(versions: 1\)"):
        registry.get("gen", 9)


@pytest.mark.parametrize("build, message", BAD_PROMPTS)
def test_refused_prompts_leave_the_store_unchanged(registry, build, message):
    registry.add(make_prompt("keep"))
    before = files_under(registry.directory)
    with pytest.raises(PromptFormatError, match=message):
        registry.add(build())
    assert files_under(registry.directory) == before
    assert [info.name for info in registry.list()] == ["keep"]


@pytest.mark.parametrize(
    "data, message",
    [
        (lambda: dump_prompt(make_prompt())[:-3], "not a valid safetensors file"),
        (lambda: _torch_save_bytes({"prompt_embeddings": torch.randn(4, 64)}), "pickle files are refused"),
    ],
)
def test_refused_uploads_leave_the_store_unchanged(registry, data, message):
    before = files_under(registry.directory)
    with pytest.raises(PromptFormatError, match=message):
        registry.add(load_prompt_bytes(data()))
    assert files_under(registry.directory) == before


def test_failed_write_leaves_no_file_and_no_temp_file(registry, monkeypatch):
    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "link", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        registry.add(make_prompt("new"))
    assert files_under(registry.directory) == []
    assert "new" not in registry

    monkeypatch.undo()
    registry.add(make_prompt("new"))
    monkeypatch.setattr(os, "link", broken_replace)
    with pytest.raises(OSError):
        registry.add(make_prompt("new"))
    assert files_under(registry.directory) == ["new", "new/v1.safetensors"]
    assert registry.get("new").version == 1


def test_delete_removes_every_version(registry):
    events = []
    registry.subscribe(lambda *event: events.append(event))
    registry.add(make_prompt("gen"))
    registry.add(make_prompt("gen"))
    registry.delete("gen")
    assert files_under(registry.directory) == []
    assert registry.list() == []
    assert events == [("added", "gen", 1), ("added", "gen", 2), ("removed", "gen", 2)]
    with pytest.raises(PromptNotFound):
        registry.delete("gen")
    with pytest.raises(PromptFormatError):
        registry.delete("../store")


def test_read_only_registry_lists_but_cannot_add(registry):
    registry.add(make_prompt("gen"))
    reader = PromptRegistry(registry.directory, base=None)
    assert [info.name for info in reader.list()] == ["gen"]
    with pytest.raises(RuntimeError, match="without a base identity"):
        reader.add(make_prompt("other"))


def test_second_replica_sees_adds_and_deletes_after_refresh(registry):
    replica = PromptRegistry(registry.directory, BASE)
    events = []
    replica.subscribe(lambda *event: events.append(event))

    registry.add(make_prompt("gen"))
    assert replica.refresh() == ({"gen"}, set())
    assert torch.equal(replica.get("gen").prompt_embeddings, registry.get("gen").prompt_embeddings)
    assert replica.refresh() == (set(), set())  # nothing new: nothing reported

    registry.add(make_prompt("gen"))
    assert replica.refresh() == ({"gen"}, set())
    assert replica.get("gen").version == 2

    registry.delete("gen")
    assert replica.refresh() == (set(), {"gen"})
    assert replica.list() == []
    assert events == [("added", "gen", 1), ("added", "gen", 2), ("removed", "gen", 2)]


def test_refresh_ignores_temp_and_invalid_files(registry, caplog):
    registry.add(make_prompt("good"))
    directory = registry.directory
    (directory / "junk").mkdir()
    (directory / "junk" / "v1.safetensors").write_bytes(b"not a prompt")
    (directory / "good" / ".v2.safetensors.abc.tmp").write_bytes(b"half written")
    (directory / ".deleting-old-123").mkdir()
    (directory / "README.txt").write_text("not a prompt folder")
    foreign = make_prompt("foreign", base=dataclasses.replace(BASE, fingerprint="someone-else"))
    foreign.version = 1
    (directory / "foreign").mkdir()
    (directory / "foreign" / "v1.safetensors").write_bytes(dump_prompt(foreign))

    with caplog.at_level(logging.WARNING):
        assert registry.refresh() == (set(), set())
    assert [info.name for info in registry.list()] == ["good"]
    assert "not a valid safetensors file" in caplog.text and "trained for another base model" in caplog.text

    caplog.clear()
    registry.refresh()  # already reported: not logged on every poll
    assert caplog.text == ""
    # Without a base, the other base's prompt is readable (e.g. by `softserve prompts list`).
    assert [info.name for info in PromptRegistry(directory, base=None).list()] == ["foreign", "good"]


def test_watcher_reports_another_writers_changes(registry):
    watcher = PromptRegistry(registry.directory, BASE)
    seen = []
    got_change = threading.Event()

    def on_change(event, name, version):
        seen.append((event, name, version))
        got_change.set()

    watcher.subscribe(on_change)
    watcher.start_watching(interval_s=0.05)
    try:
        registry.add(make_prompt("gen"))
        assert got_change.wait(timeout=5)
        assert seen[0] == ("added", "gen", 1)
        got_change.clear()
        registry.delete("gen")
        assert got_change.wait(timeout=5)
        assert seen[-1] == ("removed", "gen", 1)
    finally:
        watcher.stop_watching()


# --- replicas that agree ----------------------------------------------------------------------------


def test_listing_shows_the_digest_of_the_stored_file(registry):
    stored = registry.add(make_prompt("gen"))
    [info] = registry.list()
    assert info.digest == stored.digest == hashlib.sha256(registry.read_bytes("gen")).hexdigest()
    assert registry.get("gen").digest == stored.digest


def test_delete_and_recreate_as_the_same_version_reaches_a_replica(registry):
    """F7: v1 deleted and re-created with other tensors must not leave a replica on the old ones."""
    replica = PromptRegistry(registry.directory, BASE)
    events = []
    replica.subscribe(lambda *event: events.append(event))
    old = registry.add(make_prompt("gen"))
    replica.refresh()
    registry.delete("gen")
    new = registry.add(make_prompt("gen"))  # v1 again, other content, between two polls of the replica
    assert (old.version, new.version) == (1, 1) and old.digest != new.digest
    assert replica.refresh() == ({"gen"}, set())
    assert replica.get("gen").digest == new.digest
    assert torch.equal(replica.get("gen").prompt_embeddings, new.prompt_embeddings)
    assert events == [("added", "gen", 1), ("added", "gen", 1)]


def test_watching_replica_converges_after_delete_and_recreate(registry):
    replica = PromptRegistry(registry.directory, BASE)
    registry.add(make_prompt("gen"))
    replica.refresh()
    replica.start_watching(interval_s=0.05)
    try:
        registry.delete("gen")
        new = registry.add(make_prompt("gen"))
        deadline = time.monotonic() + 5
        while replica.get("gen").digest != new.digest and time.monotonic() < deadline:
            time.sleep(0.02)
        assert replica.get("gen").digest == new.digest
    finally:
        replica.stop_watching()


def test_two_writers_of_one_version_never_both_succeed(registry, monkeypatch):
    """Two replicas that both saw no file pick v1; the second to link gets VersionConflict, not a silent
    overwrite, and leaves nothing behind."""
    replica = PromptRegistry(registry.directory, BASE)
    first = registry.add(make_prompt("gen"))
    monkeypatch.setattr(registry_module, "_version_files", lambda folder: {})  # it scanned before the write
    with pytest.raises(VersionConflict, match="another writer stored version 1 of prompt 'gen'.*retry"):
        replica.add(make_prompt("gen"))
    monkeypatch.undo()
    assert files_under(registry.directory) == ["gen", "gen/v1.safetensors"]
    assert load_prompt_file(registry.path("gen")).digest == first.digest
    assert replica.add(make_prompt("gen")).version == 2  # a retry succeeds


def test_stale_temp_files_are_removed_at_start(registry):
    registry.add(make_prompt("gen"))
    folder = registry.directory / "gen"
    old_temp, fresh_temp = folder / ".v2.safetensors.aaa.tmp", folder / ".v2.safetensors.bbb.tmp"
    doomed = registry.directory / ".deleting-x-123"
    for path in (old_temp, fresh_temp):
        path.write_bytes(b"half")
    doomed.mkdir()
    (doomed / "v1.safetensors").write_bytes(b"x")
    ten_minutes_ago = time.time() - 600
    for path in (old_temp, doomed):
        os.utime(path, (ten_minutes_ago, ten_minutes_ago))
    PromptRegistry(registry.directory, base=None)  # read-only: changes nothing
    assert old_temp.exists() and doomed.exists()
    PromptRegistry(registry.directory, BASE)
    assert files_under(registry.directory) == ["gen", "gen/.v2.safetensors.bbb.tmp", "gen/v1.safetensors"]


def test_stored_files_follow_the_umask(registry):
    previous = os.umask(0o027)
    try:
        registry.add(make_prompt("shared"))
    finally:
        os.umask(previous)
    assert registry.path("shared").stat().st_mode & 0o777 == 0o640  # group-readable for another replica user


# --- PEFT import: odd configs and tensors are refusals, never crashes -----------------------------------

PEFT_CONFIG = {"peft_type": "PROMPT_TUNING", "task_type": "SEQ_CLS", "num_virtual_tokens": 4}


def _adapter(embeddings=None, **extra):
    tensors = {"prompt_embeddings": torch.randn(4, 64) if embeddings is None else embeddings, **extra}
    return safetensors.torch.save(tensors)


@pytest.mark.parametrize("field", ["peft_type", "task_type"])
@pytest.mark.parametrize("value", [["PROMPT_TUNING"], {"PROMPT_TUNING": 1}, 3, 1.5, None, True, ""])
def test_peft_config_with_odd_types_is_refused(field, value):
    with pytest.raises(PromptFormatError, match="is not supported"):
        import_peft_files({**PEFT_CONFIG, field: value}, _adapter(), "x", BASE, ["a", "b"])


@pytest.mark.parametrize("config", [[], "PROMPT_TUNING", 3, None])
def test_peft_config_that_is_not_an_object_is_refused(config):
    with pytest.raises(PromptFormatError, match="must be a JSON object"):
        import_peft_files(config, _adapter(), "x", BASE)


@pytest.mark.parametrize("tensors, message", [
    (dict(**{"score.weight": torch.tensor(1.0)}), "2-D weight"),
    (dict(**{"score.weight": torch.randn(2)}), "2-D weight"),
    (dict(**{"score.weight": torch.randn(2, 64, 1)}), "2-D weight"),
    (dict(**{"score.weight": torch.randn(2, 64), "score.bias": torch.tensor(0.5)}), "1-D bias"),
    (dict(**{"score.weight": torch.randn(2, 64), "score.bias": torch.randn(2, 1)}), "1-D bias"),
    (dict(**{"score.weight": torch.randn(0, 64)}), "labels"),
    (dict(**{"score.weight": torch.ones(2, 64, dtype=torch.int32)}), "floating-point"),
])
def test_peft_heads_of_odd_shapes_are_refused(tensors, message):
    with pytest.raises(PromptFormatError, match=message):
        import_peft_files(PEFT_CONFIG, _adapter(**tensors), "x", BASE)


@pytest.mark.parametrize("embeddings, message", [
    (torch.tensor(1.0), "shape"), (torch.randn(4), "shape"), (torch.randn(4, 64, 1), "shape"),
    (torch.ones(4, 64, dtype=torch.int64), "floating-point"), (torch.zeros(4, 64, dtype=torch.bool), "floating-point"),
])
def test_peft_embeddings_of_odd_shapes_are_refused(embeddings, message):
    with pytest.raises(PromptFormatError, match=message):
        import_peft_files(PEFT_CONFIG, _adapter(embeddings), "x", BASE, ["a", "b"])


@pytest.mark.parametrize("changes, message", [
    ({"softserve.base": json.dumps({**BASE.to_dict(), "hidden_size": float("inf")})}, "invalid base identity"),
    ({"softserve.base": "[1, 2]"}, "invalid base identity"),
    ({"softserve.base": '"text"'}, "invalid base identity"),
    ({"softserve.labels": '{"a": 1}'}, "must be a JSON list"),
    ({"softserve.num_virtual_tokens": "4.5"}, "must be an integer"),
])
def test_prompt_file_metadata_of_odd_types_is_refused(changes, message):
    with pytest.raises(PromptFormatError, match=message):
        load_prompt_bytes(_safetensors_with(GOOD_TENSORS, **changes))


def test_prompt_file_with_integer_tensors_is_refused():
    with pytest.raises(PromptFormatError, match="must be floating-point"):
        load_prompt_bytes(_safetensors_with({"prompt_embeddings": torch.ones(4, 64, dtype=torch.int32)}))


# --- metadata limits: refusals that name the field and the limit, never a RecursionError ----------------

def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 100_000])
def test_deeply_nested_json_metadata_is_refused(depth):
    with pytest.raises(PromptFormatError, match=f"softserve.labels is nested more than {MAX_JSON_DEPTH} levels"):
        load_prompt_bytes(_safetensors_with(GOOD_TENSORS, **{"softserve.labels": _nested(depth)}))
    with pytest.raises(PromptFormatError, match=f"adapter_config.json is nested more than {MAX_JSON_DEPTH} levels"):
        parse_adapter_config(('{"peft_type": ' + _nested(depth) + "}").encode())


def test_oversized_metadata_is_refused_before_it_is_parsed():
    big = "x" * (MAX_METADATA_BYTES + 1)
    with pytest.raises(PromptFormatError, match=f"metadata is [0-9]+ bytes; the limit is {MAX_METADATA_BYTES} bytes "
                                                "\\(MAX_METADATA_BYTES\\)"):
        load_prompt_bytes(_safetensors_with(GOOD_TENSORS, **{"softserve.description": big}))
    with pytest.raises(PromptFormatError, match=f"adapter_config.json is .* bytes; the limit is {MAX_METADATA_BYTES}"):
        parse_adapter_config(json.dumps({"peft_type": big}).encode())


def test_description_over_the_limit_is_refused():
    pf = make_prompt()
    pf.description = "d" * MAX_DESCRIPTION_CHARS
    validate_prompt(pf, BASE)
    pf.description += "d"
    with pytest.raises(PromptFormatError, match=f"description is {MAX_DESCRIPTION_CHARS + 1} characters long; the "
                                                f"limit is {MAX_DESCRIPTION_CHARS} \\(MAX_DESCRIPTION_CHARS\\)"):
        validate_prompt(pf, BASE)


def test_labels_that_would_overflow_the_metadata_are_refused_before_storing(registry):
    """What validation accepts the store can read again: a file's metadata is checked as it would be written."""
    labels = [f"label-{i:06d}-" + "x" * 50 for i in range(MAX_METADATA_BYTES // 50)]
    with pytest.raises(PromptFormatError, match="metadata is .* bytes; the limit"):
        registry.add(make_prompt("many", task="classify", labels=labels))
    assert registry.list() == []


# --- concurrent writers on one store ----------------------------------------------------------------------

def test_two_replicas_adding_and_deleting_one_name_never_break(tmp_path, caplog):
    """Two registries on one folder (two replicas) add and delete one name as fast as they can: each add
    stores a version or reports a conflict, each delete deletes or finds nothing; listing and refreshing never
    fail, no name is ever indexed without a version, and both end on what the folder holds."""
    replicas = [PromptRegistry(tmp_path, BASE), PromptRegistry(tmp_path, BASE)]
    failures, stop = [], threading.Event()

    def write(registry, seed):
        rng = torch.Generator().manual_seed(seed)
        while not stop.is_set():
            try:
                if torch.rand(1, generator=rng) < 0.5:
                    registry.add(make_prompt("raced"))
                else:
                    registry.delete("raced")
            except (PromptNotFound, VersionConflict):
                pass
            except Exception as e:  # noqa: BLE001 (what the test is about)
                failures.append(repr(e))

    def read(registry):
        while not stop.is_set():
            try:
                infos = registry.list()
                registry.refresh()
                assert all(info.versions and info.history for info in infos)
            except Exception as e:  # noqa: BLE001
                failures.append(repr(e))

    threads = [threading.Thread(target=write, args=(r, i)) for i, r in enumerate(replicas)]
    threads += [threading.Thread(target=read, args=(r,)) for r in replicas]
    with caplog.at_level(logging.WARNING):
        for t in threads:
            t.start()
        time.sleep(2)
        stop.set()
        for t in threads:
            t.join()
    assert failures == []
    assert caplog.text == ""  # no failed refresh, no file ignored as invalid
    for registry in replicas:
        registry.refresh()
    assert [r.current("raced") for r in replicas] == [replicas[0].current("raced")] * 2
    on_disk = registry_module._version_files(tmp_path / "raced")
    assert replicas[0].versions("raced") == sorted(on_disk) if on_disk else "raced" not in replicas[0]
