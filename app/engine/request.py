"""What a request asks of the engine and how it can end: its task, its finish reasons, and the errors that
refuse it. No imports: the prompt store, the API and every engine module take these from here."""
from __future__ import annotations

from enum import StrEnum


class Task(StrEnum):
    """What a prompt serves; a str, so `task == "tag"`, f-strings and JSON keep working."""
    GENERATE = "generate"
    TAG = "tag"
    CLASSIFY = "classify"


class FinishReason(StrEnum):
    """Why a sequence ended; a str, so the wire values ("stop", "length", ...) are the members themselves."""
    STOP = "stop"  # end of sequence, a stop token or string, a complete grammar; tag and classify always
    LENGTH = "length"  # max_tokens
    CANCELLED = "cancelled"  # the client left, or the server is shutting down
    TIMEOUT = "timeout"  # its deadline passed
    ERROR = "error"  # the engine failed on it


class InvalidRequest(ValueError):
    """The request cannot be served as asked (too long for the context, empty input)."""


class WrongTaskType(InvalidRequest):
    """The named prompt serves another kind of task than the route asked for."""


class PromptNotFound(KeyError):
    """No prompt (or no such version) under that name: the store's and the engine's lookups answer 404 alike."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


class Overloaded(RuntimeError):
    """The waiting queue is full."""


class ShuttingDown(RuntimeError):
    """The engine stopped admitting requests: the server is draining."""
