"""benchmarks/bench_learning.py: the stages it runs (fast), and --quick end to end (slow: 4 to 8 minutes,
and 3 to 4 with --fixed-maps 2 --ppo-seeds 2).

--quick is a check of the pipeline, not of learning: its SFT is too short for the tiny model to
write the format reliably at temperature 1, so no arm beats the random policy there (README,
"Reproducing the comparison"). What it must show: every stage runs, the arms get the same PPO
steps and validation points, the report holds every figure, and the short SFT did learn the
format under greedy decoding."""
import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

import agent
import evaluate
import rl
import worldmodel_sft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("bench_learning", os.path.join(ROOT, "benchmarks", "bench_learning.py"))
bench_learning = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_learning)


def plan(out, **flags):
    args = argparse.Namespace(**{**vars(bench_learning.parse_args([])), **flags})  # defaults, kl_coef unset
    os.makedirs(os.path.join(out, "sft-spa"))
    open(os.path.join(out, "sft-spa", "dataset.jsonl"), "w").close()  # vanilla's SFT checks its --data exists
    return bench_learning.stage_argvs(args, out)


def without(argv, *flags):
    """argv less the given flags and their values ("--state-loss" has none)."""
    kept, i = [], 0
    while i < len(argv):
        if argv[i] in flags:
            i += 1 if argv[i] == "--state-loss" else 2
        else:
            kept.append(argv[i])
            i += 1
    return kept


@pytest.mark.parametrize("fixed_maps, ppo_seeds", [(0, 1), (8, 3)])
def test_the_arms_differ_only_in_the_switch_under_study(tmp_path, fixed_maps, ppo_seeds):
    out = str(tmp_path)
    stages = plan(out, fixed_maps=fixed_maps, ppo_seeds=ppo_seeds)
    names = ["spa", "vanilla", "online"] if ppo_seeds == 1 else [
        f"{arm}-seed{seed}" for seed in range(ppo_seeds) for arm in ("spa", "vanilla", "online")]
    assert list(stages) == ["sft-spa", "sft-vanilla"] + [f"rl-{name}" for name in names] + ["evaluate"]
    # SFT: the same data, true states or shuffled ones
    spa_sft, vanilla_sft = (worldmodel_sft.parse_args(stages[s]) for s in ("sft-spa", "sft-vanilla"))
    assert vanilla_sft.data == os.path.join(out, "sft-spa", "dataset.jsonl") and spa_sft.data is None
    assert (spa_sft.state_targets, vanilla_sft.state_targets) == ("true", "shuffled")
    for seed in range(ppo_seeds):
        suffix = "" if ppo_seeds == 1 else f"-seed{seed}"
        spa, vanilla, online = (stages[f"rl-{arm}{suffix}"] for arm in ("spa", "vanilla", "online"))
        assert without(spa, "--model", "--out") == without(vanilla, "--model", "--out") == \
            without(online, "--model", "--out", "--worldmodel-reward", "--state-loss")
        spa, vanilla, online = (rl.parse_args(argv) for argv in (spa, vanilla, online))
        assert spa.model == os.path.join(out, "sft-spa", "model") and spa.seed == seed
        assert vanilla.model == online.model == os.path.join(out, "sft-vanilla", "model")
        assert online.worldmodel_reward > 0 and online.state_loss and spa.worldmodel_reward == 0
        if fixed_maps:  # train on the same 8 non-slippery maps at every step, and validate on them
            assert (spa.train_puzzles, spa.env_groups, spa.keep_groups, spa.val_puzzles) == (8, 8, 1.0, 8)
            assert spa.val_seed_start == spa.train_seed_start and spa.env_overrides == {"slippery": False}
            assert spa.steps == 30
        else:  # new puzzles every step, validation on unseen ones
            assert spa.train_puzzles == 0 and spa.val_seed_start != spa.train_seed_start
            assert spa.env_overrides == {} and spa.steps == 20
    # evaluation: every model on the same puzzles (the training maps with --fixed-maps), spa paired
    # with vanilla and with online for every PPO seed, and the two SFT checkpoints paired
    ev = evaluate.parse_args(stages["evaluate"])
    models = [os.path.join(out, name, "model") for name in ["sft-spa", "sft-vanilla"] + [f"rl-{n}" for n in names]]
    assert ev.model == models
    assert len(ev.diff) == 2 * ppo_seeds + 1 and ev.diff[-1] == models[:2]
    if fixed_maps:
        assert (ev.puzzles, ev.samples, ev.val_seed_start, ev.env_overrides) == (8, 64, spa.train_seed_start,
                                                                                 {"slippery": False})
    else:
        assert (ev.puzzles, ev.samples, ev.val_seed_start, ev.env_overrides) == (128, 8, 123, {})


def test_kl_coef_reaches_every_ppo_run_and_nothing_else(tmp_path):
    default = plan(str(tmp_path / "a"), fixed_maps=8)
    anchored = plan(str(tmp_path / "b"), fixed_maps=8, kl_coef=0.1)
    runs = [name for name in default if name.startswith("rl-")]
    assert len(runs) == 3
    for name in runs:
        assert rl.parse_args(default[name]).kl_coef == 0.0  # the tiny preset's
        assert rl.parse_args(anchored[name]).kl_coef == 0.1
        assert without(anchored[name], "--kl-coef", "--model", "--out") == \
            without(default[name], "--model", "--out")
    for name in ("sft-spa", "sft-vanilla", "evaluate"):
        assert "--kl-coef" not in anchored[name]


def test_oracle_play_reaches_both_sft_stages_and_nothing_else(tmp_path):
    default = plan(str(tmp_path / "a"))
    oracle = plan(str(tmp_path / "b"), behaviour="oracle")
    for name in ("sft-spa", "sft-vanilla"):
        assert worldmodel_sft.parse_args(default[name]).behaviour == "random"  # the benchmark's default
        assert worldmodel_sft.parse_args(oracle[name]).behaviour == "oracle"
        assert without(oracle[name], "--behaviour", "--out", "--data") == \
            without(default[name], "--behaviour", "--out", "--data")
    for name in oracle:
        if name.startswith("rl-") or name == "evaluate":
            assert "--behaviour" not in oracle[name]


def test_fixed_maps_default_to_a_kl_penalty_and_the_folder_names_a_departure_from_the_default():
    def parsed(*flags):
        args = bench_learning.parse_args(list(flags))
        return args.kl_coef, args.out
    assert parsed() == (None, os.path.join("runs", "learning-frozenlake"))  # the tiny preset's: no reference model
    assert parsed("--fixed-maps", "8") == (0.1, os.path.join("runs", "learning-frozenlake-fixed8"))
    assert parsed("--kl-coef", "0") == (0.0, os.path.join("runs", "learning-frozenlake"))  # what it runs with anyway
    assert parsed("--fixed-maps", "8", "--kl-coef", "0") == (0.0, os.path.join("runs",
                                                                               "learning-frozenlake-fixed8-kl0"))
    assert parsed("--env", "sokoban", "--kl-coef", "0.1", "--quick") == (0.1, os.path.join(
        "runs", "learning-sokoban-kl0.1-quick"))
    assert parsed("--fixed-maps", "8", "--out", "x") == (0.1, "x")
    assert parsed("--behaviour", "oracle", "--quick") == (None, os.path.join("runs",
                                                                            "learning-frozenlake-oracleplay-quick"))
    default = bench_learning.stage_argvs(bench_learning.parse_args(["--fixed-maps", "8"]), "x")
    assert all(rl.parse_args(argv).kl_coef == 0.1 for name, argv in default.items() if name.startswith("rl-"))


def test_a_finished_stage_is_reused_only_with_the_same_settings(tmp_path):
    out = str(tmp_path)
    anchored = plan(out, fixed_maps=8, kl_coef=0.1)
    default = bench_learning.stage_argvs(argparse.Namespace(**{**vars(bench_learning.parse_args([])),
                                                               "fixed_maps": 8}), out)
    finished = rl.parse_args(anchored["rl-spa"])
    os.makedirs(os.path.join(finished.out, "model"))
    with open(os.path.join(finished.out, "run_config.json"), "w") as f:  # as rl.py writes it
        json.dump({**agent.run_config(finished), "device": "cpu", "world_size": 1, "parameters": 1}, f)
    done = os.path.join(finished.out, "model")
    bench_learning.run_stage("rl-spa", done, rl, anchored["rl-spa"])  # the same settings: skipped, not run
    with open(os.path.join(finished.out, "run_config.json"), "w") as f:  # as written before --clip-high existed
        json.dump({**{k: v for k, v in agent.run_config(finished).items() if k != "clip_high"},
                   "device": "cpu", "world_size": 1, "parameters": 1}, f)
    bench_learning.run_stage("rl-spa", done, rl, anchored["rl-spa"])  # at its default then: skipped too
    with pytest.raises(SystemExit, match=r"rl-spa in .* is not this benchmark's run \(kl_coef: 0.1 there, 0.0 now\)"):
        bench_learning.run_stage("rl-spa", done, rl, default["rl-spa"])


def test_stages_copied_into_another_benchmark_folder_are_reused_there(tmp_path):
    """Copying sft-spa and sft-vanilla into a new --out tries other PPO settings on the same SFT: the
    copies' recorded paths (their own folder, vanilla's --data in sft-spa) follow them."""
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    plan(first)
    settings = argparse.Namespace(**{**vars(bench_learning.parse_args([])), "fixed_maps": 8})
    finished = worldmodel_sft.parse_args(bench_learning.stage_argvs(settings, first)["sft-vanilla"])
    os.makedirs(os.path.join(finished.out, "model"))
    with open(os.path.join(finished.out, "run_config.json"), "w") as f:  # as worldmodel_sft.py writes it
        json.dump(agent.run_config(finished), f)
    shutil.copytree(first, second)
    copied = bench_learning.stage_argvs(settings, second)["sft-vanilla"]
    done = os.path.join(second, "sft-vanilla", "model")
    bench_learning.run_stage("sft-vanilla", done, worldmodel_sft, copied)  # skipped, not run
    config = agent.run_config(worldmodel_sft.parse_args(copied))
    assert agent.settings_changed(os.path.join(second, "sft-vanilla"), config) is None  # the stage would resume there
    # a copy made with other settings is still refused, and a path outside the folder does not follow it
    with pytest.raises(SystemExit, match=r"not this benchmark's run \(lr: 0.001 there, 0.002 now\)"):
        bench_learning.run_stage("sft-vanilla", done, worldmodel_sft, copied + ["--lr", "2e-3"])
    with open(os.path.join(second, "sft-vanilla", "run_config.json")) as f:
        recorded = json.load(f)
    outside = str(tmp_path / "elsewhere.jsonl")
    with open(os.path.join(second, "sft-vanilla", "run_config.json"), "w") as f:
        json.dump({**recorded, "data": outside}, f)
    with pytest.raises(SystemExit, match=r"data: .*elsewhere.jsonl' there"):
        bench_learning.run_stage("sft-vanilla", done, worldmodel_sft, copied)


def test_paths_inside_a_moved_or_renamed_run_folder_follow_it(tmp_path, monkeypatch):
    """A run's recorded paths inside its folder (a fresh tiny model's base_model/) or inside the
    folder's parent (a sibling stage's checkpoint) follow a move or a copy; other paths do not."""
    old = tmp_path / "runs" / "rl"
    old.mkdir(parents=True)
    recorded = {"out": str(old), "model": str(tmp_path / "runs" / "sft" / "model"), "seed": 0,
                "data": str(old / "dataset.jsonl"), "log": str(tmp_path / "elsewhere.jsonl")}
    (old / "run_config.json").write_text(json.dumps(recorded))

    def moved_to(folder, **change):
        shutil.copytree(old, folder, dirs_exist_ok=True)
        parent = os.path.dirname(folder)
        config = {**recorded, "out": str(folder), "model": os.path.join(parent, "sft", "model"),
                  "data": os.path.join(folder, "dataset.jsonl"), **change}
        return agent.settings_changed(str(folder), config)
    assert moved_to(tmp_path / "runs" / "rl-renamed") is None  # the run folder renamed
    assert moved_to(tmp_path / "copy" / "rl") is None  # the whole benchmark folder copied
    assert moved_to(tmp_path / "copy" / "rl-seed0") is None  # copied, and the run renamed
    # a path outside both folders does not follow; nor does another path inside them
    assert moved_to(tmp_path / "copy" / "rl", log=str(tmp_path / "copy" / "elsewhere.jsonl")).startswith("log: ")
    assert moved_to(tmp_path / "copy" / "rl", model=str(tmp_path / "copy" / "sft-2" / "model")).startswith("model: ")
    assert moved_to(tmp_path / "copy" / "rl", seed=1) == "seed: 0 there, 1 now"
    # relative paths, as typed, from a run folder in the working directory
    monkeypatch.chdir(tmp_path)
    os.mkdir("rl")
    with open(os.path.join("rl", "run_config.json"), "w") as f:
        json.dump({"out": "rl", "model": "sft/model", "env": "frozenlake"}, f)
    shutil.copytree("rl", os.path.join("copy", "rl2"))
    assert agent.settings_changed("copy/rl2", {"out": "copy/rl2", "model": "copy/sft/model", "env": "frozenlake"}) \
        is None
    assert agent.settings_changed("copy/rl2", {"out": "copy/rl2", "model": "copy/sft-2/model", "env": "sokoban"}) \
        == "env: 'frozenlake' there, 'sokoban' now; model: 'sft/model' there, 'copy/sft-2/model' now"


def test_a_run_folder_of_another_stage_or_with_no_settings_is_said_to_be_so(tmp_path):
    import rl
    import worldmodel_sft
    sft_args = worldmodel_sft.parse_args(["--env", "frozenlake", "--preset", "tiny", "--out", str(tmp_path)])
    agent.write_json(str(tmp_path / "run_config.json"), agent.run_config(sft_args))
    rl_config = agent.run_config(rl.parse_args(["--env", "frozenlake", "--preset", "tiny", "--out", str(tmp_path)]))
    assert re.fullmatch(r"another script's run: \d+ of the \d+ settings in its run_config\.json are not this "
                        r"script's \(batch_size, batches, behaviour, \.\.\.\)",
                        agent.settings_changed(str(tmp_path), rl_config, rl.RESUME_MAY_CHANGE))
    assert agent.settings_changed(str(tmp_path), agent.run_config(sft_args)) is None
    # PPO starting afresh there (no train_state.pt: the SFT is still playing, say) would write its
    # run_config.json over the SFT's, which could then never resume
    recorded = (tmp_path / "run_config.json").read_bytes()
    with pytest.raises(SystemExit, match=r"holds another script's run: \d+ of the \d+ settings"):
        rl.main(["--env", "frozenlake", "--preset", "tiny", "--out", str(tmp_path)])
    assert (tmp_path / "run_config.json").read_bytes() == recorded
    assert agent.another_scripts_run(str(tmp_path), agent.run_config(sft_args)) is None
    (tmp_path / "run_config.json").write_text("[1, 2]")
    assert agent.settings_changed(str(tmp_path), rl_config) == \
        "its run_config.json holds no settings (a JSON list, not an object)"


def test_bad_flags_fail_with_one_line():
    for flags, message in ((["--fixed-maps", "-1"], "--fixed-maps must be >= 0"),
                           (["--seed", str(2 ** 63 - 1), "--ppo-seeds", "2"], "below 2**63 (the last PPO run's seed)"),
                           (["--ppo-seeds", "0"], "--ppo-seeds must be >= 1"),
                           (["--kl-coef", "-0.1"], "--kl-coef must be >= 0")):
        result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_learning.py"), *flags],
                                cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_quick_comparison_runs_every_stage_and_reports_every_figure(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_learning.py"), "--env",
                             "frozenlake", "--quick", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                            timeout=3600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("spa_pass1", "vanilla_pass1", "online_pass1", "oracle", "random", "spa_pass1_ci", "vanilla_pass1_ci",
                "spa_pass8", "vanilla_pass8", "minutes"):
        assert key in summary
    for key in ("spa_pass1", "vanilla_pass1", "online_pass1", "spa_pass8", "vanilla_pass8"):
        assert 0.0 <= summary[key] <= 1.0
    # the reference rows: FrozenLake's exact oracle probability is far above chance
    assert 0.1 < summary["random"] < summary["oracle"] - 0.1 and summary["oracle"] < 1.0
    report = json.load(open(tmp_path / "report.json"))
    for arm in ("spa", "vanilla", "online"):
        assert [p["step"] for p in report["curves"][arm]] == [0, 1, 2]
        config = json.load(open(tmp_path / f"rl-{arm}" / "run_config.json"))
        assert config["steps"] == 2 and config["env_groups"] == 8
    assert json.load(open(tmp_path / "rl-online" / "run_config.json"))["worldmodel_reward"] > 0
    # the SFT arms trained on the same self-play data, one on the true states, one on shuffled ones
    spa, vanilla = (json.load(open(tmp_path / f"sft-{arm}" / "eval.json")) for arm in ("spa", "vanilla"))
    assert (spa["state_targets"], vanilla["state_targets"]) == ("true", "shuffled")
    assert json.load(open(tmp_path / "sft-vanilla" / "run_config.json"))["data"].endswith("dataset.jsonl")
    # greedy: the format is learned even by the short SFT (0.85 when measured), and by the vanilla arm
    # too (0.6; with the states masked instead it was 0.0 and its PPO saw nothing but format penalties)
    assert spa["format_valid"] >= 0.5 and vanilla["format_valid"] >= 0.3
    table = open(tmp_path / "report.md").read()
    for name in ("random", "sft-vanilla", "sft-spa", "vanilla", "online", "spa", "oracle"):
        assert f"| {name} |" in table
    # the finished benchmark started again: no stage runs, no row is played, the same figures
    again = subprocess.run(result.args, cwd=ROOT, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("done before") == 5 and again.stderr.count("played before") == 7
    summary_again = json.loads(again.stdout.strip().splitlines()[-1])
    assert {**summary_again, "minutes": None} == {**summary, "minutes": None}
    assert summary["minutes"] <= summary_again["minutes"] <= summary["minutes"] + 0.2


@pytest.mark.slow
def test_quick_fixed_maps_comparison_reports_every_seed_and_the_paired_differences(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_learning.py"), "--env",
                             "frozenlake", "--quick", "--fixed-maps", "2", "--ppo-seeds", "2", "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=3600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["fixed_maps"], summary["ppo_seeds"], summary["kl_coef"]) == (2, 2, 0.1)  # the mode's KL penalty
    report = json.load(open(tmp_path / "report.json"))
    rows = report["rows"]
    for arm in ("spa", "vanilla", "online"):
        runs = [f"{arm}-seed0", f"{arm}-seed1"]
        assert summary[f"{arm}_pass1_seeds"] == [rows[run]["pass@1"] for run in runs]
        assert summary[f"{arm}_pass1"] == pytest.approx(sum(summary[f"{arm}_pass1_seeds"]) / 2, abs=1e-4)
        for run in runs:
            assert (rows[run]["puzzles"], rows[run]["samples"]) == (2, 8)
            assert [p["step"] for p in report["curves"][run]] == [0, 1, 2]
    # on the training maps, without slips: the oracle always wins
    assert summary["oracle"] == 1.0 and rows["oracle"]["pass@1"] == 1.0
    pairs = [(d["a"], d["b"]) for d in report["differences"]]
    assert pairs == [("spa-seed0", "vanilla-seed0"), ("spa-seed0", "online-seed0"), ("spa-seed1", "vanilla-seed1"),
                     ("spa-seed1", "online-seed1"), ("sft-spa", "sft-vanilla")]
    for d, (diff, lo, hi) in zip(report["differences"][::2], summary["spa_minus_vanilla_seeds"]):
        assert d["pass@1_diff"] == diff and d["pass@1_diff"] == pytest.approx(
            rows[d["a"]]["pass@1"] - rows[d["b"]]["pass@1"], abs=1e-3) and lo <= diff <= hi
    table = open(tmp_path / "report.md").read()
    assert "| spa-seed1 − vanilla-seed1 |" in table and "| vanilla-seed0 |" in table
