"""`softserve prompts list | show | rm | import-peft`, driven through argparse as app/cli.py does."""

import argparse
import json

import safetensors.torch
import torch

from app.config import Settings
from prompt_store import BaseIdentity
from prompt_store.cli import add_prompt_commands, run_prompts_command

BASE = BaseIdentity("llama", 64, 2, 2, 16, 128, "llama-tiny-fingerprint")


def run(argv, capsys, base_loader=lambda: BASE):
    parser = argparse.ArgumentParser(prog="softserve")
    add_prompt_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.store = args.store or Settings().prompt_store  # as app/cli.py does
    code = run_prompts_command(args, base_loader)
    out, err = capsys.readouterr()
    return code, out, err


def write_adapter(directory, peft_type="PROMPT_TUNING", rows=4, width=64):
    """What PEFT's save_pretrained writes for a causal-LM prompt-tuning adapter (the parts that are read)."""
    directory.mkdir()
    config = {"peft_type": peft_type, "task_type": "CAUSAL_LM", "num_virtual_tokens": rows}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    tensors = {"prompt_embeddings": torch.randn(rows, width)}
    (directory / "adapter_model.safetensors").write_bytes(safetensors.torch.save(tensors))
    return directory


def test_import_list_show_rm(tmp_path, capsys):
    store = str(tmp_path / "store")
    adapter = write_adapter(tmp_path / "adapter")

    argv = ["prompts", "import-peft", str(adapter), "--name", "chat", "--description", "be nice", "--store", store]
    code, out, _ = run(argv, capsys)
    assert code == 0 and "stored chat v1: prompt, generate, 4 virtual tokens (peft:PROMPT_TUNING)" in out

    def no_base():
        raise AssertionError("reading a store must not need the model")

    code, out, _ = run(["prompts", "list", "--store", store], capsys, base_loader=no_base)
    assert code == 0
    header, row = out.splitlines()
    assert header.split() == ["NAME", "VERSION", "KIND", "TASK", "TOKENS", "LABELS", "DESCRIPTION"]
    assert row.split() == ["chat", "1", "prompt", "generate", "4", "be", "nice"]

    code, out, _ = run(["prompts", "show", "chat", "--store", store], capsys, base_loader=no_base)
    assert code == 0 and "embeddings:     [4, 64]" in out and "fingerprint=llama-tiny-fingerprint" in out

    code, out, _ = run(["prompts", "rm", "chat", "--store", store], capsys, base_loader=no_base)
    assert code == 0 and out.strip() == "removed chat"
    assert run(["prompts", "list", "--store", store], capsys)[1].splitlines()[1:] == []


def test_errors_are_reported_not_raised(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SOFTSERVE_PROMPT_STORE", str(tmp_path / "store"))
    code, _, err = run(["prompts", "show", "missing"], capsys)
    assert code == 1 and err.strip() == "error: no prompt named 'missing'"

    lora = write_adapter(tmp_path / "lora", peft_type="LORA")
    code, _, err = run(["prompts", "import-peft", str(lora), "--name", "x"], capsys)
    assert code == 1 and "PEFT type 'LORA' is not supported" in err

    wide = write_adapter(tmp_path / "wide", width=32)
    code, _, err = run(["prompts", "import-peft", str(wide), "--name", "x", "--labels", "a,b"], capsys)
    assert code == 1 and "error:" in err
    assert not (tmp_path / "store" / "x").exists()
