"""
The paper's comparison at tiny scale (SPEC §1, §5): SPA vs vanilla PPO vs online world-model RL,
from a fresh tiny model, on this machine's CPU, in one command.

    python benchmarks/bench_learning.py --env frozenlake                  # the full run (see README for its time)
    python benchmarks/bench_learning.py --env frozenlake --quick          # the pipeline in 4 to 8 minutes (by machine)
    python benchmarks/bench_learning.py --env frozenlake --fixed-maps 8   # PPO on 8 fixed maps, 3 PPO seeds an arm
    python benchmarks/bench_learning.py --env sokoban --fixed-maps 8 --ppo-seeds 1 --kl-coef 0   # no KL penalty

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
Then evaluate.py plays the same validation puzzles with the final models and the two SFT
checkpoints, next to the random and oracle rows, and pairs spa with vanilla and with online on
those puzzles (evaluate.py --diff).

--behaviour oracle lets the oracle play the self-play of both SFT arms instead of random actions:
not the method (the paper's model plays itself), but the nearest this scale has to a base model
that already plays well -- the SFT then copies a competent policy, and the question is whether
the world model in it still helps PPO.

Two questions, two modes:
  default        new puzzles every PPO step, evaluation on unseen puzzles (seeds 123, ...): does
                 the policy generalise? The paper's claim.
  --fixed-maps N PPO plays the same N puzzles at every step (seeds 10000, ...; every group kept;
                 FrozenLake without slips, so a memorised plan always succeeds), 30 steps with a KL
                 penalty to the SFT checkpoint (--kl-coef 0.1), and the models are evaluated on those
                 N puzzles with 64 samples each: does the SFT make PPO learn faster where it can
                 learn at this budget? Memorisation, not generalisation. PPO seeds vary more than
                 the evaluation noise here, so each arm runs --ppo-seeds times (default 3; the SFT
                 checkpoints are shared).

Outputs in --out: each stage's run folder (sft-spa, sft-vanilla, rl-RUN for each run: rl-spa, or
rl-spa-seed0, rl-spa-seed1, ... with several PPO seeds; eval), report.md (the table, the paired
differences, the learning curves) and report.json (every number, the curves: validation Pass@1
and Pass@8 against PPO step for each run; every stage's argv). A stage whose final output exists
(SFT: eval.json; PPO: model/) is not run again, so an interrupted benchmark continues where it
stopped (the same flags and --out; a finished stage run with other settings is an error, not a
result). The last stdout line is JSON: spa_pass1, vanilla_pass1, online_pass1, oracle, random,
spa_pass1_ci, vanilla_pass1_ci (half-widths of the 95% bootstrap intervals), spa_pass8,
vanilla_pass8, minutes;
with several PPO seeds the arm figures are means over them, and *_pass1_seeds and
spa_minus_vanilla_seeds ([difference, 95% interval over samples] per seed) give each run.
"""
import argparse
import contextlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import agent  # noqa: E402
import evaluate  # noqa: E402
import rl  # noqa: E402
import worldmodel_sft  # noqa: E402

# SFT flags, PPO flags and evaluation puzzles: the full run (the presets' defaults) and --quick, a
# check of the whole pipeline in minutes (too small to learn more than the format); fixed_* replace
# the PPO steps and the evaluation samples with --fixed-maps
SCALES = {
    "full": dict(sft=[], ppo=["--steps", "20", "--val-every", "5"], puzzles=128, samples=8,
                 fixed_ppo=["--steps", "30", "--val-every", "10"], fixed_samples=64),
    "quick": dict(sft=["--batches", "1", "--epochs", "1", "--lr", "2e-3", "--eval-turns", "20"],
                  ppo=["--steps", "2", "--val-every", "1", "--env-groups", "8", "--val-puzzles", "16"], puzzles=16,
                  samples=8, fixed_ppo=["--steps", "2", "--val-every", "1"], fixed_samples=8),
}
WORLDMODEL_REWARD = 0.1
FIXED_MAPS_SEED_START = 10_000  # --fixed-maps: the first training puzzle (rl.py's default), also validated on
ARMS = ("spa", "vanilla", "online")
# --fixed-maps' default --kl-coef. There PPO makes 60 optimiser steps on the same maps, and without
# a penalty it wore down what it leaves out of the policy loss: SPA's observations exact fell from
# 0.87 after SFT to 0.34-0.52 on FrozenLake, and format validity fell to 0.56 on Sokoban. With 0.1
# they stayed at 0.83-0.93 and 0.89 or above, and SPA's lead over vanilla held (README).
FIXED_MAPS_KL_COEF = 0.1


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def run_stage(name, done_path, stage, argv):
    """Run one stage's main() unless its output exists from a run with the same settings (an error
    if the settings differ: its results would be reported as this benchmark's); its printing goes
    to stderr. Stages copied from another benchmark folder count as done (their paths follow them):
    copy sft-spa and sft-vanilla into a new --out to try other PPO settings on the same SFT."""
    if os.path.exists(done_path):
        args = stage.parse_args(argv)
        changed = agent.settings_changed(args.out, agent.run_config(args), rl.MACHINE_KEYS,
                                         agent.default_run_config(stage.parse_args, args, stage.PRESETS))
        if changed:
            raise SystemExit(f"error: {name} in {args.out} is not this benchmark's run ({changed}); "
                             f"use another --out")
        log(f"{name}: done before ({done_path})")
        return
    log(f"{name}: {' '.join(argv)}")
    timed_stage(name, stage, argv)


def timed_stage(name, stage, argv):
    """stage.main(argv), its printing to stderr; once it completes, its time is added to the
    benchmark folder's stage_times.jsonl, whose sum is the summary's minutes (over every invocation
    of an interrupted benchmark; a stage run cut off by the interruption is not counted)."""
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        stage.main(argv)
    seconds = time.perf_counter() - start
    times = os.path.join(os.path.dirname(stage.parse_args(argv).out), "stage_times.jsonl")
    agent.write_jsonl(times, agent.read_jsonl(times) + [{"stage": name, "seconds": round(seconds, 1)}])
    log(f"{name}: {seconds:.0f}s")


def ppo_seeds(args):
    return list(range(args.seed, args.seed + args.ppo_seeds))


def run_name(arm, seed, args):
    """spa, vanilla, online; with several PPO seeds spa-seed0, spa-seed1, ..."""
    return arm if args.ppo_seeds == 1 else f"{arm}-seed{seed}"


def stage_argvs(args, out):
    """The argv of every stage, by name: sft-spa, sft-vanilla, rl-RUN for each run (arm and PPO
    seed), evaluate. The arms' argvs differ only in the switch under study."""
    scale = SCALES["quick" if args.quick else "full"]
    path = lambda *parts: os.path.join(out, *parts)  # noqa: E731
    common = ["--env", args.env, "--preset", "tiny"]
    sft = common + ["--seed", str(args.seed), "--behaviour", args.behaviour] + scale["sft"]
    stages = {
        # 1. self-play SFT: the SPA arm plays and trains on the true states; vanilla trains on the same
        # dataset with every turn's states taken from another random turn
        "sft-spa": sft + ["--loss-spans", "all", "--out", path("sft-spa")],
        "sft-vanilla": sft + ["--state-targets", "shuffled", "--data", path("sft-spa", "dataset.jsonl"),
                              "--out", path("sft-vanilla")]}
    evaluation = ["--env", args.env, "--puzzles", str(scale["puzzles"]), "--samples", str(scale["samples"])]
    ppo = scale["ppo"]
    if args.fixed_maps:
        # every step plays the same maps (every group kept), validation and evaluation play them too;
        # FrozenLake without slips, so that a memorised plan always succeeds
        maps, first = str(args.fixed_maps), str(FIXED_MAPS_SEED_START)
        overrides = ["--env-overrides", json.dumps({"slippery": False})] if args.env == "frozenlake" else []
        ppo = scale["fixed_ppo"] + ["--train-puzzles", maps, "--env-groups", maps, "--keep-groups", "1",
                                    "--train-seed-start", first, "--val-seed-start", first, "--val-puzzles", maps]
        ppo += overrides
        evaluation = ["--env", args.env, "--puzzles", maps, "--samples", str(scale["fixed_samples"]),
                      "--val-seed-start", first] + overrides
    if args.kl_coef is not None:  # every arm: a KL penalty to its own starting (SFT) checkpoint
        ppo = ppo + ["--kl-coef", str(args.kl_coef)]
    # 2. PPO: the same steps, puzzles and episodes for every arm (and each PPO seed)
    arm_flags = {"spa": ["--model", path("sft-spa", "model")],
                 "vanilla": ["--model", path("sft-vanilla", "model")],
                 "online": ["--model", path("sft-vanilla", "model"), "--worldmodel-reward", str(WORLDMODEL_REWARD),
                            "--state-loss"]}
    for seed in ppo_seeds(args):
        for arm in ARMS:
            name = run_name(arm, seed, args)
            stages[f"rl-{name}"] = common + ["--seed", str(seed)] + ppo + arm_flags[arm] + ["--out", path(f"rl-{name}")]
    # 3. evaluation: the same puzzles for every model, with the reference rows; spa - vanilla and
    # spa - online paired on the same puzzles for each PPO seed, and for the SFT checkpoints
    evaluation += ["--seed", str(args.seed), "--out", path("eval")]
    for name in ("sft-spa", "sft-vanilla"):
        evaluation += ["--model", path(name, "model")]
    for seed in ppo_seeds(args):
        for arm in ARMS:
            evaluation += ["--model", path(f"rl-{run_name(arm, seed, args)}", "model")]
    for seed in ppo_seeds(args):
        spa = path(f"rl-{run_name('spa', seed, args)}", "model")
        for other in ("vanilla", "online"):
            evaluation += ["--diff", spa, path(f"rl-{run_name(other, seed, args)}", "model")]
    evaluation += ["--diff", path("sft-spa", "model"), path("sft-vanilla", "model")]
    stages["evaluate"] = evaluation
    return stages


def curve(run_dir):
    """Validation Pass@1 and Pass@8 against PPO step."""
    rows = agent.read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    return [{"step": r["step"], "pass@1": r["val/pass@1"], "pass@8": r.get("val/pass@8")}
            for r in rows if "val/pass@1" in r]


def half_width(ci):
    return round((ci[1] - ci[0]) / 2, 4)


def parse_args(argv=None):
    """The flags, with the defaults that depend on the mode resolved and args.out set."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="frozenlake", choices=("frozenlake", "sokoban"), help="environment")
    parser.add_argument("--quick", action="store_true", help="a small run of the whole pipeline (minutes)")
    parser.add_argument("--fixed-maps", type=int, default=0, metavar="N",
                        help="PPO trains on N fixed puzzles (FrozenLake: without slips), and the models are "
                             "evaluated on those same puzzles (0: new puzzles every step, unseen ones in evaluation)")
    parser.add_argument("--ppo-seeds", type=int, help="PPO runs per arm, seeds --seed, --seed + 1, ... "
                                                      "(default: 3 with --fixed-maps, else 1)")
    parser.add_argument("--kl-coef", type=agent.finite_float,
                        help="rl.py --kl-coef for every PPO run: a KL penalty to the run's SFT checkpoint over "
                             f"all response tokens, the states too (default: {FIXED_MAPS_KL_COEF} with --fixed-maps, "
                             "else the tiny preset's, 0)")
    parser.add_argument("--behaviour", default="random", choices=("random", "oracle"),
                        help="who plays in the SFT stages' self-play (worldmodel_sft.py --behaviour): random "
                             "actions, as the tiny preset has it, or the oracle, a stand-in for a base model "
                             "that already plays well (README)")
    parser.add_argument("--out", help="folder for the runs and the report (default: runs/learning-ENV[-fixedN]"
                                      "[-klC when --kl-coef is not the mode's default][-oracleplay][-quick])")
    parser.add_argument("--seed", type=agent.seed_int, default=0, help="seed of the SFT stages, the first PPO seed")
    args = agent.help_with_defaults(parser).parse_args(argv)
    if args.fixed_maps < 0:
        parser.error("--fixed-maps must be >= 0")
    if args.ppo_seeds is None:
        args.ppo_seeds = 3 if args.fixed_maps else 1
    if args.ppo_seeds < 1:
        parser.error("--ppo-seeds must be >= 1")
    if args.seed + args.ppo_seeds > 2 ** 63:  # the last PPO run's seed is a seed too (agent.seed_int)
        parser.error("--seed + --ppo-seeds - 1 must be below 2**63 (the last PPO run's seed)")
    if args.kl_coef is not None and not args.kl_coef >= 0:
        parser.error("--kl-coef must be >= 0")
    # the KL coefficient PPO runs with when --kl-coef is not given: --fixed-maps' own (passed on), or
    # else rl.py's tiny preset's (no penalty; not passed on). The folder's name says a departure from it.
    mode_kl_coef = FIXED_MAPS_KL_COEF if args.fixed_maps else None
    runs_kl_coef = mode_kl_coef if args.fixed_maps else rl.parse_args(["--env", args.env, "--preset", "tiny"]).kl_coef
    if args.out is None:
        args.out = os.path.join("runs", f"learning-{args.env}" + (f"-fixed{args.fixed_maps}" if args.fixed_maps
                                                                  else "")
                                + (f"-kl{args.kl_coef:g}" if args.kl_coef not in (None, runs_kl_coef) else "")
                                + ("-oracleplay" if args.behaviour == "oracle" else "")
                                + ("-quick" if args.quick else ""))
    if args.kl_coef is None:
        args.kl_coef = mode_kl_coef
    return args


def main(argv=None):
    args = parse_args(argv)
    out = args.out
    agent.make_run_dir(out)
    path = lambda *parts: os.path.join(out, *parts)  # noqa: E731
    log(json.dumps(vars(args), sort_keys=True))
    stages = stage_argvs(args, out)
    runs = {arm: [run_name(arm, seed, args) for seed in ppo_seeds(args)] for arm in ARMS}

    run_stage("sft-spa", path("sft-spa", "eval.json"), worldmodel_sft, stages["sft-spa"])
    run_stage("sft-vanilla", path("sft-vanilla", "eval.json"), worldmodel_sft, stages["sft-vanilla"])
    for stage in (stage for stage in stages if stage.startswith("rl-")):
        run_stage(stage, path(stage, "model"), rl, stages[stage])
    log(f"evaluate: {' '.join(stages['evaluate'])}")  # plays only the rows it has not played before
    timed_stage("evaluate", evaluate, stages["evaluate"])
    with open(path("eval", "report.json")) as f:
        evaluation = json.load(f)
    model_name = {path(name, "model"): name for name in ("sft-spa", "sft-vanilla")}
    model_name.update({path(f"rl-{name}", "model"): name for seed_runs in runs.values() for name in seed_runs})
    rename = lambda name: model_name.get(name, name)  # noqa: E731
    row = {rename(r["name"]): r for r in evaluation["rows"]}
    differences = [{**d, "a": rename(d["a"]), "b": rename(d["b"])} for d in evaluation["differences"]]
    curves = {name: curve(path(f"rl-{name}")) for seed_runs in runs.values() for name in seed_runs}

    with open(path(f"rl-{runs['spa'][0]}", "run_config.json")) as f:
        ppo_config = json.load(f)

    # the summary: each arm's figures, averaged over its PPO seeds when there are several (the
    # interval half-width then combines the runs' as independent errors, sqrt(sum hw^2) / runs:
    # evaluation noise only -- the spread between seeds is in *_pass1_seeds)
    def arm_mean(arm, key):
        return round(sum(row[name][key] for name in runs[arm]) / len(runs[arm]), 4)

    def arm_half_width(arm):
        return round(sum(half_width(row[name]["pass@1_ci"]) ** 2 for name in runs[arm]) ** 0.5 / len(runs[arm]), 4)

    oracle = row["oracle"]["exact_success"] if row["oracle"]["exact_success"] is not None else \
        row["oracle"]["pass@1"]
    summary = {"env": args.env, "quick": args.quick, "fixed_maps": args.fixed_maps, "ppo_seeds": args.ppo_seeds,
               "kl_coef": ppo_config["kl_coef"], "behaviour": args.behaviour,
               **{f"{arm}_pass1": arm_mean(arm, "pass@1") for arm in ARMS},
               "oracle": oracle, "random": row["random"]["pass@1"],
               **{f"{arm}_pass1_ci": arm_half_width(arm) for arm in ARMS},
               **{f"{arm}_pass8": arm_mean(arm, "pass@8") for arm in ARMS},
               **{f"sft_{arm}_pass1": row[f"sft-{arm}"]["pass@1"] for arm in ("spa", "vanilla")},
               **{f"{name}_prediction_exact": row[name]["prediction_exact"] for name in ("sft-spa", "sft-vanilla")}}
    if args.ppo_seeds > 1:
        summary.update({f"{arm}_pass1_seeds": [row[name]["pass@1"] for name in runs[arm]] for arm in ARMS})
        # spa - vanilla per PPO seed, with its interval over each map's samples (the maps fixed)
        summary["spa_minus_vanilla_seeds"] = [
            [d["pass@1_diff"], *d["ci_samples"]] for d in differences if d["b"] in runs["vanilla"]]
    summary["minutes"] = round(sum(r["seconds"] for r in agent.read_jsonl(path("stage_times.jsonl"))) / 60, 1)

    # the report: the table, the paired differences, the learning curves
    lines = ["| run | pass@1 [95% CI] | pass@8 [95% CI] | format valid | obs. exact | pred. exact (best) |",
             "|---|---|---|---|---|---|"]
    for name in ["random", "sft-vanilla", "sft-spa"] + [name for arm in ("vanilla", "online", "spa")
                                                        for name in runs[arm]] + ["oracle"]:
        r = row[name]
        pred = "–" if r["prediction_exact"] is None else f"{r['prediction_exact']:.3f} ({r['prediction_bayes']:.3f})"
        obs = "–" if r["observation_exact"] is None else f"{r['observation_exact']:.3f}"
        lines.append(f"| {name} | {r['pass@1']:.3f} [{r['pass@1_ci'][0]:.3f}, {r['pass@1_ci'][1]:.3f}] | "
                     f"{r['pass@8']:.3f} [{r['pass@8_ci'][0]:.3f}, {r['pass@8_ci'][1]:.3f}] | "
                     f"{r['format_valid']:.3f} | {obs} | {pred} |")
    lines += [""] + evaluate.differences_markdown(differences)
    lines += ["", f"Validation during PPO ({ppo_config['val_puzzles']} puzzles x {ppo_config['val_samples']} samples), "
              "Pass@1 / Pass@8:", "",
              "| step | " + " | ".join(curves) + " |", "|---" * (len(curves) + 1) + "|"]
    for i, point in enumerate(curves[runs["spa"][0]]):
        cells = [f"{points[i]['pass@1']:.3f} / {points[i]['pass@8']:.3f}" for points in curves.values()]
        lines.append(f"| {point['step']} | " + " | ".join(cells) + " |")
    report = "\n".join(lines) + "\n"
    agent.write_text(path("report.md"), report)
    agent.write_json(path("report.json"), {"summary": summary, "rows": row, "differences": differences,
                                           "curves": curves, "stages": stages})
    log(report)
    print(json.dumps(summary))


if __name__ == "__main__":
    agent.run_script(main, "Run the same command to continue: finished stages are kept, and the interrupted "
                           "one resumes from its last save.")
