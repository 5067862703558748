"""The command line: clear errors before anything starts."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prompt_store.format import load_prompt_file
from prompt_store.registry import PromptRegistry

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "prompts"


def test_serve_with_a_missing_model_path_exits_with_a_message(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "app.cli", "serve", "--model", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "nope" in proc.stderr


def test_a_bad_setting_is_named(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "app.cli", "serve", "--dtype", "float8"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "dtype" in proc.stderr and "Traceback" not in proc.stderr


def test_prompts_commands_are_wired_and_list_an_empty_store(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "app.cli", "prompts", "list", "--store", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "app.cli", "prompts", "rm", "ghost", "--store", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "no prompt named 'ghost'" in proc.stderr


def softserve(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("SOFTSERVE_")}
    return subprocess.run([sys.executable, "-m", "app.cli", *argv], capture_output=True, text=True, timeout=120,
                          env={**inherited, **(env or {})})


@pytest.mark.parametrize("argv, env, named", [
    (["--help"], {"SOFTSERVE_PORT": "abc"}, "port (--port / SOFTSERVE_PORT): Input should be a valid integer"),
    (["serve"], {"SOFTSERVE_MAX_SEQ_LEN": "-1"}, "max_seq_len (--max-seq-len / SOFTSERVE_MAX_SEQ_LEN)"),
    (["serve", "--port", "abc"], {}, "port (--port / SOFTSERVE_PORT): Input should be a valid integer"),
])
def test_a_bad_variable_or_flag_is_one_line_and_exit_code_2(argv, env, named):
    proc = softserve(*argv, env=env)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("softserve: bad setting: ")
    assert named in proc.stderr


def test_the_prompts_commands_use_the_servers_store_by_default(tmp_path):
    store = tmp_path / "store"
    spam = load_prompt_file(EXAMPLES / "spam.safetensors")
    PromptRegistry(store, base=spam.base).add(spam)
    proc = softserve("prompts", "list", env={"SOFTSERVE_PROMPT_STORE": str(store)})
    assert proc.returncode == 0, proc.stderr
    assert [line.split()[:2] for line in proc.stdout.splitlines()] == [["NAME", "VERSION"], ["spam", "1"]]


def test_the_train_command_does_not_import_the_main_cli():
    code = "import app.train.cli, sys; print('app.cli' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "False", proc.stderr
