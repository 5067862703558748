"""The benchmark's inputs: model shapes, the three task prompts, and the mixed request stream.

Shapes, prompt tensors and the request stream follow the shared peer script, peer_baseline.py, kept beside the repository
(SHAPES, make_prompts with seed 7, workload with seed 1), so numbers here compare with the peer script's.
Both sides always run identical weights: random shapes build one HF LlamaForCausalLM (seed 0) and
our Transformer takes the very same tensors (no copy, nothing written to disk).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from app.engine.model import ModelArgs, Transformer, rope_inv_freq
from app.engine.weights import base_identity, load_model, weights_fingerprint
from prompt_store.format import KINDS, Kind, PromptFile, Task, embedding_width

SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, head_dim=64, tie_word_embeddings=True),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, head_dim=128, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, head_dim=16, tie_word_embeddings=True),
}
TASKS = ("t0", "t1", "t2")
TASK_KINDS = {"t0": Kind.PROMPT.value, "t1": Kind.PREFIX.value, "t2": Kind.PROMPT.value}  # shallow, deep, and a second shallow


@dataclass
class BenchModels:
    hf: torch.nn.Module  # transformers LlamaForCausalLM (the peer's model)
    ours: Transformer
    args: ModelArgs
    name: str
    fingerprint: str
    directory: Path | None  # an HF directory with a tokenizer (the default model), else None


@dataclass
class Request:
    index: int
    task: str
    token_ids: list[int]


class NullTokenizer:
    """Random-weight shapes have no tokenizer: no text, no EOS (every request runs to --new anyway)."""
    eos_ids: frozenset[int] = frozenset()

    def encode(self, text: str) -> list[int]:
        return []

    def decode(self, ids: list[int]) -> str:
        return ""


def build_models(shape: str, device: str, dtype: torch.dtype, cache_dir: Path) -> BenchModels:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if shape == "default":
        loaded = load_model("default", dtype, device, cache_dir)
        hf = AutoModelForCausalLM.from_pretrained(loaded.directory, dtype=dtype).to(device).eval()
        return BenchModels(hf, loaded.model, loaded.args, loaded.name, loaded.fingerprint, loaded.directory)
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose default or one of {', '.join(SHAPES)}")
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, pad_token_id=0)
    torch.manual_seed(0)
    # peer_baseline builds in float32 and casts; on a GPU, build directly in the serving dtype instead, so
    # llama3-8b never holds a 32 GB float32 copy (random weights either way; both sides share them).
    build_dtype = dtype if torch.device(device).type == "cuda" else torch.float32
    default = torch.get_default_dtype()
    torch.set_default_dtype(build_dtype)
    try:
        with torch.device(device):
            hf = LlamaForCausalLM(cfg).to(dtype).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(default)
    args = ModelArgs.from_hf_config(cfg)
    with torch.device("meta"):
        ours = Transformer(args)
    state = {k.removeprefix("model."): v.detach() for k, v in hf.state_dict().items()}
    ours.load_state_dict({k: state[k] for k in ours.state_dict()}, assign=True)  # shares the HF tensors
    ours.inv_freq = rope_inv_freq(args).to(device)
    ours = ours.eval().requires_grad_(False)
    return BenchModels(hf, ours, args, f"random-{shape}", weights_fingerprint(state), None)


def prompt_tensors(args: ModelArgs, n_virtual: int) -> dict[str, torch.Tensor]:
    """PEFT-shaped prompts as peer_baseline.make_prompts draws them (0.02 * randn, seed 7), float32 on CPU:
    shallow [P, hidden], deep [P, layers*2*kv_heads*head_dim]; each task takes its kind's draw."""
    out = {}
    for kind in KINDS:
        g = torch.Generator().manual_seed(7)
        width = embedding_width(kind, args)
        draws = {t: torch.randn(n_virtual, width, generator=g) * 0.02 for t in TASKS}
        out.update({t: draws[t] for t in TASKS if TASK_KINDS[t] == kind})
    return {t: out[t] for t in TASKS}


def prompt_files(models: BenchModels, tensors: dict[str, torch.Tensor]) -> list[PromptFile]:
    base = base_identity(models)
    return [PromptFile(name=task, kind=TASK_KINDS[task], task=Task.GENERATE.value, num_virtual_tokens=emb.shape[0],
                       labels=[], description=f"bench task {task}", base=base, prompt_embeddings=emb,
                       source="softserve-bench")
            for task, emb in tensors.items()]


def workload(n: int, vocab: int, lo: int, hi: int, seed: int = 1) -> list[Request]:
    """peer_baseline.workload: random task order, prompt lengths uniform in [lo, hi], random token ids."""
    rng = random.Random(seed)
    return [Request(i, rng.choice(TASKS), [rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))])
            for i in range(n)]
