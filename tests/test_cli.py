"""The command line: clear errors before anything starts."""
import subprocess
import sys


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
