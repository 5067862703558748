"""--model as a Hugging Face hub id: read from a hub cache (built here from the default model's files) with
HF_HUB_OFFLINE, and a clear error when it is not there."""
from __future__ import annotations

import shutil

import pytest
import torch

from app.engine.weights import ModelLoadError, fetch_default_model, load_model

REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline_hub(tmp_path, cache_dir, monkeypatch):
    """A hub cache holding acme/smol (the default model's files), and the hub client offline on it."""
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--acme--smol"
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    for f in fetch_default_model(cache_dir).iterdir():
        (snapshot / f.name).symlink_to(f) if f.suffix == ".safetensors" else shutil.copy(f, snapshot / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return snapshot


def test_hub_id_loads_from_the_offline_cache(offline_hub, default_model):
    loaded = load_model("acme/smol", torch.float32, "cpu")
    assert loaded.name == "acme/smol" and loaded.directory == offline_hub
    assert loaded.fingerprint == default_model.fingerprint


def test_hub_id_not_cached_offline_is_a_clear_error(offline_hub):
    with pytest.raises(ModelLoadError, match="acme/absent.*HF_HUB_OFFLINE"):
        load_model("acme/absent", torch.float32, "cpu")
