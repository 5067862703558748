"""The allocator setting the engine makes on CPU: a step-like thread that allocates and frees activations of
many megabytes faults far fewer pages in again once glibc keeps freed memory (app/engine/host_memory.py)."""
from __future__ import annotations

import subprocess
import sys

STEPS = """
import resource, sys, threading, torch
from app.engine.host_memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def step():  # a prefill step's pattern: wide activations made and freed layer after layer
    x = torch.ones(2048, 576)
    for _ in range(6):
        gate_up = torch.ones(2048, 3072)
        h = gate_up[:, :1536] * gate_up[:, 1536:]
        del gate_up
        x = x + h[:, :576]
        del h
def engine_thread():
    step()
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    for _ in range(3):
        step()
    print(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
thread = threading.Thread(target=engine_thread)
thread.start()
thread.join()
"""


def page_faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True)
    return int(done.stdout)


def test_steps_stop_faulting_their_memory_in_again():
    default, kept = page_faults("default"), page_faults("keep")
    assert default > 1000  # the cost the setting removes (each fault: a 4 KiB page zeroed by the kernel)
    assert kept * 4 < default
