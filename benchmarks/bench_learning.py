"""
The paper's comparison at tiny scale (SPEC §1, §5): SPA vs vanilla PPO vs online world-model RL,
from a fresh tiny model, on this machine's CPU, in one command.

    python benchmarks/bench_learning.py --env frozenlake            # the full run (see README for its time)
    python benchmarks/bench_learning.py --env frozenlake --quick    # the pipeline in about 9 minutes

Three arms that differ only in the switch under study, with the same self-play data, the same
number of PPO steps and the same episodes per step (same puzzle seeds):
  spa      self-play SFT with the loss on every response token, the states included -> PPO
  vanilla  SFT on the same data with states that say nothing about the puzzle (`--state-targets
           shuffled`: every response holds the states of another random turn) -> PPO. The model
           learns the format and the actions, as an instruct model would know them, and writes
           states it does not know. (The paper's ablation masks the states out of the loss; an
           instruct model still writes plausible states in the unmasked format. A tiny model
           learns nothing in a masked span -- not even to close it -- so `--loss-spans no-states`
           left it format-invalid in every episode, scoring -0.5 each, and PPO had no signal.)
  online   vanilla's SFT checkpoint -> PPO rewarding exact <observation>/<prediction> online
           (--worldmodel-reward, with the states in the policy loss: the reward must reach them)
Then evaluate.py plays the same validation puzzles with the three final models and the two SFT
checkpoints, next to the random and oracle rows.

Outputs in --out: each stage's run folder (sft-spa, sft-vanilla, rl-spa, rl-vanilla, rl-online,
eval), report.md (the table and the learning curves) and report.json (every number, the curves:
validation Pass@1 and Pass@8 against PPO step for each arm). A stage whose final checkpoint
exists is not run again, so an interrupted benchmark continues where it stopped. The last stdout
line is JSON: spa_pass1, vanilla_pass1, online_pass1, oracle, random, spa_pass1_ci,
vanilla_pass1_ci (half-widths of the 95% bootstrap intervals), spa_pass8, vanilla_pass8, minutes.
"""
import argparse
import contextlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import evaluate  # noqa: E402
import rl  # noqa: E402
import worldmodel_sft  # noqa: E402

# SFT flags, PPO flags and evaluation puzzles: the full run (the presets' defaults) and --quick, a
# check of the whole pipeline in minutes (too small to learn more than the format)
SCALES = {
    "full": dict(sft=[], ppo=["--steps", "20", "--val-every", "5"], puzzles=128),
    "quick": dict(sft=["--batches", "1", "--epochs", "1", "--lr", "2e-3", "--eval-turns", "20"],
                  ppo=["--steps", "2", "--val-every", "1", "--env-groups", "8", "--val-puzzles", "16"], puzzles=16),
}
WORLDMODEL_REWARD = 0.1


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def run_stage(name, done_path, main, argv):
    """Run one stage's main() unless its output exists; its printing goes to stderr."""
    if os.path.exists(done_path):
        log(f"{name}: done before ({done_path})")
        return
    log(f"{name}: {' '.join(argv)}")
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        main(argv)
    log(f"{name}: {time.perf_counter() - start:.0f}s")


def curve(run_dir):
    """Validation Pass@1 and Pass@8 against PPO step."""
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [{"step": r["step"], "pass@1": r["val/pass@1"], "pass@8": r.get("val/pass@8")}
            for r in rows if "val/pass@1" in r]


def half_width(ci):
    return round((ci[1] - ci[0]) / 2, 4)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="frozenlake", choices=("frozenlake", "sokoban"), help="environment")
    parser.add_argument("--quick", action="store_true", help="a small run of the whole pipeline (minutes)")
    parser.add_argument("--out", help="folder for the runs and the report (default: runs/learning-ENV[-quick])")
    parser.add_argument("--seed", type=int, default=0, help="seed of every stage")
    args = parser.parse_args()
    scale = SCALES["quick" if args.quick else "full"]
    out = args.out or os.path.join("runs", f"learning-{args.env}" + ("-quick" if args.quick else ""))
    os.makedirs(out, exist_ok=True)
    path = lambda *parts: os.path.join(out, *parts)  # noqa: E731
    common = ["--env", args.env, "--preset", "tiny", "--seed", str(args.seed)]
    start = time.perf_counter()

    # 1. self-play SFT: the SPA arm plays and trains on the true states; vanilla trains on the same
    # dataset with every turn's states taken from another random turn
    run_stage("sft-spa", path("sft-spa", "eval.json"), worldmodel_sft.main,
              common + scale["sft"] + ["--loss-spans", "all", "--out", path("sft-spa")])
    run_stage("sft-vanilla", path("sft-vanilla", "eval.json"), worldmodel_sft.main,
              common + scale["sft"] + ["--state-targets", "shuffled", "--data", path("sft-spa", "dataset.jsonl"),
                                       "--out", path("sft-vanilla")])

    # 2. PPO: the same steps, puzzles and episodes for every arm
    ppo = common + scale["ppo"]
    arms = {"spa": ["--model", path("sft-spa", "model")],
            "vanilla": ["--model", path("sft-vanilla", "model")],
            "online": ["--model", path("sft-vanilla", "model"), "--worldmodel-reward", str(WORLDMODEL_REWARD),
                       "--state-loss"]}
    for arm, flags in arms.items():
        run_stage(f"rl-{arm}", path(f"rl-{arm}", "model"), rl.main, ppo + flags + ["--out", path(f"rl-{arm}")])

    # 3. evaluation: the same validation puzzles for every model, with the reference rows
    models = {"spa": path("rl-spa", "model"), "vanilla": path("rl-vanilla", "model"),
              "online": path("rl-online", "model"), "sft-spa": path("sft-spa", "model"),
              "sft-vanilla": path("sft-vanilla", "model")}
    argv = ["--env", args.env, "--puzzles", str(scale["puzzles"]), "--samples", "8", "--seed", str(args.seed),
            "--out", path("eval")]
    for model in models.values():
        argv += ["--model", model]
    log(f"evaluate: {' '.join(argv)}")
    with contextlib.redirect_stdout(sys.stderr):
        rows = evaluate.main(argv)
    by_name = {r["name"]: r for r in rows}
    row = {arm: by_name[model] for arm, model in models.items()}
    row.update(random=by_name["random"], oracle=by_name["oracle"])

    # 4. the report
    curves = {arm: curve(path(f"rl-{arm}")) for arm in arms}
    oracle = row["oracle"]["exact_success"] if row["oracle"]["exact_success"] is not None else \
        row["oracle"]["pass@1"]
    summary = {"env": args.env, "quick": args.quick,
               **{f"{arm}_pass1": row[arm]["pass@1"] for arm in ("spa", "vanilla", "online")},
               "oracle": oracle, "random": row["random"]["pass@1"],
               **{f"{arm}_pass1_ci": half_width(row[arm]["pass@1_ci"]) for arm in ("spa", "vanilla", "online")},
               **{f"{arm}_pass8": row[arm]["pass@8"] for arm in ("spa", "vanilla", "online")},
               **{f"sft_{arm}_pass1": row[f"sft-{arm}"]["pass@1"] for arm in ("spa", "vanilla")},
               **{f"{name}_prediction_exact": row[name]["prediction_exact"] for name in ("sft-spa", "sft-vanilla")},
               "minutes": round((time.perf_counter() - start) / 60, 1)}
    lines = ["| arm | pass@1 [95% CI] | pass@8 [95% CI] | format valid | obs. exact | pred. exact (best) |",
             "|---|---|---|---|---|---|"]
    for name in ("random", "sft-vanilla", "sft-spa", "vanilla", "online", "spa", "oracle"):
        r = row[name]
        pred = "–" if r["prediction_exact"] is None else f"{r['prediction_exact']:.3f} ({r['prediction_bayes']:.3f})"
        obs = "–" if r["observation_exact"] is None else f"{r['observation_exact']:.3f}"
        lines.append(f"| {name} | {r['pass@1']:.3f} [{r['pass@1_ci'][0]:.3f}, {r['pass@1_ci'][1]:.3f}] | "
                     f"{r['pass@8']:.3f} [{r['pass@8_ci'][0]:.3f}, {r['pass@8_ci'][1]:.3f}] | "
                     f"{r['format_valid']:.3f} | {obs} | {pred} |")
    with open(path("rl-spa", "run_config.json")) as f:
        ppo_config = json.load(f)
    lines += ["", f"Validation during PPO ({ppo_config['val_puzzles']} puzzles x {ppo_config['val_samples']} samples), "
              "Pass@1 / Pass@8:", "",
              "| step | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]
    for i, point in enumerate(curves["spa"]):
        cells = [f"{curves[arm][i]['pass@1']:.3f} / {curves[arm][i]['pass@8']:.3f}" for arm in arms]
        lines.append(f"| {point['step']} | " + " | ".join(cells) + " |")
    report = "\n".join(lines) + "\n"
    with open(path("report.md"), "w") as f:
        f.write(report)
    with open(path("report.json"), "w") as f:
        json.dump({"summary": summary, "rows": row, "curves": curves, "scale": scale}, f, indent=2)
    log(report)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
