"""The price of a structured output, checked before it is compiled.

Compiling a grammar costs far more than reading it: xgrammar spends seconds to minutes on a schema with
thousands of long enum values, hundreds of optional properties or a `pattern` with large repetition counts,
and cannot be stopped once it started. So every grammar input is measured first, in one cheap pass over its
JSON, against limits that are settings (SOFTSERVE_GRAMMAR_*), and refused with a 400 that names the field
and the limit. Within the defaults, the costliest grammars found compile in under half a second on one core.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from app.api.errors import APIError

# `{m}`, `{m,}` or `{m,n}` not preceded by a backslash: a regex repetition count
REPEAT = re.compile(r"(?<!\\)\{([0-9]+)(?:,([0-9]*))?\}")


@dataclass(frozen=True)
class GrammarLimits:
    max_bytes: int
    max_enum_values: int
    max_properties: int
    max_depth: int
    max_regex_chars: int
    max_repeat: int

    @classmethod
    def from_settings(cls, settings) -> GrammarLimits:
        return cls(settings.grammar_max_bytes, settings.grammar_max_enum_values, settings.grammar_max_properties,
                   settings.grammar_max_depth, settings.grammar_max_regex_chars, settings.grammar_max_repeat)


@dataclass
class _Count:
    enum_values: int = 0
    properties: int = 0
    repeat: int = 0


def check_price(field: str, kind: str, source: Any, limits: GrammarLimits) -> None:
    """Raise a 400 naming `field` when the grammar asked for (kind, source: see Grammars.compile) is over a
    limit; return when it may be compiled."""
    refuse = _Refuser(field)
    text = source if kind == "regex" else json.dumps(source, ensure_ascii=False, separators=(",", ":"))
    refuse.over(len(text.encode("utf-8", "surrogatepass")), limits.max_bytes, "{} bytes", "SOFTSERVE_GRAMMAR_MAX_BYTES")
    count = _Count()
    if kind == "regex":
        _check_regex(source, limits, count, refuse)
    elif kind == "choice":
        count.enum_values = len(source)
    elif kind == "json_schema":
        _walk_schema(source, limits, count, refuse)
    refuse.over(count.enum_values, limits.max_enum_values, "{} enum values, const values and choices",
                "SOFTSERVE_GRAMMAR_MAX_ENUM_VALUES")
    refuse.over(count.properties, limits.max_properties, "{} object properties", "SOFTSERVE_GRAMMAR_MAX_PROPERTIES")
    refuse.over(count.repeat, limits.max_repeat, "regex repetition counts ({{m,n}}) that add up to {}",
                "SOFTSERVE_GRAMMAR_MAX_REPEAT")


class _Refuser:
    def __init__(self, field: str):
        self.field = field

    def over(self, value: int, limit: int, what: str, setting: str) -> None:
        """what: the grammar's measure, `{}` standing for the value ("{} bytes")."""
        if value > limit:
            raise APIError(400, f"{self.field}: the grammar has {what.format(value)}, over the limit of {limit} "
                                f"({setting})", "grammar_too_large", self.field)


def _walk_schema(schema: Any, limits: GrammarLimits, count: _Count, refuse: _Refuser) -> None:
    """One pass over the schema's JSON (no recursion: its depth is what is being checked)."""
    stack = [(schema, 1)]
    while stack:
        node, depth = stack.pop()
        refuse.over(depth, limits.max_depth, "{} levels of nesting", "SOFTSERVE_GRAMMAR_MAX_DEPTH")
        if isinstance(node, list):
            stack.extend((item, depth + 1) for item in node)
            continue
        if not isinstance(node, dict):
            continue
        if isinstance(node.get("enum"), list):
            count.enum_values += len(node["enum"])
        if "const" in node:
            count.enum_values += 1
        for key in ("properties", "patternProperties"):
            if isinstance(node.get(key), dict):
                count.properties += len(node[key])
        if isinstance(node.get("pattern"), str):
            _check_regex(node["pattern"], limits, count, refuse)
        if isinstance(node.get("patternProperties"), dict):
            for pattern in node["patternProperties"]:
                _check_regex(pattern, limits, count, refuse)
        stack.extend((value, depth + 1) for value in node.values())


def _check_regex(pattern: str, limits: GrammarLimits, count: _Count, refuse: _Refuser) -> None:
    refuse.over(len(pattern), limits.max_regex_chars, "a regex of {} characters", "SOFTSERVE_GRAMMAR_MAX_REGEX_CHARS")
    for low, high in REPEAT.findall(pattern):  # (a regex within max_regex_chars: its numbers are short)
        count.repeat += int(high or low)
