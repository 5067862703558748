"""Traffic splits between a prompt's versions: parsing, the draw (by weight, sticky per user), and their storage
in the registry, which every replica sharing the folder follows (prompt_store/traffic.py, registry.py)."""
import logging
import random
from collections import Counter

import pytest

from prompt_store import PromptNotFound, PromptRegistry
from prompt_store.traffic import TRAFFIC_FILE, TrafficSplit, TrafficSplitError
from tests.test_prompt_store import BASE, files_under, make_prompt


@pytest.mark.parametrize("versions, message", [
    ({}, "at least one version"),
    ([["3", 100]], "at least one version"),
    ({"3": 90, "4": 9}, "sum to 99, not 100"),
    ({"3": 90, "4": 20}, "sum to 110, not 100"),
    ({"3": 100, "4": 0}, "versions.4: 0 is not a whole percent"),
    ({"3": 110, "4": -10}, "versions.3: 110 is not a whole percent"),
    ({"3": 90.0, "4": 10}, "versions.3: 90.0 is not a whole percent"),
    ({"3": True, "4": 99}, "versions.3: True is not a whole percent"),
    ({"0": 100}, "'0' is not a version number"),
    ({"03": 100}, "'03' is not a version number"),
    ({"v3": 100}, "'v3' is not a version number"),
    ({"³": 100}, "'³' is not a version number"),
])
def test_parse_refuses_what_is_not_whole_percents_of_versions(versions, message):
    with pytest.raises(TrafficSplitError, match=message):
        TrafficSplit.parse(versions)


def test_parse_orders_by_version_and_round_trips_through_json():
    split = TrafficSplit.parse({"10": 10, "9": 90})
    assert list(split.weights.items()) == [(9, 90), (10, 10)]
    assert split.as_dict()["versions"] == {"9": 90, "10": 10}
    assert TrafficSplit.from_json(split.to_json()) == split


def test_draw_without_user_follows_the_weights():
    split = TrafficSplit.parse({"3": 90, "4": 10})
    rng = random.Random(1234)
    counts = Counter(split.choose("gen", None, rng) for _ in range(10_000))
    assert set(counts) == {3, 4}
    # seeded, so always the same; and within 5 standard deviations (30) of the expected 1000 for any seed
    assert 850 <= counts[4] <= 1150


def test_a_user_always_gets_the_same_version_and_users_spread_by_weight():
    split = TrafficSplit.parse({"3": 80, "4": 20})
    users = [f"user-{i}" for i in range(2000)]
    first = {user: split.choose("gen", user) for user in users}
    assert all(split.choose("gen", user, random.Random(seed)) == first[user]
               for seed, user in enumerate(users))  # the rng plays no part
    share = Counter(first.values())[4] / len(users)
    assert 0.15 <= share <= 0.25  # a hash, not a draw: deterministic; 400 expected, sd 18
    other_prompt = Counter(split.choose("other", user) for user in users)[4] / len(users)
    assert 0.15 <= other_prompt <= 0.25


def test_raising_the_newest_versions_share_keeps_its_users():
    users = [f"u{i}" for i in range(1000)]
    canary = {u for u in users if TrafficSplit.parse({"3": 90, "4": 10}).choose("gen", u) == 4}
    ramped = {u for u in users if TrafficSplit.parse({"3": 50, "4": 50}).choose("gen", u) == 4}
    assert canary and canary < ramped


# --- in the registry -------------------------------------------------------------------------------------


@pytest.fixture
def registry(tmp_path):
    registry = PromptRegistry(tmp_path / "store", BASE)
    for _ in range(2):
        registry.add(make_prompt("gen"))
    return registry


def test_set_show_clear(registry):
    assert registry.traffic("gen") is None
    split = registry.set_traffic("gen", TrafficSplit.parse({"1": 90, "2": 10}))
    assert registry.traffic("gen") == split
    assert sorted(files_under(registry.directory)) == ["gen", f"gen/{TRAFFIC_FILE}", "gen/v1.safetensors",
                                                       "gen/v2.safetensors"]  # no temp file left
    replaced = registry.set_traffic("gen", TrafficSplit.parse({"1": 100}))
    assert registry.traffic("gen").weights == {1: 100} == replaced.weights
    assert registry.clear_traffic("gen") is True
    assert registry.traffic("gen") is None
    assert registry.clear_traffic("gen") is False
    assert "traffic.json" not in " ".join(files_under(registry.directory))


def test_set_refuses_unknown_names_and_versions_and_changes_nothing(registry):
    registry.set_traffic("gen", TrafficSplit.parse({"1": 50, "2": 50}))
    with pytest.raises(PromptNotFound, match="prompt 'gen' has no version 7 \\(versions: 1, 2\\)"):
        registry.set_traffic("gen", TrafficSplit.parse({"2": 50, "7": 50}))
    with pytest.raises(PromptNotFound, match="no prompt named 'nope'"):
        registry.set_traffic("nope", TrafficSplit.parse({"1": 100}))
    with pytest.raises(PromptNotFound, match="no prompt named 'nope'"):
        registry.clear_traffic("nope")
    assert registry.traffic("gen").weights == {1: 50, 2: 50}
    assert files_under(registry.directory) == ["gen", f"gen/{TRAFFIC_FILE}", "gen/v1.safetensors",
                                               "gen/v2.safetensors"]


def test_a_replica_follows_the_split(registry):
    replica = PromptRegistry(registry.directory, BASE)
    registry.set_traffic("gen", TrafficSplit.parse({"1": 90, "2": 10}))
    assert replica.traffic("gen") is None  # until its next poll
    replica.refresh()
    assert replica.traffic("gen").weights == {1: 90, 2: 10}
    registry.set_traffic("gen", TrafficSplit.parse({"1": 30, "2": 70}))
    replica.refresh()
    assert replica.traffic("gen").weights == {1: 30, 2: 70}
    registry.clear_traffic("gen")
    replica.refresh()
    assert replica.traffic("gen") is None
    registry.set_traffic("gen", TrafficSplit.parse({"2": 100}))
    assert PromptRegistry(registry.directory, BASE).traffic("gen").weights == {2: 100}  # a replica starting now


def test_versions_in_a_split_are_never_pruned(tmp_path):
    registry = PromptRegistry(tmp_path, BASE, keep_versions=1)
    registry.add(make_prompt("gen"))
    registry.add(make_prompt("gen"))
    registry.set_traffic("gen", TrafficSplit.parse({"1": 90, "2": 10}))
    registry.add(make_prompt("gen"))
    registry.add(make_prompt("gen"))
    assert registry.versions("gen") == [1, 2, 3, 4]
    assert registry.traffic("gen").weights == {1: 90, 2: 10}
    registry.clear_traffic("gen")
    registry.add(make_prompt("gen"))
    assert registry.versions("gen") == [4, 5]


def test_deleting_the_name_deletes_its_split(registry):
    registry.set_traffic("gen", TrafficSplit.parse({"1": 90, "2": 10}))
    registry.delete("gen")
    assert registry.traffic("gen") is None
    registry.add(make_prompt("gen"))
    assert registry.traffic("gen") is None
    assert PromptRegistry(registry.directory, BASE).traffic("gen") is None


def test_a_split_file_that_no_longer_holds_is_ignored(registry, caplog):
    registry.set_traffic("gen", TrafficSplit.parse({"1": 90, "2": 10}))
    (registry.directory / "gen" / "v1.safetensors").unlink()  # removed by hand
    registry.refresh()
    assert registry.traffic("gen") is None  # the current version serves every request
    (registry.directory / "gen" / TRAFFIC_FILE).write_text('{"versions": {"2": 50}, "updated_at": "x"}')
    with caplog.at_level(logging.WARNING):
        registry.refresh()
    assert registry.traffic("gen") is None
    assert "ignoring traffic split" in caplog.text and "sum to 50" in caplog.text
