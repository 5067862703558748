#!/usr/bin/env bash
# Every GPU check in one command (`make gpu-check`), sized for about 8 minutes on one H100; one JSON at the end.
#   1. the CUDA tests (tests/test_cuda.py): logits against transformers in bf16 by teacher forcing, the engine with
#      CUDA graphs and the Triton decode kernel over block tables against the engine without, seeded requests alone
#      and in a crowd, the tiny bench against HF generate();
#   2. `softserve bench` on the Llama-3-8B shape (random weights: throughput does not depend on their values), bf16,
#      192 requests x 128 new tokens, against the HF+PEFT peer, with the card's bound and each side's share of it;
#   3. 1,024 concurrent requests of that shape on softserve alone: all admitted at once, all finished.
# Usage: scripts/gpu_check.sh [OUT_DIR]   (default gpu_check_results; PYTHON picks the interpreter)
# Writes OUT_DIR/gpu_check.json (the three parts and the card's name) beside each part's own output.
set -uo pipefail
OUT=${1:-gpu_check_results}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"
BENCH=("$PYTHON" -m app.cli bench --device cuda --dtype bfloat16 --shape llama3-8b --max-batched-tokens 8192 --no-progress)

"$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "gpu_check: torch sees no CUDA device")' || exit 2
"$PYTHON" -c 'import torch; print("gpu_check on", torch.cuda.get_device_name(0))'

echo "== 1/3 CUDA tests"
timeout 240 "$PYTHON" -m pytest -q -m cuda tests/test_cuda.py --junitxml="$OUT/cuda_tests.xml" 2>&1 | tee "$OUT/cuda_tests.log" | tail -3
echo "== 2/3 8B shape against the peer"
timeout 240 "${BENCH[@]}" --n 192 --new 128 --json "$OUT/bench_8b.json" 2>&1 | tee "$OUT/bench_8b.log" | tail -25
echo "== 3/3 1,024 concurrent requests"
timeout 240 "${BENCH[@]}" --n 1024 --new 64 --lo 32 --hi 256 --skip-peer --json "$OUT/concurrent_1024.json" 2>&1 \
  | tee "$OUT/concurrent_1024.log" | tail -12

"$PYTHON" - "$OUT" <<'PY'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path
import torch
out = Path(sys.argv[1])
def read(name):
    p = out / name
    return json.loads(p.read_text()) if p.exists() else None
tests = None
if (out / "cuda_tests.xml").exists():
    suite = ET.parse(out / "cuda_tests.xml").getroot().find("testsuite")
    tests = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
result = {"device": torch.cuda.get_device_name(0), "cuda_tests": tests,
          "bench_8b": read("bench_8b.json"), "concurrent_1024": read("concurrent_1024.json")}
(out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
print("gpu_check: wrote", out / "gpu_check.json", "tests:", tests)
PY
