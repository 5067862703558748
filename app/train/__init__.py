"""Prompt training: learn a task prompt (and head) against the frozen base model; see docs/TRAINING.md."""
from app.train.data import DataError, load_examples
from app.train.trainer import TrainConfig, evaluate, evaluate_prompt, to_prompt_file, train

__all__ = ["DataError", "TrainConfig", "evaluate", "evaluate_prompt", "load_examples", "to_prompt_file", "train"]
