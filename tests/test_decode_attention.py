"""The Triton decode kernel against SDPA (through Triton's CPU interpreter), and when the engine uses it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from app.engine.decode_attention import use_kernel
from app.engine.model import ModelArgs

ROOT = Path(__file__).resolve().parents[1]


def test_kernel_and_static_step_match_sdpa_in_the_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "triton_interpreted.py")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr


def test_decode_attention_setting():
    args = ModelArgs("llama", 100, 64, 128, 2, 4, 2, 16)
    cpu = torch.device("cpu")
    assert use_kernel("auto", cpu, torch.float32, args) is False  # no CUDA: SDPA
    assert use_kernel("sdpa", cpu, torch.float32, args) is False
    assert use_kernel("native", cpu, torch.float32, args) is False  # the CPU's C kernel runs eager steps only
    with pytest.raises(ValueError, match="needs CUDA"):
        use_kernel("triton", cpu, torch.float32, args)
    with pytest.raises(ValueError, match="auto, triton, native or sdpa"):
        use_kernel("flash", cpu, torch.float32, args)
