"""A fine-tuning job through the API against `softserve train` with the same settings and seed: held-out accuracy
and wall time. Prints a table and writes JSON.

    python scripts/bench_finetune_vs_cli.py                    # spam data, 2 epochs, seed 0, 2 torch threads
    python scripts/bench_finetune_vs_cli.py --epochs 3 --threads 1 --json out.json

CLI: `softserve train examples/data/spam.train.jsonl --heldout examples/data/spam.heldout.jsonl --epochs E --seed S
--threads T` as a child process, timed from start to exit (its model load included). API: a spawned `softserve
serve` (temporary store, no example prompts, SOFTSERVE_FINETUNE_THREADS=T), both files uploaded, one job with the
same choices, timed from its creation to `succeeded` (its training process's start and model load included).
Accuracy: what each reports for the held-out file, and the API's prompt as served (/v1/classify on every held-out
line). The targets of issue 23: accuracy within 0.02 of the CLI's, wall time within 1.2x.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.config import environment_settings  # noqa: E402
from app.bench.run import write_json  # noqa: E402
from app.server_process import ServerProcess, settings_env  # noqa: E402

TRAIN, HELDOUT = REPO / "examples/data/spam.train.jsonl", REPO / "examples/data/spam.heldout.jsonl"


def run_cli(tmp: Path, epochs: int, seed: int, threads: int) -> dict:
    metrics = tmp / "cli.metrics.json"
    command = [sys.executable, "-m", "app.cli", "train", str(TRAIN), "--name", "spam-cli", "--heldout", str(HELDOUT),
               "--epochs", str(epochs), "--seed", str(seed), "--threads", str(threads),
               "--out", str(tmp / "spam-cli.safetensors"), "--metrics-out", str(metrics)]
    start = time.monotonic()
    subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.monotonic() - start
    return {"wall_s": wall, "accuracy": json.loads(metrics.read_text())["heldout"]["accuracy"]}


def run_api(tmp: Path, epochs: int, seed: int, threads: int) -> dict:
    settings = environment_settings().model_copy(update={
        "prompt_store": tmp / "store", "example_prompts": False, "finetune_threads": threads})
    with ServerProcess(settings_env(settings), tmp / "server.log") as server, \
            httpx.Client(base_url=server.url, timeout=120) as client:
        ids = {}
        for name, path in (("training", TRAIN), ("validation", HELDOUT)):
            with open(path, "rb") as f:
                uploaded = client.post("/v1/files", files={"file": (path.name, f)}, data={"purpose": "fine-tune"})
            uploaded.raise_for_status()
            ids[name] = uploaded.json()["id"]
        start = time.monotonic()
        job = client.post("/v1/fine_tuning/jobs", json={
            "model": "base", "training_file": ids["training"], "validation_file": ids["validation"],
            "suffix": "spam-api", "seed": seed,
            "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": epochs}}}})
        job.raise_for_status()
        job_id = job.json()["id"]
        while (job := client.get(f"/v1/fine_tuning/jobs/{job_id}").json())["status"] not in (
                "succeeded", "failed", "cancelled"):
            time.sleep(0.5)
        wall = time.monotonic() - start
        if job["status"] != "succeeded":
            raise RuntimeError(f"the job ended {job['status']}: {job['error']}")
        checkpoints = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
        reported = max(c["metrics"]["full_valid_accuracy"] for c in checkpoints)  # the best epoch is the one stored
        rows = [json.loads(line) for line in HELDOUT.read_text().splitlines() if line.strip()]
        right = 0
        for i in range(0, len(rows), 64):
            batch = rows[i:i + 64]
            answer = client.post("/v1/classify", json={"prompt": job["fine_tuned_model"],
                                                       "inputs": [r["text"] for r in batch]})
            answer.raise_for_status()
            right += sum(r["label"] == a["label"] for r, a in zip(batch, answer.json()["results"]))
        return {"wall_s": wall, "accuracy": reported, "served_accuracy": right / len(rows),
                "fine_tuned_model": job["fine_tuned_model"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the CLI and of the job's process")
    p.add_argument("--json", type=Path, default=None, help="default: bench_results/finetune_vs_cli-<time>.json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cli = run_cli(Path(tmp), args.epochs, args.seed, args.threads)
        print(f"  CLI: {cli['wall_s']:.1f} s, held-out accuracy {cli['accuracy']:.4f}", flush=True)
        api = run_api(Path(tmp), args.epochs, args.seed, args.threads)
        print(f"  API: {api['wall_s']:.1f} s, held-out accuracy {api['accuracy']:.4f} "
              f"(served: {api['served_accuracy']:.4f})", flush=True)
    report = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "load_after": os.getloadavg()},
              "settings": vars(args) | {"json": None}, "cli": cli, "api": api,
              "accuracy_difference": api["accuracy"] - cli["accuracy"], "wall_ratio": api["wall_s"] / cli["wall_s"]}
    print(f"\n{'':<6} {'wall s':>8} {'held-out accuracy':>18} {'served accuracy':>16}")
    print(f"{'CLI':<6} {cli['wall_s']:>8.1f} {cli['accuracy']:>18.4f} {'':>16}")
    print(f"{'API':<6} {api['wall_s']:>8.1f} {api['accuracy']:>18.4f} {api['served_accuracy']:>16.4f}")
    print(f"API - CLI accuracy: {report['accuracy_difference']:+.4f}; API / CLI wall time: {report['wall_ratio']:.2f}x")
    out = write_json(report, args.json or REPO / "bench_results" / f"finetune_vs_cli-{time.strftime('%Y%m%d-%H%M%S')}.json")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
