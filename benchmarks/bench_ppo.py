"""
Cost of one PPO step of rl.py (SPEC §9): a 32 x 8 multi-turn rollout, group filtering, the
log-prob / value pass, and the actor and critic update -- the real rl.main, run for --steps steps;
the figures are those of the last step (the first pays one-off warm-up costs).

    python benchmarks/bench_ppo.py                  # CPU: the tiny preset, a fresh tiny model
    python benchmarks/bench_ppo.py --arch qwen2.5-1.5b   # GPU: a random-init Qwen2.5-1.5B actor and critic

JSON figures: rollout_s, logprob_s, update_s, step_s, peak_mem_gb (CUDA: the step's peak allocated
memory; CPU: the process's peak resident memory), tokens_per_s, and what was run. A fresh model
seldom stops early, so a turn nearly always uses its whole token budget: close to an upper bound on a
step's cost.
With --arch the model is randomly initialised (weights cannot be downloaded here) and paired with
the tiny tokenizer, whose token ids it accepts: compute and memory are the real architecture's.
Progress goes to stderr; the last stdout line is one JSON object.
"""
import argparse
import contextlib
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import agent  # noqa: E402
import envs  # noqa: E402
import rl  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="sokoban", choices=envs.ENVS, help="environment")
    parser.add_argument("--arch", choices=agent.ARCHITECTURES, help="random-init real architecture (GPU)")
    parser.add_argument("--env-groups", type=int, default=32, help="distinct puzzles per step")
    parser.add_argument("--group-size", type=int, default=8, help="samples per puzzle")
    parser.add_argument("--steps", type=int, default=2, help="PPO steps; the last one is reported")
    parser.add_argument("--max-response-tokens", type=int, help="per turn (default: the preset's)")
    parser.add_argument("--grad-checkpointing", action="store_true", help="rl.py --grad-checkpointing")
    args = agent.help_with_defaults(parser).parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = agent.build_tiny_model(os.path.join(tmp, "tiny"), seed=0)
        preset = "tiny"
        if args.arch:
            tokenizer = agent.load_tokenizer(model_dir)
            model_dir = agent.save_checkpoint(agent.random_model(args.arch, dtype=torch.bfloat16), tokenizer,
                                              os.path.join(tmp, args.arch))
            preset = "paper"
        argv = ["--env", args.env, "--preset", preset, "--model", model_dir, "--out", os.path.join(tmp, "run"),
                "--steps", str(args.steps), "--env-groups", str(args.env_groups), "--group-size",
                str(args.group_size), "--val-every", "0", "--val-puzzles", "1", "--val-samples", "1",
                "--instruction", "short"]
        if args.max_response_tokens:
            argv += ["--max-response-tokens", str(args.max_response_tokens)]
        if args.grad_checkpointing:
            argv += ["--grad-checkpointing"]
        device = agent.default_device()
        results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                   "model": args.arch or "tiny", "env": args.env, "episodes": args.env_groups * args.group_size,
                   "grad_checkpointing": args.grad_checkpointing}
        try:
            with contextlib.redirect_stdout(sys.stderr):  # rl.py's config and summary: progress, not the result
                rl.main(argv)
        except torch.cuda.OutOfMemoryError as e:  # still a result: how far it got, and the plan it had
            config_path = os.path.join(tmp, "run", "run_config.json")  # written once the models are loaded
            plan = json.load(open(config_path)).get("memory_plan_gb") if os.path.isfile(config_path) else None
            print(json.dumps({**results, "oom": True, "peak_mem_gb": round(rl.peak_memory_gb(device), 2),
                              "total_mem_gb": round(torch.cuda.get_device_properties(0).total_memory / 1e9, 2),
                              "memory_plan_gb": plan, "error": str(e).splitlines()[0]}))
            raise SystemExit(1) from None
        rows = agent.read_jsonl(os.path.join(tmp, "run", "metrics.jsonl"))
    last = [r for r in rows if "perf/step_s" in r][-1]
    results.update({"kept_episodes": last["train/kept_episodes"],
                    **{k: round(last[f"perf/{k}"], 3) for k in ("rollout_s", "logprob_s", "update_s", "step_s",
                                                                 "peak_mem_gb", "tokens_per_s")},
                    "response_tokens_per_turn": last["train/response_tokens"], "turns_mean": last["train/turns"]})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
