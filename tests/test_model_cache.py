"""The default model serves from its converted copy alone: the image deletes the GGUF it came from."""
from __future__ import annotations

from app.engine.weights import fetch_default_model


def test_the_converted_copy_alone_is_enough(tmp_path, cache_dir):
    converted = fetch_default_model(cache_dir)
    (tmp_path / "converted").mkdir()
    (tmp_path / "converted" / converted.name).symlink_to(converted)
    assert fetch_default_model(tmp_path) == tmp_path / "converted" / converted.name
    assert not (tmp_path / "default").exists()  # no GGUF needed, nothing downloaded
