"""Traffic splits: a prompt name's requests shared between its stored versions by weight (a canary).

A split is whole percents per version, summing to 100: `{3: 90, 4: 10}`. A request is placed in one of 100
buckets, drawn at random, or, when it names its end user, from a hash of (prompt name, user), so that user
always gets the same version while the split stands. Buckets go to versions in version order, the highest
version taking the top ones: raising the newest version's share keeps every user it already had.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import random
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone

TRAFFIC_FILE = "traffic.json"  # in the prompt's folder: deleting the name deletes its split
BUCKETS = 100
VERSION_KEY = re.compile(r"[1-9][0-9]*")  # as the store writes version numbers (ASCII; no sign, no leading 0)


class TrafficSplitError(ValueError):
    """A split that is not whole positive percents of version numbers summing to 100."""


@dataclass(frozen=True)
class TrafficSplit:
    weights: dict[int, int]  # version -> percent of requests, in version order
    updated_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @classmethod
    def parse(cls, versions: object, updated_at: str | None = None) -> TrafficSplit:
        """{"3": 90, "4": 10} (JSON keys are strings) -> a split; TrafficSplitError naming what is wrong."""
        if not isinstance(versions, dict) or not versions:
            raise TrafficSplitError("versions: give at least one version and its percent, e.g. {\"3\": 90, \"4\": 10}")
        weights = {}
        for key, percent in versions.items():
            if not (isinstance(key, str) and VERSION_KEY.fullmatch(key)):
                raise TrafficSplitError(f"versions: {key!r} is not a version number (1, 2, ...)")
            if type(percent) is not int or not 1 <= percent <= BUCKETS:
                raise TrafficSplitError(f"versions.{key}: {percent!r} is not a whole percent from 1 to 100")
            weights[int(key)] = percent
        total = sum(weights.values())
        if total != BUCKETS:
            raise TrafficSplitError(f"versions: the percents sum to {total}, not 100")
        weights = dict(sorted(weights.items()))
        return cls(weights) if updated_at is None else cls(weights, updated_at)

    @classmethod
    def from_json(cls, data: bytes) -> TrafficSplit:
        try:
            stored = json.loads(data)
        except ValueError as e:
            raise TrafficSplitError(f"not JSON: {e}") from None
        if not isinstance(stored, dict) or not isinstance(stored.get("updated_at"), str):
            raise TrafficSplitError("expected {\"versions\": {...}, \"updated_at\": \"...\"}")
        return cls.parse(stored.get("versions"), stored["updated_at"])

    def as_dict(self) -> dict:
        return {"versions": {str(v): percent for v, percent in self.weights.items()}, "updated_at": self.updated_at}

    def to_json(self) -> bytes:
        return json.dumps(self.as_dict()).encode()

    def choose(self, name: str, user: str | None, rng: random.Random | None = None) -> int:
        """The version that serves a request for `name`: sticky per user, else drawn from rng (default: the
        random module's)."""
        if user is None:
            bucket = (rng or random).randrange(BUCKETS)
        else:
            digest = hashlib.sha256(f"{name}\0{user}".encode()).digest()
            bucket = int.from_bytes(digest[:8], "big") % BUCKETS
        upper_bounds = itertools.accumulate(self.weights.values())  # ends at 100: every bucket has a version
        return next(version for version, upper in zip(self.weights, upper_bounds) if bucket < upper)
