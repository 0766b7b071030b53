"""Evaluation: the Pass@k estimator, the reference rows against exact values, world-model
accuracy, determinism, outputs and bad input."""
import collections
import itertools
import json
import math
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest

import agent
import envs
import evaluate as ev

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(tmp_path, capsys, *argv):
    """main() in-process; returns (rows of the last stdout line, the out folder)."""
    out = tmp_path / "out"
    rows = ev.main([*argv, "--out", str(out)])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == {"rows": rows}
    return rows, out


def row(rows, name, env=None):
    (match,) = [r for r in rows if r["name"] == name and (env is None or r["env"] == env)]
    return match


# -----------------------------------------------------------------------------
# Pass@k and the bootstrap

def test_pass_at_k_matches_subset_enumeration():
    for n in range(1, 9):
        for c in range(n + 1):
            outcomes = [1] * c + [0] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(outcomes, k))
                brute = sum(any(s) for s in subsets) / len(subsets)
                assert ev.pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)
    assert ev.pass_at_k(8, 2, 1) == 0.25  # pass@1 is the success rate
    for bad in ((4, 1, 5), (4, 5, 1), (4, 1, 0)):
        with pytest.raises(ValueError):
            ev.pass_at_k(*bad)


def test_bootstrap_interval():
    values = [0.0, 1.0] * 50
    ci = ev.bootstrap_ci(values, np.random.default_rng(0))
    assert ci == ev.bootstrap_ci(values, np.random.default_rng(0))  # seeded
    assert ci[0] < 0.5 < ci[1] and ci[1] - ci[0] == pytest.approx(2 * 1.96 * 0.05, abs=0.03)  # ~ +-1.96 SE
    assert ev.bootstrap_ci([0.25] * 10, np.random.default_rng(0)) == [0.25, 0.25]


def test_bootstrap_interval_resamples_every_puzzle_and_cuts_2_5_percent_from_each_side():
    """The 95% interval is the 2.5% and 97.5% quantiles of means over puzzles drawn uniformly with
    replacement from all of them. test_bootstrap_interval's symmetric data and loose width let a
    90% interval, or a draw that never picks the last puzzle, pass."""
    values = np.random.default_rng(1).random(15)
    rng = np.random.default_rng(0)
    means = values[rng.integers(0, 15, size=(1000, 15))].mean(axis=1)
    expected = [round(float(q), 4) for q in np.quantile(means, [0.025, 0.975])]
    assert ev.bootstrap_ci(values, np.random.default_rng(0)) == expected
    assert expected != [round(float(q), 4) for q in np.quantile(means, [0.05, 0.95])]  # the level is visible
    # one success in 10 puzzles, the last: a resampled mean is Binomial(10, 0.1) / 10, whose 2.5% and
    # 97.5% quantiles are 0 and 0.3 (P(X <= 2) = 0.930, P(X <= 3) = 0.987); [0, 0] if it were never drawn
    assert ev.bootstrap_ci([0.0] * 9 + [1.0], np.random.default_rng(0), resamples=20000) == [0.0, 0.3]


def test_paired_difference():
    a = {1: [1, 1, 0, 0], 2: [1, 1, 1, 1]}
    b = {2: [1, 1, 1, 0], 1: [0, 0, 0, 0]}  # the same puzzles, in any order
    d = ev.paired_difference(a, b, np.random.default_rng(0))
    assert d["pass@1_diff"] == 0.375 and d["puzzles"] == 2  # (0.5 + 0.25) / 2
    assert d == ev.paired_difference(a, b, np.random.default_rng(0))  # seeded
    # deterministic outcomes on every puzzle: no noise over samples
    d = ev.paired_difference({1: [1, 1], 2: [0, 0]}, {1: [0, 0], 2: [0, 0]}, np.random.default_rng(0))
    assert d["pass@1_diff"] == 0.5 and d["ci_samples"] == [0.5, 0.5] and d["ci_puzzles"][0] == 0.0
    # every puzzle differs by the same 0.25: nothing varies over puzzles, the sample noise remains, and
    # its interval is +-1.96 standard errors of two independent binomial means over 16 puzzles x 64 samples
    a = {seed: [1, 0] * 32 for seed in range(16)}
    b = {seed: [1, 0, 0, 0] * 16 for seed in range(16)}
    d = ev.paired_difference(a, b, np.random.default_rng(0), resamples=4000)
    assert d["pass@1_diff"] == 0.25 and d["ci_puzzles"] == [0.25, 0.25]
    se = math.sqrt((0.5 * 0.5 + 0.25 * 0.75) / 64 / 16)
    lo, hi = d["ci_samples"]
    assert lo < 0.25 < hi and (hi - lo) / 2 == pytest.approx(1.96 * se, rel=0.15)
    with pytest.raises(ValueError, match="same puzzles"):
        ev.paired_difference({1: [1]}, {2: [1]}, np.random.default_rng(0))


# -----------------------------------------------------------------------------
# The random policy's exact success on FrozenLake (envs.FrozenLake.random_success)

def test_random_plan_lengths_are_those_random_actions_draws():
    probs = ev.random_plan_lengths()
    assert len(probs) == agent.MAX_ACTIONS_PER_TURN and sum(probs) == pytest.approx(1.0)
    env = envs.make("frozenlake")
    env.reset(0)
    rng, n = random.Random(0), 20_000
    counts = [0] * len(probs)
    for _ in range(n):
        counts[len(agent.random_actions(env, rng)) - 1] += 1
    for count, p in zip(counts, probs):
        assert abs(count / n - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_frozenlake_random_success_matches_brute_force():
    """Every combination of turn plan lengths, every random action sequence, through the env's own
    outcome_distribution: the DP must give exactly the same probability."""
    desc = ["P_O", "___", "O_G"]
    probs = ev.random_plan_lengths(continue_p=0.5, max_actions=3)
    for slippery, max_turns in ((True, 2), (True, 3), (False, 2)):
        env = envs.make("frozenlake", desc=desc, slippery=slippery, max_steps=4)
        env.reset(0)
        expected = 0.0
        for lengths in itertools.product(range(1, len(probs) + 1), repeat=max_turns):
            total = min(sum(lengths), env.max_steps)  # a turn cut short by the budget runs what is left
            goal = np.mean([env.outcome_distribution(seq).get((2, 2), 0.0)
                            for seq in itertools.product(envs.FROZENLAKE_ACTIONS, repeat=total)])
            expected += math.prod(probs[L - 1] for L in lengths) * goal
        assert env.random_success(probs, max_turns=max_turns) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="plan_lengths"):
        env.random_success([0.5, 0.2])


# -----------------------------------------------------------------------------
# Reference rows

def test_frozenlake_reference_rows_agree_with_their_exact_values(tmp_path, capsys):
    puzzles = 512
    rows, _ = run(tmp_path, capsys, "--env", "frozenlake", "--policy", "random", "--policy", "oracle",
                  "--puzzles", str(puzzles), "--samples", "2", "--k", "2")
    assert [r["name"] for r in rows] == ["random", "oracle"]
    exact = {"random": [], "oracle": []}
    for seed in range(123, 123 + puzzles):
        env = envs.make("frozenlake")
        env.reset(seed)
        exact["random"].append(env.random_success(ev.random_plan_lengths()))
        exact["oracle"].append(env.oracle()["turn_success"])
    for name, values in exact.items():
        r = row(rows, name)
        assert r["exact_success"] == pytest.approx(np.mean(values), abs=1e-4)
        # puzzles are independent; a puzzle's samples may not be (they share the seed's slips), so
        # the standard error of the simulated mean is at most sqrt(sum p(1-p)) / puzzles
        se = math.sqrt(sum(p * (1 - p) for p in values)) / puzzles
        assert abs(r["pass@1"] - np.mean(values)) < 4 * se, (name, r["pass@1"], np.mean(values), se)
        assert r["format_valid"] == 1.0 and r["truncated"] == 0.0 and r["observation_exact"] == 1.0
    oracle = row(rows, "oracle")
    # the oracle is deterministic and the slips are a function of the seed: every sample plays alike
    assert oracle["pass@2"] == oracle["pass@1"]
    # it writes the most likely next state: exactly as good as the best possible predictor
    assert oracle["prediction_exact"] == oracle["prediction_bayes"]
    assert row(rows, "random")["pass@1"] < oracle["exact_success"]


@pytest.mark.parametrize("env_name", ["sokoban", "sudoku"])
def test_oracle_is_perfect_on_sokoban_and_sudoku(tmp_path, capsys, env_name):
    rows, _ = run(tmp_path, capsys, "--env", env_name, "--policy", "oracle", "--puzzles", "32", "--samples", "3",
                  "--k", "3")
    (r,) = rows
    assert r["pass@1"] == r["pass@2"] == r["pass@3"] == r["exact_success"] == 1.0 and r["pass@1_ci"] == [1.0, 1.0]
    assert r["format_valid"] == r["observation_exact"] == r["prediction_exact"] == r["prediction_bayes"] == 1.0
    assert r["score"] > 0 and r["turns"] <= agent.MAX_TURNS and r["wm_turns"] > 0
    # base mode: the responses carry no states, so there is no world-model accuracy to report
    rows, _ = run(tmp_path, capsys, "--env", env_name, "--policy", "oracle", "--puzzles", "8", "--samples", "1",
                  "--k", "1", "--mode", "base")
    (r,) = rows
    assert r["pass@1"] == 1.0 and r["wm_turns"] == 0 and r["observation_exact"] is None
    assert r["prediction_exact"] is None


def test_env_overrides_reach_the_puzzles_and_the_exact_values(tmp_path, capsys):
    # one fixed non-slippery map, goal one move to the right: the oracle always wins in one action,
    # the random policy wins exactly when its first action is Right (the others move it off or stay)
    overrides = {"slippery": False, "desc": ["____", "_PG_", "____", "____"]}
    rows, out = run(tmp_path, capsys, "--env", "frozenlake", "--policy", "random", "--policy", "oracle",
                    "--puzzles", "64", "--samples", "4", "--k", "4", "--env-overrides", json.dumps(overrides))
    oracle, rand = row(rows, "oracle"), row(rows, "random")
    assert oracle["pass@1"] == oracle["exact_success"] == 1.0 and oracle["actions"] == 1.0
    env = envs.make("frozenlake", **overrides)
    env.reset(0)
    assert rand["exact_success"] == pytest.approx(env.random_success(ev.random_plan_lengths()), abs=1e-4)
    assert abs(rand["pass@1"] - rand["exact_success"]) < 0.1
    episodes = [json.loads(line) for line in open(out / "episodes.jsonl")]
    assert {e["messages"][1]["content"].split("State:\n")[1][:19] for e in episodes} == {"____\n_PG_\n____\n____"}
    assert json.load(open(out / "report.json"))["config"]["env_overrides"] == overrides


@pytest.mark.parametrize("room, max_steps, success", [
    ("#######\n#P__XO#\n#######", 3, 1.0),  # 3 moves, a budget of 3: solved with no action to spare
    ("################\n#__P___________#\n##############_#\n#OX____________#\n################", 30, 1.0),
    ("################\n#_P____________#\n##############_#\n#OX____________#\n################", 30, 0.0),
])
def test_sokoban_oracle_exact_success_at_the_edges_of_the_budgets(tmp_path, capsys, room, max_steps, success):
    """The oracle's exact success on Sokoban is 1 iff the optimal solution fits both budgets, each
    inclusive: the env's max_steps (3 moves for 3 steps) and MAX_TURNS x MAX_ACTIONS_PER_TURN = 25
    (the corridors need 25 and 26 moves); the played pass@1 agrees."""
    assert agent.MAX_TURNS * agent.MAX_ACTIONS_PER_TURN == 25
    rows, _ = run(tmp_path, capsys, "--env", "sokoban", "--policy", "oracle", "--puzzles", "1", "--samples", "1",
                  "--k", "1", "--env-overrides", json.dumps({"room": room, "max_steps": max_steps}))
    (r,) = rows
    assert r["exact_success"] == r["pass@1"] == success


def test_diff_reports_the_paired_difference_of_two_rows(tmp_path, capsys):
    out = tmp_path / "out"
    rows = ev.main(["--env", "frozenlake", "--policy", "random", "--policy", "oracle", "--puzzles", "16",
                    "--samples", "4", "--k", "4", "--diff", "oracle", "random", "--out", str(out)])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (d,) = last["differences"]
    assert last["rows"] == rows and json.load(open(out / "report.json"))["differences"] == [d]
    assert (d["a"], d["b"], d["env"], d["puzzles"]) == ("oracle", "random", "frozenlake", 16)
    assert d["pass@1_diff"] == pytest.approx(row(rows, "oracle")["pass@1"] - row(rows, "random")["pass@1"], abs=1e-3)
    # recomputed from the episodes the run kept, with the bootstrap seeded by --seed (0)
    successes = {}
    for line in open(out / "episodes.jsonl"):
        e = json.loads(line)
        successes.setdefault(e["name"], {}).setdefault(e["seed"], []).append(e["success"])
    assert ev.paired_difference(successes["oracle"], successes["random"], np.random.default_rng(0)) == \
        {k: v for k, v in d.items() if k not in ("a", "b", "env")}
    lo, hi = d["ci_puzzles"]
    assert f"| frozenlake | oracle − random | {d['pass@1_diff']:.3f} | [{lo:.3f}, {hi:.3f}] |" in \
        open(out / "report.md").read()


# -----------------------------------------------------------------------------
# World-model accuracy

def wm_response(observation, prediction, answer):
    return (f"<observation>{observation}</observation>ok<prediction>{prediction}</prediction></think>"
            f"<answer>{answer}</answer>")


def test_world_model_accuracy_definitions(tiny):
    _, tokenizer = tiny
    room = "######\n#P_XO#\n#____#\n######"
    env = envs.make("sokoban", room=room)
    env.reset(0)
    start = env.render("coords")
    env.step("Down")
    after_down = env.render("grid")
    responses = [wm_response(start, after_down, "Down"),  # both right
                 wm_response("wrong", after_down, "Up"),  # both wrong: it went back Up, to the start
                 wm_response(start, room, "Jump"),  # both right: format valid, the env rejects Jump
                 wm_response(start, room, "")]  # right observation; no action: invalid, its prediction scores 0
    policy = agent.text_policy(tokenizer, lambda ep: responses[len(ep.turns)])
    (ep,) = agent.rollout(policy, tokenizer, "sokoban", [0], 1, mode="worldmodel", instruction="short",
                          env_overrides={"room": room}, max_turns=4)
    assert [t["format_valid"] for t in ep.turns] == [True, True, True, False]
    assert ev.episode_world_model_scores(ep, "worldmodel") == [(1.0, 1.0, 1.0), (0.0, 0.0, 1.0), (1.0, 1.0, 1.0),
                                                       (1.0, 0.0, 1.0)]
    summary = ev.summarize([ep], [1], "worldmodel", seed=0)
    assert summary["wm_turns"] == 4 and summary["format_valid"] == 0.75
    assert summary["observation_exact"] == 0.75 and summary["prediction_exact"] == 0.5
    assert summary["actions"] == 2 and summary["turns"] == 4


def test_frozenlake_prediction_is_scored_by_probability(tiny):
    _, tokenizer = tiny
    desc = ["P__", "___", "__G"]
    env = envs.make("frozenlake", desc=desc)
    env.reset(0)
    intended = "_P_\n___\n__G"  # Right from (0,0): (0,1), (1,0) or stay (off the board up), 1/3 each
    policy = agent.text_policy(tokenizer, lambda ep: wm_response(env.render("coords"), intended, "Right"))
    (ep,) = agent.rollout(policy, tokenizer, "frozenlake", [0], 1, instruction="short", max_turns=1,
                          env_overrides={"desc": desc})
    ((obs, pred, best),) = ev.episode_world_model_scores(ep, "worldmodel")
    assert obs == 1.0 and pred == pytest.approx(1 / 3) and best == pytest.approx(1 / 3)
    # base mode scores only the turns that carry both states
    plain = agent.text_policy(tokenizer, lambda ep: "go</think><answer>Right</answer>")
    (ep,) = agent.rollout(plain, tokenizer, "frozenlake", [0], 1, mode="base", instruction="short", max_turns=1,
                          env_overrides={"desc": desc})
    assert ev.episode_world_model_scores(ep, "base") == []


# -----------------------------------------------------------------------------
# A model next to the reference rows: determinism, files, the last line

def test_model_rows_are_reproducible_and_complete(tmp_path, capsys, tiny_dir):
    argv = ["--all-envs", "--model", tiny_dir, "--puzzles", "2", "--samples", "2", "--k", "2",
            "--max-response-tokens", "8"]
    rows, out = run(tmp_path / "a", capsys, *argv)
    again, out_again = run(tmp_path / "b", capsys, *argv)
    assert rows == again
    for name in ("report.md", "episodes.jsonl"):
        assert (out / name).read_text() == (out_again / name).read_text(), name
    # reference rows come with every model, around it; grouped by env
    assert [(r["env"], r["name"]) for r in rows] == [(e, n) for e in envs.ENVS for n in ("random", tiny_dir, "oracle")]
    for r in rows:
        for key in ("pass@1", "pass@2", "pass@1_ci", "pass@2_ci", "format_valid", "observation_exact",
                    "prediction_exact", "actions", "turns", "score", "exact_success"):
            assert key in r, key
    model = row(rows, tiny_dir, "sokoban")
    # a tiny-preset checkpoint is prompted as it was trained (short instruction); flags override
    assert model["settings"] == {"instruction": "short", "max_response_tokens": 8, "mode": "worldmodel",
                                 "render": "coords"}
    assert model["truncated"] > 0.5 and model["format_valid"] == 0.0  # a fresh model writes junk
    # the reference rows keep a budget their responses fit in, whatever the model's
    assert row(rows, "oracle", "sokoban")["settings"]["max_response_tokens"] == 400
    assert row(rows, "oracle", "sokoban")["pass@1"] == 1.0
    report = json.loads((out / "report.json").read_text())
    assert report["rows"] == rows and report["config"]["model"] == [tiny_dir]
    episodes = [json.loads(line) for line in (out / "episodes.jsonl").read_text().splitlines()]
    assert len(episodes) == 3 * 3 * 2 * 2  # envs x rows x puzzles x samples
    assert {(e["name"], e["env"], e["seed"], e["sample"]) for e in episodes} == {
        (n, e, s, k) for n in ("random", tiny_dir, "oracle") for e in envs.ENVS for s in (123, 124) for k in (0, 1)}
    first = episodes[0]
    assert first["messages"][0]["role"] == "system" and first["turns"][0]["state_before"]
    assert "| random |" in (out / "report.md").read_text()
    # another sampling seed, other episodes (the puzzles stay the same)
    other, _ = run(tmp_path / "c", capsys, *argv[:-2], "--max-response-tokens", "8", "--seed", "1")
    assert [r["name"] for r in other] == [r["name"] for r in rows]
    assert (tmp_path / "c" / "out" / "episodes.jsonl").read_text() != (out / "episodes.jsonl").read_text()


def test_a_run_started_again_plays_only_the_rows_it_lacks(tmp_path, capsys, tiny_dir, monkeypatch):
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    argv = ["--env", "sokoban", "--model", str(model), "--puzzles", "2", "--samples", "2", "--k", "2",
            "--max-response-tokens", "8"]
    rows, out = run(tmp_path / "a", capsys, *argv)
    played = []  # rollout calls that play: one per row here (2 puzzles < --batch-puzzles)
    rollout = agent.rollout

    def counting_rollout(policy, *args, **kwargs):
        if policy is not None:  # without one it only measures the first prompts (ev.first_prompt_tokens)
            played.append(args[1])
        return rollout(policy, *args, **kwargs)
    monkeypatch.setattr(agent, "rollout", counting_rollout)
    append = agent.append_jsonl

    def crash_after_two_rows(path, *rows):  # random and the model done; the oracle's row not yet
        append(path, *rows)
        if path.endswith("played.jsonl") and len(agent.read_jsonl(path)) == 2:
            with open(path, "a") as f:
                f.write('{"key": {"na')  # and a line half written
            raise KeyboardInterrupt
    monkeypatch.setattr(agent, "append_jsonl", crash_after_two_rows)
    with pytest.raises(KeyboardInterrupt):
        ev.main([*argv, "--out", str(tmp_path / "b" / "out")])
    monkeypatch.setattr(agent, "append_jsonl", append)
    assert len(played) == 2
    resumed, out_b = run(tmp_path / "b", capsys, *argv)
    assert resumed == rows and len(played) == 3  # only the oracle's row was played
    for name in ("report.md", "episodes.jsonl"):
        assert (out_b / name).read_text() == (out / name).read_text(), name
    # finished: nothing is played again; a checkpoint rewritten in place is
    assert run(tmp_path / "b", capsys, *argv)[0] == rows and len(played) == 3
    stat = os.stat(model / "model.safetensors")
    os.utime(model / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert run(tmp_path / "b", capsys, *argv)[0] == rows and len(played) == 4
    # the model's row with another budget: played again, its old row and episodes gone (the reference
    # rows keep theirs: they depend on the tokenizer and their own settings, not the model's)
    other, _ = run(tmp_path / "b", capsys, *argv[:-1], "12")
    assert len(played) == 5 and row(other, str(model))["settings"]["max_response_tokens"] == 12
    assert len((out_b / "episodes.jsonl").read_text().splitlines()) == 3 * 2 * 2
    assert len((out_b / "played.jsonl").read_text().splitlines()) == 3
    os.remove(out_b / "episodes.jsonl")  # rows whose episodes are gone are played again
    assert run(tmp_path / "b", capsys, *argv[:-1], "12")[0] == other and len(played) == 8


def test_another_command_into_the_same_out_keeps_the_rows_it_does_not_play(tmp_path, capsys, tiny_dir):
    """The README's commands into one --out: a model, then a reference row alone, then the model again.
    The middle command keeps the model's row, so the third plays it no more; each report has its own rows."""
    out = tmp_path / "out"
    flags = ["--env", "sokoban", "--puzzles", "2", "--samples", "2", "--k", "2", "--out", str(out)]
    model = ["--model", tiny_dir, "--max-response-tokens", "8"]

    def evaluate(*argv):  # (rows, {name: reused from played.jsonl?}, report.md)
        rows = ev.main([*argv, *flags])
        err = capsys.readouterr().err
        reused = {r["name"]: f"{r['name']} on sokoban: pass@1 {r['pass@1']:.3f} (played before" in err for r in rows}
        return rows, reused, (out / "report.md").read_text()

    def lines(name):
        return [json.loads(line) for line in (out / name).read_text().splitlines()]

    first, reused, report = evaluate(*model)
    assert reused == {"random": False, tiny_dir: False, "oracle": False}
    episodes = (out / "episodes.jsonl").read_text()
    # the reference row alone: its report holds just that row; the files keep the model's and the oracle's
    rows, _, middle = evaluate("--policy", "random")
    assert [r["name"] for r in rows] == ["random"]
    assert json.loads((out / "report.json").read_text())["rows"] == rows
    assert "| random |" in middle and f"| {tiny_dir} |" not in middle and "| oracle |" not in middle
    # one row per (name, env) in played.jsonl, and its episodes in episodes.jsonl
    assert sorted(line["key"]["name"] for line in lines("played.jsonl")) == sorted(["random", tiny_dir, "oracle"])
    assert collections.Counter(e["name"] for e in lines("episodes.jsonl")) == {"random": 4, tiny_dir: 4, "oracle": 4}
    # the model again: its row is reused, and the whole run is the first one
    again, reused, report_again = evaluate(*model)
    assert reused[tiny_dir] and again == first and report_again == report
    assert (out / "episodes.jsonl").read_text() == episodes
    assert len(lines("played.jsonl")) == 3


def test_too_small_a_context_names_the_smallest_that_fits(tmp_path, capsys, tiny_dir):
    # the model's own turns are small; the reference rows that come with it get 400-token responses
    argv = ["--env", "frozenlake", "--model", tiny_dir, "--max-response-tokens", "8", "--puzzles", "2",
            "--samples", "1", "--k", "1", "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        ev.main([*argv, "--max-context-tokens", "200"])
    message = str(exit_info.value.code)
    assert message.startswith("error: --max-context-tokens 200 is too small: the random and oracle rows, added "
                              "whenever a model is evaluated, need ") and len(message.splitlines()) == 1
    smallest = int(message.split("give --max-context-tokens ")[1].split()[0])
    assert f"need {smallest} tokens for a first turn on frozenlake" in message and smallest > 400
    with pytest.raises(SystemExit, match=f"give --max-context-tokens {smallest} or more"):
        ev.main([*argv, "--max-context-tokens", str(smallest - 1)])
    with pytest.raises(SystemExit, match="or more, or a smaller --max-response-tokens$"):  # above the least
        ev.main(["--env", "frozenlake", "--policy", "random", "--max-response-tokens", "5000",
                 "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    # the value it names: every row plays its first turn on every puzzle
    ev.main([*argv, "--max-context-tokens", str(smallest)])
    episodes = [json.loads(line) for line in (tmp_path / "out" / "episodes.jsonl").read_text().splitlines()]
    assert len(episodes) == 3 * 2 and all(e["turns"] for e in episodes)


# -----------------------------------------------------------------------------
# Bad input: one line, before any work

def test_a_checkpoint_trained_on_another_env_is_played_with_a_warning(tmp_path, tiny_dir, capsys):
    checkpoint = tmp_path / "frozenlake-model"
    shutil.copytree(tiny_dir, checkpoint)
    agent.write_json(str(checkpoint / "run_config.json"), {"env": "frozenlake", "preset": "tiny"})
    for env_name, warned in (("sokoban", True), ("frozenlake", False)):
        ev.checkpoint_settings(str(checkpoint), ev.parse_args(["--env", env_name, "--model", str(checkpoint)]))
        err = capsys.readouterr().err
        assert (f"warning: {checkpoint} was trained on frozenlake; it plays sokoban here" in err) == warned


def test_bad_input_fails_fast_with_one_line(tmp_path, tiny_dir, capsys):
    no_template = tmp_path / "no_template"
    shutil.copytree(tiny_dir, no_template)
    os.remove(no_template / "chat_template.jinja")
    config = json.loads((no_template / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(config))
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_dir, truncated)
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[:-100])
    run = tmp_path / "run"  # a training run's folder: its checkpoint is model/
    shutil.copytree(tiny_dir, run / "model")
    out = tmp_path / "out"
    cases = {
        "invalid choice: 'chess'": ["--env", "chess", "--policy", "random"],
        "truncated or corrupt": ["--env", "sokoban", "--model", tiny_dir, "--model", str(truncated)],
        "or more, or a smaller --max-response-tokens": ["--env", "sokoban", "--model", tiny_dir,
                                                        "--max-response-tokens", "5000"],
        "rows, added whenever a model is evaluated, need": ["--env", "frozenlake", "--model", tiny_dir,
                                                            "--max-context-tokens", "200"],
        "not a torch device": ["--env", "sokoban", "--policy", "random", "--device", "gpu"],
        "--val-seed-start must be >= 0": ["--env", "sokoban", "--policy", "random", "--val-seed-start", "-1"],
        "a seed is a whole number": ["--env", "sokoban", "--policy", "random", "--seed", "-1"],  # the bootstrap's
        "not valid JSON": ["--env", "frozenlake", "--policy", "random", "--env-overrides", "{bad"],
        "a JSON object of settings": ["--env", "frozenlake", "--policy", "random", "--env-overrides", "[1]"],
        "set it with --render": ["--env", "frozenlake", "--policy", "random", "--env-overrides",
                                 '{"render_mode": "grid"}'],
        "slippery must be true or false": ["--env", "frozenlake", "--policy", "random", "--env-overrides",
                                           '{"slippery": "false"}'],
        "must be a finite number": ["--env", "frozenlake", "--policy", "random", "--temperature", "nan"],
        "no checkpoint folder": ["--env", "sokoban", "--model", str(tmp_path / "missing")],
        "chat template": ["--env", "sokoban", "--policy", "random", "--model", str(no_template)],
        "not a Hugging Face checkpoint folder": ["--env", "sokoban", "--model", str(tmp_path)],
        f"is a run folder; did you mean {run}/model?": ["--env", "sokoban", "--model", str(run)],
        "nothing to evaluate": ["--env", "sokoban"],
        "a reference row's name; give the folder as ./random": ["--env", "sokoban", "--model", "random"],
        "--k must be": ["--env", "sokoban", "--policy", "random", "--samples", "4", "--k", "8"],
        "--temperature 0 (greedy) or >= 0.001": ["--env", "sokoban", "--policy", "random", "--temperature", "-1"],
        "or >= 0.001": ["--env", "sokoban", "--policy", "random", "--temperature", "1e-40"],  # overflows float32
        "--max-context-tokens must be >= 1": ["--env", "sokoban", "--policy", "random", "--max-context-tokens", "0"],
        "--env-overrides": ["--env", "frozenlake", "--policy", "random", "--env-overrides", '{"colour": 1}'],
        "not --all-envs": ["--all-envs", "--policy", "random", "--env-overrides", '{"slippery": false}'],
        "is not evaluated here": ["--env", "sokoban", "--policy", "random", "--diff", "random", "oracle"],
    }
    for expected, argv in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            ev.main([*argv, "--out", str(out)])
        # argparse prints its message and exits 2; the checkpoint checks exit with the message
        message = capsys.readouterr().err if exit_info.value.code == 2 else str(exit_info.value.code)
        assert expected in message and len(message.strip().splitlines()) == 1, (expected, message)
    assert not out.exists()  # nothing was written: every check ran before any work
    # fewer samples than the default largest k: k follows them
    assert ev.parse_args(["--env", "sokoban", "--policy", "random", "--samples", "4"]).k == 4
    assert ev.parse_args(["--env", "sokoban", "--policy", "random"]).k == 8
    # as a script: exactly one line on stderr, no traceback
    procs = [subprocess.Popen([sys.executable, "evaluate.py", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
             for argv in (cases["no checkpoint folder"], cases["invalid choice: 'chess'"], ["--help"])]
    (_, missing), (_, chess), (help_text, _) = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [1, 2, 0]
    assert missing.strip() == f"error: no checkpoint folder {str(tmp_path / 'missing')!r}"
    assert len(chess.strip().splitlines()) == 1 and "Traceback" not in chess
    assert "--policy" in help_text and "pass@k" in help_text
