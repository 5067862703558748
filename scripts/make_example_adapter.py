"""Write examples/peft/concise/: a tiny PEFT prompt-tuning adapter (CAUSAL_LM, 6 virtual tokens) for the default
model, for the upload examples in README.md and docs/API.md. Its virtual tokens start as the embeddings of an
instruction (PEFT's TEXT init) and are not trained: it shows the upload path, it is not a tuned prompt.

    python scripts/make_example_adapter.py          # needs the dev extras (peft) and the default model
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PromptTuningConfig, PromptTuningInit, get_peft_model
from transformers import AutoTokenizer, LlamaForCausalLM

from app.config import Settings
from app.engine.weights import fetch_default_model

INSTRUCTION = "Answer in one short sentence."
OUT = Path(__file__).resolve().parents[1] / "examples" / "peft" / "concise"


def main() -> None:
    model_dir = fetch_default_model(Settings().cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=len(tokenizer(INSTRUCTION)["input_ids"]),
                                prompt_tuning_init=PromptTuningInit.TEXT, prompt_tuning_init_text=INSTRUCTION,
                                tokenizer_name_or_path=str(model_dir))
    model = get_peft_model(LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32), config)
    model.save_pretrained(OUT)
    # the local cache paths PEFT wrote mean nothing elsewhere: name the base model instead
    config_file = OUT / "adapter_config.json"
    saved = json.loads(config_file.read_text())
    saved["base_model_name_or_path"] = saved["tokenizer_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    config_file.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    (OUT / "README.md").unlink(missing_ok=True)  # PEFT's model-card template
    print(f"wrote {OUT} ({config.num_virtual_tokens} virtual tokens)")


if __name__ == "__main__":
    main()
