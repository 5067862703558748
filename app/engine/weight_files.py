"""Read a safetensors weights file through a child process, so that a read that stalls cannot freeze this one.

safetensors' own reader (`safe_open`) opens and maps the file while holding the GIL: a file whose open or
read blocks (a FIFO nobody writes, a hung network disk) would stop every thread of the server, /health and
the SIGTERM handler included. Here a child process opens the file and copies its bytes into a pipe; this
process reads the pipe with the GIL released, straight into the tensors' memory, and gives up (the child
killed) when no byte arrives for `stall_timeout_s`. The format is small enough to read here: an 8-byte
little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then the tensors' bytes.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import subprocess
import sys
from pathlib import Path

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
PIPE_BYTES = 1 << 20  # on Linux, 16x the default pipe: half the reads, half this process's CPU time
# The child: copy the file to stdout; a file that cannot be opened or read ends it with the reason on stderr.
# On Linux it is killed when the thread that started it ends, this process's end included (a server stopped
# by SIGTERM runs no exit handlers), so that a child blocked in open() is not left behind.
COPY_TO_STDOUT = """import ctypes, os, shutil, sys
try:
    ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
except AttributeError:  # not Linux
    pass
if os.getppid() != int(sys.argv[2]):
    sys.exit("the process that started the reader has ended")
try:
    with open(sys.argv[1], "rb") as f:
        shutil.copyfileobj(f, sys.stdout.buffer, 1 << 20)
except OSError as e:
    sys.exit(f"{type(e).__name__}: {e}")
"""


class WeightsReadError(RuntimeError):
    """The file could not be read, stalled, or is not a valid safetensors file; the message says which."""


def read_weights_file(path: Path, stall_timeout_s: float) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, by name, read through a child process."""
    with _ChildReader(path, stall_timeout_s) as reader:
        header_len = int.from_bytes(reader.read(8), "little")
        if header_len > MAX_HEADER_BYTES:
            raise WeightsReadError(f"{path}: not a safetensors file (header of {header_len} bytes)")
        try:
            header = json.loads(reader.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WeightsReadError(f"{path}: not a safetensors file (its header is not JSON: {e})") from None
        if not isinstance(header, dict):
            raise WeightsReadError(f"{path}: not a safetensors file (its header is not a JSON object)")
        header.pop("__metadata__", None)
        tensors, position = {}, 0
        for begin, end, name, tensor in sorted(_empty_tensor(path, name, info) for name, info in header.items()):
            if begin < position:
                raise WeightsReadError(f"{path}: tensor {name} overlaps the one before it")
            reader.read(begin - position)  # a gap between tensors (none in files safetensors writes)
            if tensor.numel():
                reader.read_into(memoryview(tensor.view(-1).view(torch.uint8).numpy()))
            tensors[name], position = tensor, end
    return tensors


def _empty_tensor(path: Path, name: str, info) -> tuple[int, int, str, torch.Tensor]:
    """(begin, end, name, an uninitialized tensor of its dtype and shape) of one header entry."""
    try:
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPES:
            raise WeightsReadError(f"{path}: tensor {name} has dtype {dtype!r}, which is not read here")
        tensor = torch.empty(shape, dtype=DTYPES[dtype])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise WeightsReadError(f"{path}: not a safetensors file (tensor {name}: {e!r})") from None
    if end - begin != tensor.numel() * tensor.element_size():
        raise WeightsReadError(f"{path}: tensor {name} has {end - begin} bytes for shape {shape}")
    return begin, end, name, tensor


class _ChildReader:
    """The file's bytes from a child process's stdout, each wait for more bounded by stall_timeout_s."""

    def __init__(self, path: Path, stall_timeout_s: float):
        self.path, self.stall_timeout_s = path, stall_timeout_s
        self.proc = subprocess.Popen([sys.executable, "-I", "-c", COPY_TO_STDOUT, str(path), str(os.getpid())],
                                     bufsize=0, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        with contextlib.suppress(AttributeError, OSError):  # elsewhere: the default size
            fcntl.fcntl(self.proc.stdout, fcntl.F_SETPIPE_SZ, PIPE_BYTES)

    def __enter__(self) -> _ChildReader:
        return self

    def __exit__(self, *exc) -> None:
        self.proc.kill()  # done with it (or it stalled, or sent garbage)
        try:
            self.proc.wait(timeout=1)
        except subprocess.TimeoutExpired:  # stuck in the kernel (a hung disk): it ends when the read returns
            pass
        self.proc.stdout.close()
        self.proc.stderr.close()

    def read(self, n: int) -> bytes:
        buffer = bytearray(n)
        self.read_into(memoryview(buffer))
        return bytes(buffer)

    def read_into(self, view: memoryview) -> None:
        filled = 0
        while filled < len(view):
            ready, _, _ = select.select([self.proc.stdout], [], [], self.stall_timeout_s)
            if not ready:
                raise WeightsReadError(f"reading {self.path} stalled: no data for {self.stall_timeout_s:g} s "
                                       f"(a FIFO nobody writes, a hung disk?)")
            n = self.proc.stdout.readinto(view[filled:])  # the GIL is released while it waits
            if not n:
                raise WeightsReadError(f"cannot read {self.path}: {self._why_it_ended()}")
            filled += n

    def _why_it_ended(self) -> str:
        try:
            self.proc.wait(timeout=self.stall_timeout_s)
        except subprocess.TimeoutExpired:
            return "its bytes ended early"
        return self.proc.stderr.read().decode(errors="replace").strip() or "the file ends early (truncated?)"
