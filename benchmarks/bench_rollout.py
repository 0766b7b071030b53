"""
A full multi-turn rollout with the tiny preset on CPU: 32 puzzles x 8 samples, world-model mode,
coordinate rendering, sampling at temperature 1 -- the shape of one PPO step's rollout (SPEC §5).

    python benchmarks/bench_rollout.py                    # FrozenLake
    python benchmarks/bench_rollout.py --env sokoban

JSON figures:
  episodes_per_s, generated_tokens_per_s -- of the rollout with the (fresh) tiny model
  outside_model_share -- share of the rollout's wall time spent outside model forward passes:
                         prompts, tokenisation, parsing, env steps, sampling bookkeeping (target < 0.2)
  tokens_per_turn     -- mean prompt + response tokens added per turn when responses follow the
                         world-model format (the random-action policy writing true states): what the
                         format costs with the tiny tokenizer (target <= 150). A fresh model's
                         responses are noise that runs to the token budget, so its own figure,
                         tokens_per_turn_fresh_model, measures the budget, not the format.
Progress goes to stderr; the last stdout line is one JSON object.
"""
import argparse
import json
import os
import random
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import agent  # noqa: E402
import envs  # noqa: E402


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def tokens_per_turn(episodes):
    return sum(len(ep.tokens) for ep in episodes) / sum(len(ep.turns) for ep in episodes)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="frozenlake", choices=envs.ENVS, help="environment")
    parser.add_argument("--env-groups", type=int, default=32, help="distinct puzzles")
    parser.add_argument("--group-size", type=int, default=8, help="samples per puzzle")
    parser.add_argument("--max-response-tokens", type=int, default=agent.TINY_MAX_RESPONSE_TOKENS,
                        help="token budget per turn of the timed model rollout (the scripted rollouts of "
                             "the per-env tokens_per_turn_* figures use 400)")
    parser.add_argument("--seed", type=agent.seed_int, default=0, help="sampling seed")
    args = agent.help_with_defaults(parser).parse_args()
    torch.manual_seed(args.seed)
    seeds = list(range(10_000, 10_000 + args.env_groups))  # the first training seeds (SPEC §3)
    settings = dict(mode="worldmodel", render="coords", instruction="short",
                    max_response_tokens=args.max_response_tokens)

    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer = agent.load_model(agent.build_tiny_model(os.path.join(tmp, "tiny")), device="cpu")

    forward_s = []
    policy = agent.model_policy(model, tokenizer, temperature=1.0, generator=torch.Generator().manual_seed(args.seed),
                                on_forward=forward_s.append)
    log(f"{args.env}: {args.env_groups} x {args.group_size} episodes with the fresh tiny model ...")
    start = time.perf_counter()
    episodes = agent.rollout(policy, tokenizer, args.env, seeds, args.group_size, **settings)
    wall = time.perf_counter() - start
    generated = sum(sum(ep.assistant_mask) for ep in episodes)
    results = {
        "env": args.env,
        "episodes": len(episodes),
        "episodes_per_s": round(len(episodes) / wall, 2),
        "generated_tokens_per_s": round(generated / wall, 1),
        "outside_model_share": round(1 - sum(forward_s) / wall, 3),
        "rollout_s": round(wall, 2),
        "forward_passes": len(forward_s),
        "turns_mean": round(sum(len(ep.turns) for ep in episodes) / len(episodes), 2),
        "tokens_per_turn_fresh_model": round(tokens_per_turn(episodes), 1),
    }
    log(json.dumps(results))

    for name in envs.ENVS:  # what the format costs, per env
        start = time.perf_counter()
        scripted = agent.rollout(agent.random_policy(tokenizer, random.Random(args.seed), "worldmodel"), tokenizer,
                                 name, seeds, args.group_size,
                                 **{**settings, "max_response_tokens": agent.MAX_RESPONSE_TOKENS})
        results[f"tokens_per_turn_{name}"] = round(tokens_per_turn(scripted), 1)
        log(f"{name}: {results[f'tokens_per_turn_{name}']} tokens per turn in the world-model format "
            f"({time.perf_counter() - start:.1f} s for {len(scripted)} scripted episodes)")
    results["tokens_per_turn"] = results[f"tokens_per_turn_{args.env}"]
    print(json.dumps(results))


if __name__ == "__main__":
    main()
