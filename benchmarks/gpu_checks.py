"""
Every GPU check of the project in one run, for a lent GPU machine with minutes to spare: the CUDA
halves of the benchmarks (issues 3, 4 and 5) and the GPU paths of the stages, each in its own
process with its own time limit, the issues' must-shows first.

    python benchmarks/gpu_checks.py --out runs/gpu-checks       # on a machine with a CUDA GPU
    python3 benchmarks/gpu_checks.py --out "$OUT" --budget-s 480   # in a device lease (timeout_s 560)
    python benchmarks/gpu_checks.py --list                       # what it would run

The checks, in order (each is skipped when less than --min-slot-s of the budget is left):
  generate   bench_generate.py: our sampler against model.generate; on CUDA also a
             Qwen2.5-1.5B-shaped bf16 model's decode_ms_per_step and bandwidth_fraction, with the
             decode step replayed as a CUDA graph (cuda_graph: whether it could be recorded) and
             eagerly, for contrast (issue 3)
  sft        bench_sft.py: the SFT step; on CUDA also a Qwen2.5-1.5B-shaped model's mfu (issue 4)
  ppo        bench_ppo.py --arch qwen2.5-1.5b: a full 32 x 8 PPO step with a Qwen2.5-1.5B-shaped
             actor and critic, peak_mem_gb against the 80 GB target (issue 5)
  torchrun   torchrun --nproc_per_node=1 rl.py, tiny preset, 2 steps: the README's command on a GPU
  sft_stage  worldmodel_sft.py --preset tiny, one short epoch: the whole stage on a GPU
  tests      pytest -m "not slow" with the GPU visible (the stages pick it by default)

Outputs in --out: gpu_checks.jsonl (one line per check: name, command, rc, seconds, timed_out,
and result, the check's last stdout line parsed as JSON where it is JSON) and gpu_checks.log (all
the checks' output, in order); the stages' run folders go to a temporary folder, removed at
the end. The last stdout line is one JSON object: every check's result,
keyed by name, and the minutes the run took. Without a CUDA device it runs nothing and says so in
that line, unless --allow-cpu (the checks then run their CPU halves, for trying this script; `ppo`
would build a 1.5B model on the CPU: leave it out with --checks).
"""
import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable

# name -> (command, time cap in seconds); the order is the order they run in
CHECKS = {
    "generate": ([PY, "benchmarks/bench_generate.py", "--repeats", "2"], 150),
    "sft": ([PY, "benchmarks/bench_sft.py"], 120),
    # the memory plan (README; rl.py prints it at start as memory_plan_gb) wants gradient
    # checkpointing for a 1.5B actor and critic on 80 GB
    "ppo": ([PY, "benchmarks/bench_ppo.py", "--arch", "qwen2.5-1.5b", "--grad-checkpointing"], 300),
    "torchrun": ([PY, "-m", "torch.distributed.run", "--nproc_per_node=1", "rl.py", "--env", "frozenlake",
                  "--preset", "tiny", "--steps", "2", "--val-every", "0", "--val-puzzles", "4", "--env-groups", "8",
                  "--out", "{tmp}/rl-tiny"], 90),
    "sft_stage": ([PY, "worldmodel_sft.py", "--env", "frozenlake", "--preset", "tiny", "--batches", "1", "--epochs",
                   "1", "--eval-turns", "20", "--out", "{tmp}/sft-tiny"], 120),
    "tests": ([PY, "-m", "pytest", "-m", "not slow", "-q", "-x", "-p", "no:cacheprovider"], 300),
}


def last_json(text):
    """The last non-empty line of text, parsed as JSON if it is JSON, else as the string itself."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return None
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError:
        return lines[-1]


def _stat(pid):
    """The fields of /proc/PID/stat after "pid (comm)": state, parent pid, ...; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_tree(pid):
    """pid and every process descended from it (Linux /proc). torchrun starts its workers in
    sessions of their own, so the check's process group alone does not reach them."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))):
            children.setdefault(int(stat[1]), []).append(int(entry))  # stat[1]: the parent's pid
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def stop_tree(pid, grace_s=10):
    """SIGTERM to the check and everything it started (torchrun then stops its workers), then
    SIGKILL to whatever is left after grace_s."""
    tree = process_tree(pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in tree:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, sig)
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 0)
        while time.monotonic() < deadline and any(_running(p) for p in tree):
            time.sleep(0.2)


def _running(pid):
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"  # a zombie has ended


def run_check(name, command, timeout_s, log):
    """Run one check from the repository root with a time limit; its output goes to log.
    Returns its record: name, command, rc (None when it timed out), seconds, timed_out, result."""
    log.write(f"\n===== {name}: {' '.join(command)} (limit {timeout_s:.0f}s)\n")
    log.flush()
    start = time.perf_counter()
    # its own session, so that stopping it never reaches this script (stop_tree stops it and all it started)
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,
                            # a lent GPU machine reaches no network: no hub look-ups that wait to time out
                            env={"HF_HUB_OFFLINE": "1", **os.environ, "PYTHONUNBUFFERED": "1"})
    timed_out = False
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        stop_tree(proc.pid)
        try:  # what it wrote before it was stopped
            stdout, stderr = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:  # something outside the tree still holds its output open
            proc.kill()
            stdout, stderr = "", "(its output could not be read after it was stopped)\n"
    finally:
        if proc.poll() is None:  # interrupted: leave nothing running on the GPU
            stop_tree(proc.pid, grace_s=2)
    rc = None if timed_out else proc.returncode
    seconds = round(time.perf_counter() - start, 1)
    log.write(stderr + stdout + f"\n===== {name}: rc {rc}, {seconds}s{', timed out' if timed_out else ''}\n")
    log.flush()
    return {"name": name, "command": command, "rc": rc, "seconds": seconds, "timed_out": timed_out,
            "result": last_json(stdout)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="folder for gpu_checks.jsonl and gpu_checks.log (default: $OUT, else "
                                      "runs/gpu-checks)")
    parser.add_argument("--checks", default=",".join(CHECKS),
                        help="comma-separated checks to run, in this order (default: %(default)s)")
    parser.add_argument("--budget-s", type=float, default=540,
                        help="seconds for all the checks together (default: %(default)g)")
    parser.add_argument("--min-slot-s", type=float, default=30,
                        help="skip a check when less than this is left (default: %(default)g)")
    parser.add_argument("--allow-cpu", action="store_true", help="run without a CUDA device (the CPU halves)")
    parser.add_argument("--list", action="store_true", help="print the checks and their limits, run nothing")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.checks.split(",") if n.strip()]
    unknown = [n for n in names if n not in CHECKS]
    if unknown or not names:
        parser.error(f"unknown check(s) {', '.join(unknown) or '(none given)'}: choose from {', '.join(CHECKS)}")
    out = os.path.abspath(args.out or os.environ.get("OUT") or os.path.join(ROOT, "runs", "gpu-checks"))
    if args.list:
        for n in names:
            command, cap = CHECKS[n]
            print(f"{n:10s} {cap:4d}s  {' '.join(command)}")
        return
    import torch
    if not torch.cuda.is_available() and not args.allow_cpu:  # SPEC §9: no arguments on a CPU ends in JSON
        reason = "no CUDA device visible: nothing run (--allow-cpu runs the checks' CPU halves)"
        print(reason, file=sys.stderr)
        print(json.dumps({"device": "cpu", "checks_run": [], "reason": reason}))
        return
    os.makedirs(out, exist_ok=True)
    # the stages' run folders go to a temporary folder: only the two reports land in --out
    scratch = tempfile.mkdtemp(prefix="gpu-checks-")
    config = {"out": out, "checks": names, "budget_s": args.budget_s, "torch": torch.__version__,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    print(json.dumps(config, indent=2), file=sys.stderr, flush=True)
    deadline = time.perf_counter() + args.budget_s
    results, start = {}, time.perf_counter()
    try:
        with open(os.path.join(out, "gpu_checks.log"), "a") as log, \
                open(os.path.join(out, "gpu_checks.jsonl"), "a") as jsonl:
            for n in names:
                command, cap = CHECKS[n]
                left = deadline - time.perf_counter()
                if left < args.min_slot_s:
                    record = {"name": n, "skipped": f"{left:.0f}s of the budget left"}
                else:
                    command = [part.replace("{tmp}", scratch) for part in command]
                    record = run_check(n, command, min(cap, left), log)
                print(json.dumps(record), file=sys.stderr, flush=True)
                jsonl.write(json.dumps(record) + "\n")
                jsonl.flush()
                # a passed check: its result; a failed, stopped or skipped one: what happened to it
                results[n] = record["result"] if record.get("rc") == 0 else \
                    {k: record[k] for k in ("rc", "timed_out", "result", "skipped") if k in record}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps({"device": config["device"], **results,
                      "minutes": round((time.perf_counter() - start) / 60, 1)}))


if __name__ == "__main__":
    main()
