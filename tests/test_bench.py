"""softserve bench: a reduced run on CPU (tiny random-weight shape, float32). Both sides generate the same
number of tokens and the same greedy tokens; the JSON holds the report's keys. No timing is asserted."""

import json
import os

import pytest

from app.bench.http import check_loopback
from app.bench.measure import percentile, workload_flops
from app.bench.run import BenchConfig, run_bench
from app.bench.workload import workload
from app.cli import main

SEED = 4  # a 6-request stream that holds all three tasks: two shallow prompts and a deep prefix


@pytest.fixture(scope="module")
def tiny_result():
    cfg = BenchConfig(shape="tiny", n=6, new=8, device="cpu", dtype="float32", seed=SEED, progress=False)
    return run_bench(cfg)


def test_workload_mixes_every_task():
    assert {r.task for r in workload(6, 1000, 32, 256, SEED)} == {"t0", "t1", "t2"}


def test_both_sides_generate_the_same_number_of_tokens(tiny_result):
    ours, peer = tiny_result["softserve"], tiny_result["peer"]
    assert ours["requests"] == peer["requests"] == 6
    assert ours["generated_tokens"] == peer["generated_tokens"] == 6 * 8


def test_greedy_outputs_agree_with_the_peer(tiny_result):
    agree = tiny_result["agreement"]
    assert agree["k"] == 4
    assert agree["agree_first_k"] == 6, agree["mismatched_requests"]
    assert agree["mismatched_requests"] == []


def test_report_numbers_are_consistent(tiny_result):
    ours = tiny_result["softserve"]
    assert ours["tok_s"] == pytest.approx(ours["generated_tokens"] / ours["wall_s"])
    assert 0 < ours["ttft_p50_s"] <= ours["latency_p99_s"] <= ours["wall_s"] + 1e-6
    assert ours["steps"]["prefill_tokens"] == tiny_result["workload"]["prompt_tokens"]
    assert tiny_result["bound"]["bound_tok_s"] > 0
    b, steps = tiny_result["bound"], ours["steps"]
    assert b["workload_forward_tokens"] == steps["prefill_tokens"] + steps["decode_tokens"]
    per_output_token = b["workload_tflop"] / ours["generated_tokens"]
    assert b["workload_bound_tok_s"] == pytest.approx(b["matmul_tflops"] / per_output_token)
    assert b["share_of_peak"] == pytest.approx(ours["tok_s"] / b["workload_bound_tok_s"])
    # a 20-token prompt on the tiny shape: 2 layers * (K + V) * 2 kv heads * 20 * 16 * 4 bytes
    assert set(tiny_result["memory"]["bytes_per_prompt"].values()) == {2 * 2 * 2 * 20 * 16 * 4}


def test_workload_flops_count_each_token_through_the_layers_and_each_sample_through_the_head(tiny_llama):
    _, loaded = tiny_llama
    model, a = loaded.model, loaded.model.args
    d = a.hidden_size
    projections = 2 * d * a.num_heads * a.head_dim + 2 * d * a.num_kv_heads * a.head_dim + 3 * d * a.intermediate_size
    through_layers = a.num_layers * (2 * projections + 4 * a.num_heads * a.head_dim * 10)  # 10 keys attended
    assert workload_flops(model, 7, 3, 10) == pytest.approx(7 * through_layers + 3 * 2 * a.vocab_size * d)


def test_cli_writes_the_json(tmp_path, capsys):
    path = tmp_path / "out.json"
    assert main(["bench", "--shape", "tiny", "--n", "3", "--new", "4", "--device", "cpu", "--dtype", "float32",
                 "--json", str(path), "--no-progress"]) == 0
    assert "tokens/s" in capsys.readouterr().out
    data = json.loads(path.read_text())
    assert {"config", "machine", "model", "workload", "softserve", "peer", "ratio", "agreement", "bound",
            "memory"} <= set(data)
    for side in ("softserve", "peer"):
        assert {"tok_s", "req_s", "latency_p50_s", "latency_p90_s", "latency_p99_s", "ttft_p50_s", "ttft_p99_s",
                "peak_memory_bytes", "generated_tokens"} <= set(data[side])
    assert data["ratio"] == pytest.approx(data["softserve"]["tok_s"] / data["peer"]["tok_s"])
    assert {"bandwidth_gb_s", "bound_tok_s", "share_overall", "workload_bound_tok_s",
            "share_of_peak"} <= set(data["bound"])
    assert {"bytes_per_prompt", "prompts_fit"} <= set(data["memory"])


def test_http_mode_refuses_other_hosts():
    assert check_loopback("http://127.0.0.1:8000/") == "http://127.0.0.1:8000"
    assert check_loopback("http://localhost:9") == "http://localhost:9"
    with pytest.raises(ValueError, match="loopback"):
        check_loopback("http://10.0.0.5:8000")


def test_percentile_interpolates():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5], 99) == 5


def test_a_spawned_server_gets_the_benchs_settings(monkeypatch, tmp_path):
    """settings_env writes Settings as the SOFTSERVE_* variables from which the child rebuilds the same
    object; the bench's spawned server has the bench's device, dtype and store, and no example prompts."""
    from app.bench.http import spawn_settings
    from app.config import Settings
    from app.server_process import settings_env

    settings = Settings(cache_dir=tmp_path / "cache", kv_cache_gb=0.5, api_keys="a,b", max_batched_tokens=512)
    served = spawn_settings(settings, "cpu", "float32", tmp_path / "store")
    env = settings_env(served)
    assert "SOFTSERVE_SERVED_MODEL_NAME" not in env  # unset stays unset
    for name in [k for k in os.environ if k.startswith("SOFTSERVE_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    rebuilt = Settings()
    assert rebuilt == served
    assert (rebuilt.device, rebuilt.dtype, rebuilt.prompt_store, rebuilt.example_prompts) == (
        "cpu", "float32", tmp_path / "store", False)
    assert (rebuilt.cache_dir, rebuilt.max_batched_tokens) == (tmp_path / "cache", 512)
