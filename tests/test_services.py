"""What the server loads at start-up: replicas that start together on one store."""
from __future__ import annotations

from pathlib import Path

from app.engine.weights import base_identity
from app.services import add_example_prompts
from prompt_store.registry import PromptRegistry

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "prompts"


def test_replicas_starting_together_add_each_example_prompt_once(tmp_path, default_model):
    """Both replicas scanned the empty store; one adds the examples first. The other must find them on disk:
    neither fail its start (a version conflict) nor store them again as v2."""
    base = base_identity(default_model)
    first, second = PromptRegistry(tmp_path, base), PromptRegistry(tmp_path, base)
    add_example_prompts(first, EXAMPLES)
    add_example_prompts(second, EXAMPLES)
    second.refresh()
    assert {info.name: info.versions for info in second.list()} == {"chat": [1], "ner": [1], "spam": [1]}
