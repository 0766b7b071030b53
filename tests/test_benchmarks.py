"""The benchmark scripts run with no arguments and end with one JSON line (SPEC §9)."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_benchmark(name, *args):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", name), *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, check=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


SCRIPTS = ["worldmodel_sft.py", "rl.py", "evaluate.py",
           *(f"benchmarks/{name}" for name in sorted(os.listdir(os.path.join(ROOT, "benchmarks")))
             if name.endswith(".py"))]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_answers_help_without_running(script):
    out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         check=True)
    assert out.stdout.startswith("usage:") and "--help" in out.stdout
    if set(re.findall(r"^  (--[\w-]+)", out.stdout, re.M)) - {"--help"}:  # a script with flags shows their defaults
        assert "(default: " in out.stdout


def test_bench_envs_figures():
    result = run_benchmark("bench_envs.py")
    for key in ("sokoban_puzzles_per_s", "frozenlake_puzzles_per_s", "sudoku_puzzles_per_s", "steps_per_s"):
        assert result[key] > 0
    hist = result["sokoban_optimal_len_hist"]
    assert list(hist) == [str(k) for k in range(1, 11)] and sum(hist.values()) > 0
    turn = result["frozenlake_oracle_turn_success_mean"]
    closed_loop = result["frozenlake_oracle_closed_loop_success_mean"]
    assert 0 < turn <= closed_loop <= 1


def test_bench_generate_figures():
    result = run_benchmark("bench_generate.py", "--batch", "6", "--new-tokens", "12", "--repeats", "1")
    assert result["greedy_match"] is True
    assert result["ours_tokens_per_s"] > 0 and result["hf_tokens_per_s"] > 0 and result["speedup"] > 0


def test_bench_rollout_figures():
    result = run_benchmark("bench_rollout.py", "--env-groups", "2", "--group-size", "2", "--max-response-tokens", "16")
    assert result["episodes"] == 4 and result["episodes_per_s"] > 0
    assert 0 <= result["outside_model_share"] < 1
    for name in ("sokoban", "frozenlake", "sudoku"):
        assert 0 < result[f"tokens_per_turn_{name}"] < 400


def test_bench_sft_figures():
    result = run_benchmark("bench_sft.py", "--episodes", "16", "--steps", "2", "--batch-size", "4")
    assert result["tokens_per_s"] > 0 and 0 <= result["padding_share"] < 1


def test_bench_ppo_figures():
    result = run_benchmark("bench_ppo.py", "--env", "frozenlake", "--env-groups", "4", "--group-size", "2",
                           "--steps", "1", "--max-response-tokens", "16")
    assert result["episodes"] == 8 and result["kept_episodes"] == 2  # the 25% of groups with the largest std
    for key in ("rollout_s", "logprob_s", "update_s", "step_s", "peak_mem_gb"):
        assert result[key] > 0
    assert result["step_s"] >= result["rollout_s"] + result["logprob_s"] + result["update_s"] - 1e-3


def test_gpu_checks_runner_records_results_timeouts_and_skips(tmp_path, monkeypatch, capsys):
    """The runner of the GPU checks (run on a lent GPU, so its plumbing is tested here): a check's
    last JSON line becomes its result, one past its limit is stopped and marked, one that no
    longer fits the budget is skipped, and a failing one keeps its exit status."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import gpu_checks
    py = sys.executable
    monkeypatch.setattr(gpu_checks, "CHECKS", {
        "ok": ([py, "-c", "print('progress'); print('{\"x\": 1}')"], 60),
        "fails": ([py, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"], 60),
        # its child in a session of its own, holding the check's output open: as torchrun's workers
        "slow": ([py, "-c", "import subprocess, sys, time; "
                  "child = subprocess.Popen(['sleep', '60'], start_new_session=True); "
                  "open(sys.argv[1], 'w').write(str(child.pid)); print('started', flush=True); time.sleep(60)",
                  str(tmp_path / "child.pid")], 6),
        "late": ([py, "-c", "print('{}')"], 60),
    })
    # a 20 s budget, 15 s left to start a check: "slow" starts within 5 s; its 6 s limit leaves "late" too little
    gpu_checks.main(["--out", str(tmp_path), "--allow-cpu", "--budget-s", "20", "--min-slot-s", "15"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    records = {r["name"]: r for r in map(json.loads, open(tmp_path / "gpu_checks.jsonl"))}
    assert list(records) == ["ok", "fails", "slow", "late"]
    assert records["ok"]["rc"] == 0 and records["ok"]["result"] == {"x": 1} and summary["ok"] == {"x": 1}
    assert records["fails"]["rc"] == 3 and summary["fails"]["rc"] == 3
    assert records["slow"]["timed_out"] and records["slow"]["rc"] is None and records["slow"]["seconds"] < 15
    assert "skipped" in records["late"] and "late" in summary
    child = int(open(tmp_path / "child.pid").read())  # the stopped check's own child was stopped with it
    status = f"/proc/{child}/status"
    assert not os.path.exists(status) or "zombie" in open(status).read()
    log = open(tmp_path / "gpu_checks.log").read()
    assert "boom" in log and "started" in log and "progress" in log
    with pytest.raises(SystemExit):
        gpu_checks.main(["--checks", "nope", "--allow-cpu", "--out", str(tmp_path)])
    if not torch.cuda.is_available():  # no arguments on a CPU: nothing run, said in the JSON line (SPEC §9)
        capsys.readouterr()
        gpu_checks.main([])
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["checks_run"] == []
