"""The engine's one cache of built prompts: every built version (the served one, pinned ones, replaced ones)
under one key, (name, version, digest), one LRU order and one memory budget; older versions bounded in number."""
from __future__ import annotations

import torch

from app.engine.prompt_cache import OLDER_KEPT, PromptCache
from app.engine.task_prompt import TaskPrompt, as_stored
from prompt_store.format import Kind, Task

NBYTES = 2 * 4 * 4  # k and v below: 4 float32 values each


def built(name: str, version: int, digest: str = "") -> TaskPrompt:
    prompt = TaskPrompt(name, version, Kind.PROMPT, Task.GENERATE, [], torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4))
    return as_stored(prompt, version, digest or f"d{version}")


def no_file():
    raise AssertionError("a built version is never read again")


def test_the_served_version_and_older_ones_are_one_cache():
    cache = PromptCache()
    v1, v2 = built("p", 1), built("p", 2)
    cache.serve(v1.key, no_file)
    cache.add(v1)
    cache.serve(v2.key, no_file)  # replaced: v1 stays built, as an older version
    cache.add(v2)
    pinned = cache.add(built("other", 5))  # asked for by number; "other" serves nothing yet
    assert cache.built_current("p") is v2 and cache.built(("p", 1, "d1")) is v1
    assert cache.built(("other", 5, "d5")) is pinned
    assert (len(cache), cache.num_built, cache.built_bytes) == (1, 3, 3 * NBYTES)
    assert cache.built(("p", 1, "another digest")) is None  # a version is its number and its digest


def test_one_budget_evicts_the_least_recently_used_of_every_kind():
    cache = PromptCache(budget_bytes=2 * NBYTES)
    served, older = built("a", 2), built("a", 1)
    cache.serve(served.key, no_file)
    cache.add(served)
    cache.add(older)
    cache.touch(served)  # a request arrived: `older` is now the least recently used
    cache.add(built("b", 1))
    assert cache.built(older.key) is None and cache.built(served.key) is served
    assert (cache.num_built, cache.built_bytes) == (2, 2 * NBYTES)


def test_older_versions_are_bounded_in_number_and_the_served_one_is_never_among_them():
    cache = PromptCache()
    served = built("p", 100)
    cache.serve(served.key, no_file)
    cache.add(served)
    pinned = [cache.add(built("p", version)) for version in range(1, OLDER_KEPT + 3)]
    assert [p for p in pinned if cache.built(p.key) is p] == pinned[-OLDER_KEPT:]  # the first two are out
    assert cache.built_current("p") is served and cache.num_built == OLDER_KEPT + 1


def test_removing_a_name_drops_every_built_version_of_it():
    cache = PromptCache()
    for version in (1, 2):
        cache.serve(built("p", version).key, no_file)
        cache.add(built("p", version))
    kept = cache.add(built("q", 1))
    cache.remove("p")
    assert ("p" in cache, cache.serving("p"), cache.num_built, cache.built_bytes) == (False, None, 1, NBYTES)
    assert cache.built(kept.key) is kept
