"""
How fast the environments are (SPEC §9): puzzle generation per env, env steps with random
actions, and the spread of Sokoban difficulty.

    python benchmarks/bench_envs.py

Targets (issue 2): >= 200 Sokoban puzzles/s and >= 100,000 steps/s on one core, so that puzzle
generation and stepping never bottleneck a 256-episode rollout. Everything here is pure Python on
one thread. Progress goes to stderr; the last stdout line is one JSON object.
"""
import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import envs  # noqa: E402

PUZZLES = {"sokoban": 2000, "frozenlake": 5000, "sudoku": 5000}
STEPS_PER_ENV = 200_000
FIRST_SEED = 1_000_000  # seeds no other part of this process has generated (generation is memoised)


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def puzzles_per_s(name, n):
    env = envs.make(name)
    start = time.perf_counter()
    for seed in range(FIRST_SEED, FIRST_SEED + n):
        env.reset(seed)
    return n / (time.perf_counter() - start)


def random_action(name, rng):
    if name == "sudoku":
        return f"{rng.randint(1, 4)},{rng.randint(1, 4)},{rng.randint(1, 4)}"
    return rng.choice(envs.Sokoban.ACTIONS if name == "sokoban" else envs.FrozenLake.ACTIONS)


def steps_per_s(name, n_steps, n_seeds=256):
    """Random actions through step(); a finished episode resets to the next of n_seeds puzzles
    (generated before the clock starts, as a rollout's first reset of a seed would have)."""
    env = envs.make(name)
    rng = random.Random(0)
    seeds = range(FIRST_SEED, FIRST_SEED + n_seeds)
    for seed in seeds:
        env.reset(seed)
    actions = [random_action(name, rng) for _ in range(n_steps)]
    env.reset(seeds[0])
    episodes = 1
    start = time.perf_counter()
    for action in actions:
        if env.step(action)[2]:
            env.reset(seeds[episodes % n_seeds])
            episodes += 1
    return n_steps / (time.perf_counter() - start)


def main():
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    results = {}
    for name, n in PUZZLES.items():
        results[f"{name}_puzzles_per_s"] = round(puzzles_per_s(name, n), 1)
        log(f"{name}: {results[f'{name}_puzzles_per_s']} puzzles/s over {n} fresh seeds")

    per_env = {}
    for name in envs.ENVS:
        per_env[name] = round(steps_per_s(name, STEPS_PER_ENV))
        log(f"{name}: {per_env[name]} random steps/s")
    # all envs together: the same number of steps in each, so the harmonic mean
    results["steps_per_s"] = round(len(per_env) / sum(1 / v for v in per_env.values()))
    results["steps_per_s_by_env"] = per_env

    env = envs.make("sokoban")
    hist = {str(k): 0 for k in range(1, env.max_steps + 1)}
    for seed in range(FIRST_SEED, FIRST_SEED + PUZZLES["sokoban"]):
        env.reset(seed)  # memoised from above
        hist[str(len(env.solve()))] += 1
    results["sokoban_optimal_len_hist"] = hist
    log(f"sokoban optimal solution lengths 1..{env.max_steps}: {list(hist.values())}")

    env = envs.make("frozenlake")
    start = time.perf_counter()
    success = []
    for seed in range(FIRST_SEED, FIRST_SEED + 200):
        env.reset(seed)
        success.append(env.oracle())
    results["frozenlake_oracle_ms"] = round((time.perf_counter() - start) / 200 * 1000, 2)
    results["frozenlake_oracle_turn_success_mean"] = round(
        sum(s["turn_success"] for s in success) / len(success), 4)
    results["frozenlake_oracle_closed_loop_success_mean"] = round(
        sum(s["closed_loop_success"] for s in success) / len(success), 4)
    log(f"frozenlake oracle: {results['frozenlake_oracle_ms']} ms/map, mean success "
        f"{results['frozenlake_oracle_turn_success_mean']} (turns) / "
        f"{results['frozenlake_oracle_closed_loop_success_mean']} (closed loop)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
