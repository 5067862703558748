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
