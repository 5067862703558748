"""Does a fine-tuning job slow serving? A fixed serving workload's TTFT, without a job, while one trains, and
without again (after cancelling it), on one spawned server. Prints a table and writes JSON.

    python scripts/bench_training_interference.py                      # the default model on this machine
    python scripts/bench_training_interference.py --n 64 --concurrency 8 --json out.json

The server is `softserve serve` on a free loopback port (app/server_process.py) with a temporary prompt store,
no example prompts and this environment's other SOFTSERVE_* settings (SOFTSERVE_FINETUNE_THREADS among them).
The workload is app/bench/http.py's: --n streamed /v1/completions on `base` of --lo..--hi random tokens,
--new tokens each, --concurrency at a time. The job trains on examples/data/spam.train.jsonl (a shallow prompt;
--max-steps bounds it, more than the measurement needs, and it is cancelled after it). The target of issue 23:
TTFT p50 with the job within 1.5x of the value without it, on CPU.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.bench.http import model_tokenizer, prompt_texts, spawn_settings, sweep_http  # noqa: E402
from app.config import environment_settings  # noqa: E402
from app.bench.run import write_json  # noqa: E402
from app.server_process import ServerProcess, settings_env  # noqa: E402


def start_job(client: httpx.Client, max_steps: int) -> str:
    with open(REPO / "examples/data/spam.train.jsonl", "rb") as f:
        uploaded = client.post("/v1/files", files={"file": ("spam.train.jsonl", f)}, data={"purpose": "fine-tune"})
    uploaded.raise_for_status()
    job = client.post("/v1/fine_tuning/jobs", json={"model": "base", "training_file": uploaded.json()["id"],
                                                    "suffix": "bench-spam", "seed": 0,
                                                    "softserve": {"max_steps": max_steps}})
    job.raise_for_status()
    return job.json()["id"]


def wait_for_training(client: httpx.Client, job_id: str, timeout: float = 600) -> None:
    """Until the job has run a step: the training process is loaded and busy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        if job["status"] in ("failed", "cancelled", "succeeded"):
            raise RuntimeError(f"the job ended before the measurement: {job['status']} {job['error']}")
        events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 5}).json()["data"]
        if any("total_steps" in (e.get("data") or {}) for e in events):
            return
        time.sleep(0.5)
    raise TimeoutError("the job ran no step in time")


def steps_done(client: httpx.Client, job_id: str) -> int:
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 50}).json()["data"]
    return max((e["data"]["step"] for e in events if "total_steps" in (e.get("data") or {})), default=0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=32, help="requests per measurement")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--new", type=int, default=16, help="tokens generated per request")
    p.add_argument("--lo", type=int, default=64)
    p.add_argument("--hi", type=int, default=128)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=10000, help="the job's bound (it is cancelled after measuring)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", type=Path, default=None, help="default: bench_results/training_interference-<time>.json")
    args = p.parse_args()

    settings = environment_settings()
    texts = prompt_texts(args.n, args.lo, args.hi, args.seed, model_tokenizer(settings))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        server_settings = spawn_settings(settings, args.device, "auto", Path(tmp) / "store")
        with ServerProcess(settings_env(server_settings), Path(tmp) / "server.log") as server, \
                httpx.Client(base_url=server.url, timeout=60) as client:
            health = client.get("/health").json()

            def measure(condition: str) -> None:
                result = asyncio.run(sweep_http(server.url, texts, args.new, args.concurrency))
                rows.append({"condition": condition, **result})
                print(f"  {condition}: TTFT p50 {result['ttft_p50_s'] * 1000:.0f} ms", flush=True)

            asyncio.run(sweep_http(server.url, texts[:args.concurrency], args.new, args.concurrency))  # warm-up
            measure("no job")
            job_id = start_job(client, args.max_steps)
            wait_for_training(client, job_id)
            before = steps_done(client, job_id)
            measure("job training")
            trained_steps = steps_done(client, job_id) - before
            client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").raise_for_status()
            folder = Path(tmp) / "store" / "_finetune" / "jobs" / job_id
            while folder.exists():  # the training process has stopped
                time.sleep(0.2)
            measure("no job (after)")

    baseline = (rows[0]["ttft_p50_s"] + rows[2]["ttft_p50_s"]) / 2
    report = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "device": health.get("device"),
                          "finetune_threads": settings.finetune_threads},
              "workload": {k: getattr(args, k) for k in ("n", "concurrency", "new", "lo", "hi", "seed")},
              "steps_trained_during_measurement": trained_steps, "rows": rows,
              "ttft_p50_ratio": rows[1]["ttft_p50_s"] / baseline}
    print(f"\n{'condition':<16} {'TTFT p50':>10} {'TTFT p99':>10} {'lat p50':>10} {'req/s':>7}")
    for r in rows:
        print(f"{r['condition']:<16} {r['ttft_p50_s'] * 1000:>8.0f}ms {r['ttft_p99_s'] * 1000:>8.0f}ms "
              f"{r['latency_p50_s'] * 1000:>8.0f}ms {r['req_s']:>7.2f}")
    print(f"TTFT p50 with a job / without (mean of before and after): {report['ttft_p50_ratio']:.2f}x "
          f"({trained_steps} training steps ran meanwhile; {os.cpu_count()} CPUs, device {health.get('device')})")
    out = write_json(report, args.json or REPO / "bench_results" / f"training_interference-{time.strftime('%Y%m%d-%H%M%S')}.json")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
