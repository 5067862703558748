"""Held-out metrics: entity-level P/R/F1 over BIO tags (exact span and label), accuracy."""
from __future__ import annotations


def bio_entities(tags: list[str]) -> set[tuple[str, int, int]]:
    """(label, first token, last token + 1) of each entity; an I-X that does not continue an X starts one
    (the conlleval convention), so a prediction is never dropped for a missing B-."""
    entities, current = set(), None  # current: [label, start]
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, label = (tag[:1], tag[2:]) if tag != "O" else ("O", None)
        if current is not None and (prefix != "I" or label != current[0]):
            entities.add((current[0], current[1], i))
            current = None
        if prefix in ("B", "I") and current is None:
            current = [label, i]
    return entities


class EntityScore:
    def __init__(self):
        self.true_positives = self.predicted = self.gold = 0

    def add(self, gold_tags: list[str], predicted_tags: list[str]) -> None:
        gold, predicted = bio_entities(gold_tags), bio_entities(predicted_tags)
        self.true_positives += len(gold & predicted)
        self.predicted += len(predicted)
        self.gold += len(gold)

    def result(self) -> dict[str, float]:
        p = self.true_positives / self.predicted if self.predicted else 0.0
        r = self.true_positives / self.gold if self.gold else 0.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        return {"precision": p, "recall": r, "f1": f1}
