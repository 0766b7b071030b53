"""
Stage 3 of SPA: evaluation (SPEC §6) -- Pass@k, format, world-model accuracy, side by side.

Every checkpoint plays the same validation puzzles (seeds 123, 124, ...) --samples times each at
temperature 1, and is reported next to two reference rows computed from the environments
themselves, so a report always shows where a model sits between chance and perfect:
  random -- the random-action policy of self-play (agent.random_policy)
  oracle -- the optimal policy: Sokoban's BFS plan and Sudoku's solution, replanned every turn;
            on FrozenLake the turn-structured optimum (env.oracle_actions), which sees the state
            only between turns, like the model
Both are played through the same rollout, prompts and parser as a model.

    python evaluate.py --env frozenlake --model runs/sft-frozenlake/model --model runs/rl-frozenlake/model
    python evaluate.py --all-envs --policy random --policy oracle           # reference rows only, no model
    python evaluate.py --env sokoban --model Qwen/Qwen2.5-1.5B-Instruct --mode base --render grid
    python evaluate.py --env frozenlake --model runs/a/model --model runs/b/model --diff runs/a/model runs/b/model

Outputs in --out: report.md (one table per env) and report.json (every number and the resolved
config), both of this command's rows only; played.jsonl (each finished row with what it depends
on, one per policy and env: run again into the same --out, after a crash or with more models, only
the rows not found there are played, and rows of other commands into it stay) and episodes.jsonl
(every episode of those rows: messages, per-turn states, actions, rewards). The last line printed
is {"rows": [...]} with one row per policy and env (and "differences": [...] with --diff).

Definitions:
- pass@k: the unbiased estimator 1 - C(n-c, k) / C(n, k) on each puzzle's n samples with c
  successes, averaged over puzzles (pass@1 is the mean success). pass@k_ci: a 95% percentile
  bootstrap interval [lo, hi] over puzzles (1000 resamples, seeded by --seed).
- format_valid: share of played turns that follow the mode's format. actions / turns / score:
  per episode, means (actions = actions the env executed). truncated: share of turns that hit
  the token budget before stopping.
- observation_exact: the <observation> equals the true state before the turn (coordinates
  rendering, the representation SFT teaches whatever --render shows). prediction_exact: the
  probability that the state after the turn's own actions equals the <prediction> (grid) under
  the exact model -- 0 or 1 on Sokoban and Sudoku; on slippery FrozenLake no predictor is always
  right, so prediction_bayes gives the best possible predictor's score on the same turns.
  prediction_exact is 0 on a turn whose format is invalid (its actions did not run); the
  observation is scored wherever the turn wrote one. Scored over every turn in world-model mode,
  and over the turns that carry both spans in base mode (wm_turns says how many); null when
  there are none.
  SFT's held-out accuracy is the same (agent.world_model_scores). The reference policies write the true current
  state as their observation; random predicts "nothing changes", the oracle the most likely state.
- exact_success: the exact success probability, averaged over the puzzles, where the env can
  compute it: FrozenLake's random and oracle rows by dynamic programming on the transition model
  (env.random_success, env.oracle), the oracle on Sokoban and Sudoku (1.0: every puzzle's optimal
  solution fits the budget).
- --diff A B: pass@1 of A minus B on the same puzzles, with two 95% bootstrap intervals
  (paired_difference): over puzzles (would it hold on other puzzles like these?) and over each
  puzzle's samples with the puzzles fixed (is it more than sampling noise on these puzzles?).

Beyond the paper's Pass@k (SPEC §6), and why: the reference rows and the bootstrap intervals make
a number readable on its own (is 0.3 good? is 0.3 vs 0.35 a difference?); world-model accuracy
is measured on the model's own rollouts, the states it meets when it plays.

Things to know when reading a report:
- FrozenLake's slips are a function of the puzzle seed and the actions, so a deterministic policy
  plays all samples of a puzzle alike: the oracle's pass@k equals its pass@1 there.
- Prompt settings default to what the checkpoint was trained with (its run_config.json:
  instruction, max_response_tokens, mode, render; tiny-preset checkpoints: short instruction and
  agent.TINY_MAX_RESPONSE_TOKENS), else SPA's world-model prompt at paper scale (full, 400,
  worldmodel, coords; paper-preset PPO plays base mode: pass --mode base to compare with it);
  flags override.
  Reference rows use the first model's settings and tokenizer (without a model: the flags, and the
  tiny preset's tokenizer, trained in memory in about two seconds), with a token budget of at least
  400 so that their responses are never cut; their outcomes depend on none of these.
"""
import argparse
import collections
import functools
import hashlib
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

import agent
import envs

KS = (1, 2, 4, 8, 16, 32, 64)  # pass@k is reported for these k up to --k
REFERENCE_POLICIES = ("random", "oracle")
PAPER_SETTINGS = {"instruction": "full", "max_response_tokens": agent.MAX_RESPONSE_TOKENS, "mode": "worldmodel",
                  "render": "coords"}
TINY_SETTINGS = {"instruction": "short", "max_response_tokens": agent.TINY_MAX_RESPONSE_TOKENS,
                 "mode": "worldmodel", "render": "coords"}


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the whole usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv=None):
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # what to evaluate
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--env", choices=envs.ENVS, help="environment")
    where.add_argument("--all-envs", action="store_true", help="evaluate on all three environments")
    parser.add_argument("--model", action="append", default=[], help="checkpoint folder or HF id (repeatable)")
    parser.add_argument("--policy", action="append", default=[], choices=REFERENCE_POLICIES,
                        help="reference policy to report (repeatable); both are added whenever a model is evaluated")
    parser.add_argument("--out", default="runs/eval",
                        help="folder for report.md, report.json, episodes.jsonl, played.jsonl (rows played before "
                             "there are reused)")
    # the puzzles
    parser.add_argument("--puzzles", type=int, default=128, help="validation puzzles per env")
    parser.add_argument("--samples", type=int, default=8, help="episodes per puzzle (n of pass@k)")
    parser.add_argument("--k", type=int, help="largest k of pass@k (1, 2, 4, ... up to it; default: "
                                              "--samples, at most 8)")
    parser.add_argument("--val-seed-start", type=int, default=123,
                        help="first validation puzzle seed (as rl.py's validation)")
    parser.add_argument("--env-overrides", type=agent.json_object, default={},
                        help='JSON of envs.make overrides, e.g. \'{"slippery": false}\' (as in rl.py)')
    # prompts and sampling (unset: the checkpoint's run_config.json, else the paper's settings)
    checkpoints = "(default: the checkpoint's, from its run_config.json, else the paper preset's)"
    parser.add_argument("--mode", choices=agent.MODES, help=f"prompt format: worldmodel or base {checkpoints}")
    parser.add_argument("--render", choices=envs.RENDER_MODES,
                        help=f"state shown in the prompt: coords or grid {checkpoints}")
    parser.add_argument("--instruction", choices=tuple(agent.INSTRUCTIONS),
                        help=f"wording of the env instruction {checkpoints}")
    parser.add_argument("--max-response-tokens", type=int, help=f"token budget per turn {checkpoints}")
    parser.add_argument("--max-context-tokens", type=int, default=agent.MAX_CONTEXT_TOKENS,
                        help="token budget per conversation")
    parser.add_argument("--temperature", type=agent.finite_float, default=1.0, help="sampling temperature (0: greedy)")
    parser.add_argument("--seed", type=agent.seed_int, default=0, help="sampling seed; also the bootstrap's")
    parser.add_argument("--batch-puzzles", type=int, default=32,
                        help="puzzles per rollout batch (x samples episodes decode together; memory)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--diff", nargs=2, action="append", default=[], metavar=("A", "B"),
                        help="also report pass@1 of A minus B on the same puzzles, with paired intervals; A and B "
                             "as given to --model, or random / oracle (repeatable)")
    args = agent.help_with_defaults(parser).parse_args(argv)
    if args.puzzles < 1 or args.samples < 1 or args.batch_puzzles < 1:
        parser.error("--puzzles, --samples and --batch-puzzles must be >= 1")
    args.k = min(args.samples, 8) if args.k is None else args.k
    if not 1 <= args.k <= args.samples:
        parser.error(f"--k must be in 1..--samples ({args.samples}): pass@k needs k <= n samples")
    if args.max_response_tokens is not None and args.max_response_tokens < 1:
        parser.error("--max-response-tokens must be >= 1")
    if args.max_context_tokens < 1 or not (args.temperature == 0 or args.temperature >= agent.MIN_TEMPERATURE):
        parser.error(f"--max-context-tokens must be >= 1 and --temperature 0 (greedy) or >= {agent.MIN_TEMPERATURE}")
    if args.val_seed_start < 0:
        parser.error("--val-seed-start must be >= 0 (puzzle seeds)")
    if args.device is not None:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            parser.error(f"--device {args.device}: not a torch device (cpu, cuda, cuda:1, ...)")
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error(f"--device {args.device}: torch sees no CUDA device here")
    if not args.model and not args.policy:
        parser.error("nothing to evaluate: give --model PATH and/or --policy random|oracle")
    if args.env_overrides and args.all_envs:
        parser.error("--env-overrides applies to one env: give --env, not --all-envs")
    if args.env_overrides and (problem := agent.env_overrides_problem(args.env, args.env_overrides)):
        parser.error(problem)
    args.model = list(dict.fromkeys(args.model))  # each checkpoint once
    if clash := [m for m in args.model if m in REFERENCE_POLICIES]:
        parser.error(f"--model {clash[0]}: that is a reference row's name; give the folder as ./{clash[0]}")
    names = args.model + reference_policies(args)
    for pair in args.diff:
        if unknown := [name for name in pair if name not in names]:
            parser.error(f"--diff {' '.join(pair)}: {unknown[0]!r} is not evaluated here (one of: {', '.join(names)})")
    return args


# -----------------------------------------------------------------------------
# Pass@k and its confidence interval

def pass_at_k(n, c, k):
    """Unbiased estimate of P(at least one of k samples succeeds) from n samples with c successes:
    1 - C(n-c, k) / C(n, k), the chance that a random k-subset of the n holds a success."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def bootstrap_ci(per_puzzle, rng, resamples=1000, level=0.95):
    """[lo, hi] percentile interval of the mean over puzzles, resampling puzzles with replacement."""
    values = np.asarray(per_puzzle, dtype=float)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)  # (resamples,)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return [round(float(lo), 4), round(float(hi), 4)]


def reference_policies(args):
    """The reference rows played: those asked for with --policy, both whenever a model is evaluated."""
    return [p for p in REFERENCE_POLICIES if args.model or p in args.policy]


def paired_difference(successes_a, successes_b, rng, resamples=1000, level=0.95):
    """pass@1 of A minus pass@1 of B, both played on the same puzzles ({seed: [success, ...]}),
    and two 95% percentile bootstrap intervals that answer different questions:
      ci_puzzles -- resampling puzzles (the same draw for A and B): would the difference hold on
                    other puzzles like these? The interval for a claim about the env.
      ci_samples -- resampling each puzzle's samples, the puzzles fixed: is the difference more
                    than sampling noise on these puzzles? The interval for a claim about this set
                    (say, the maps a policy was trained on). A puzzle's n resampled successes out
                    of c in n are Binomial(n, c/n), so they are drawn as that."""
    if sorted(successes_a) != sorted(successes_b):
        raise ValueError("a paired difference needs the same puzzles on both sides")
    seeds = sorted(successes_a)
    n_a, n_b = (np.array([len(side[s]) for s in seeds]) for side in (successes_a, successes_b))
    p_a, p_b = (np.array([np.mean(side[s]) for s in seeds]) for side in (successes_a, successes_b))
    per_puzzle = p_a - p_b  # (puzzles,)
    over_puzzles = per_puzzle[rng.integers(0, len(seeds), size=(resamples, len(seeds)))].mean(axis=1)
    within = (rng.binomial(n_a, p_a, size=(resamples, len(seeds))) / n_a
              - rng.binomial(n_b, p_b, size=(resamples, len(seeds))) / n_b).mean(axis=1)
    quantiles = [(1 - level) / 2, (1 + level) / 2]
    return {"pass@1_diff": round(float(per_puzzle.mean()), 4), "puzzles": len(seeds),
            "ci_puzzles": [round(float(q), 4) for q in np.quantile(over_puzzles, quantiles)],
            "ci_samples": [round(float(q), 4) for q in np.quantile(within, quantiles)]}


# -----------------------------------------------------------------------------
# Reference policies and their exact values

def random_plan_lengths(continue_p=agent.RANDOM_PLAN_CONTINUE, max_actions=agent.MAX_ACTIONS_PER_TURN):
    """P(the random policy plans L actions in a turn), L = 1..max_actions, as agent.random_actions
    draws it: one more action with probability continue_p, up to the cap."""
    return [(1 - continue_p) * continue_p ** (L - 1) for L in range(1, max_actions)] + [continue_p ** (max_actions - 1)]


def exact_success(env_name, policy, seeds, env_overrides=None):
    """Mean exact success probability of a reference policy over the puzzles; None where unknown."""
    values = []
    for seed in seeds:
        env = envs.make(env_name, **(env_overrides or {}))
        env.reset(seed)
        if env_name == "frozenlake" and policy == "random":
            values.append(env.random_success(random_plan_lengths(), max_turns=agent.MAX_TURNS))
        elif env_name == "frozenlake":
            values.append(env.oracle(max_turns=agent.MAX_TURNS,
                                     max_actions_per_turn=agent.MAX_ACTIONS_PER_TURN)["turn_success"])
        elif policy == "oracle":  # deterministic: success iff the optimal solution fits both budgets
            n = len(env.solve())
            values.append(float(n <= env.max_steps and n <= agent.MAX_TURNS * agent.MAX_ACTIONS_PER_TURN))
        else:
            return None
    return round(float(np.mean(values)), 4)


# -----------------------------------------------------------------------------
# One row: per-puzzle successes -> pass@k; per-turn records -> format and world-model accuracy

def episode_world_model_scores(ep, mode):
    """(observation_exact, prediction_exact, prediction_bayes) per scored turn of an episode:
    every turn in world-model mode, the turns with both state spans in base mode. The env is
    replayed from its seed to each turn's start (same seed and actions give the same slips)."""
    env = envs.make(ep.env_name, **ep.env_overrides)
    env.reset(ep.seed)
    scores = []
    for turn in ep.turns:
        if env.render("coords") != turn["coords_before"]:
            raise RuntimeError(f"{ep.env_name} seed {ep.seed}: replaying the episode did not reach turn {turn['turn']}")
        if mode == "worldmodel" or (turn["observation"] is not None and turn["prediction"] is not None):
            scores.append(agent.world_model_scores(env, turn, turn["coords_before"]))
        for action in turn["executed"]:
            env.step(action)
    return scores


def mean(values):
    return round(float(np.mean(values)), 4) if len(values) else None


def summarize(episodes, ks, mode, seed):
    """The numbers of one row from its episodes (all samples of every puzzle)."""
    by_puzzle = {}
    for ep in episodes:
        by_puzzle.setdefault(ep.seed, []).append(ep.success)
    n = {len(v) for v in by_puzzle.values()}
    assert len(n) == 1, "every puzzle needs the same number of samples"
    n = n.pop()
    turns = [t for ep in episodes for t in ep.turns]
    row = {"puzzles": len(by_puzzle), "samples": n}
    for k in ks:
        per_puzzle = [pass_at_k(n, sum(v), k) for v in by_puzzle.values()]
        row[f"pass@{k}"] = round(float(np.mean(per_puzzle)), 4)
        row[f"pass@{k}_ci"] = bootstrap_ci(per_puzzle, np.random.default_rng(seed))  # same resamples for every k
    row.update(format_valid=mean([t["format_valid"] for t in turns]),
               actions=mean([sum(len(t["executed"]) for t in ep.turns) for ep in episodes]),
               turns=mean([len(ep.turns) for ep in episodes]),
               score=mean([ep.score for ep in episodes]),
               truncated=mean([not t["stopped"] for t in turns]),
               response_tokens=mean([sum(ep.assistant_mask) / max(1, len(ep.turns)) for ep in episodes]))
    wm = [s for ep in episodes for s in episode_world_model_scores(ep, mode)]
    row.update(observation_exact=mean([s[0] for s in wm]), prediction_exact=mean([s[1] for s in wm]),
               prediction_bayes=mean([s[2] for s in wm]), wm_turns=len(wm))
    return row


def episode_record(name, ep):
    """What episodes.jsonl keeps of an episode: the chat as text and every turn's record."""
    return {"name": name, "env": ep.env_name, "seed": ep.seed, "sample": ep.sample, "success": ep.success,
            "score": round(ep.score, 4), "end_reason": ep.end_reason, "messages": ep.messages, "turns": ep.turns}


# -----------------------------------------------------------------------------
# Settings, checkpoints, the report

def safetensors_problem(file):
    """What is wrong with a .safetensors file, from its header alone (None: it is whole). The
    format: 8 bytes of header length n, n bytes of JSON giving each tensor's byte range, the data."""
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 0 < n <= size - 8:
            return f"truncated ({size} bytes, not even its header)"
        try:
            header = json.loads(f.read(n))
            end = 8 + n + max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "not a safetensors file (its header is not one)"
    return None if end == size else f"{size} bytes where its header promises {end}: truncated or corrupt"


def checkpoint_settings(path, args):
    """(tokenizer, prompt settings) of a checkpoint; the settings are the flags, else its
    run_config.json, else the defaults of its preset. Fails with one line on a missing checkpoint
    or one whose tokenizer has no chat template, before anything is played."""
    parent = os.path.dirname(path.rstrip("/"))
    if not os.path.isdir(path) and (path.startswith((".", "/", "~")) or path.count("/") > 1 or
                                    (parent and os.path.isdir(parent))):
        # not a Hub id ("org/name"): say so now rather than after the Hub's network retries
        raise SystemExit(f"error: no checkpoint folder {path!r}")
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):  # a run folder: "did you mean"
        raise SystemExit("error: " + agent.load_failure(path, "checkpoint", "not a Hugging Face checkpoint folder "
                                                                          "(no config.json)"))
    if os.path.isdir(path):  # a truncated weights file fails now, not when its turn comes
        weights = sorted(name for name in os.listdir(path) if name.endswith(".safetensors"))
        if not weights and not any(name.endswith(".bin") for name in os.listdir(path)):
            raise SystemExit(f"error: {path!r} holds no weights (no *.safetensors)")
        for name in weights:
            if problem := safetensors_problem(os.path.join(path, name)):
                raise SystemExit(f"error: {path}/{name}: {problem}")
    try:
        tokenizer = agent.load_tokenizer(path)
    except agent.ModelLoadError as e:
        raise SystemExit(f"error: {e}") from None
    run_config = {}
    if os.path.isfile(os.path.join(path, "run_config.json")):
        try:
            with open(os.path.join(path, "run_config.json")) as f:
                run_config = json.load(f)
        except ValueError as e:
            raise SystemExit(f"error: {path}/run_config.json is not valid JSON ({e})") from None
    trained_on = run_config.get("env")
    if trained_on in envs.ENVS and not args.all_envs and trained_on != args.env:  # allowed: a transfer test
        print(f"warning: {path} was trained on {trained_on}; it plays {args.env} here", file=sys.stderr, flush=True)
    valid = {"instruction": agent.INSTRUCTIONS, "mode": agent.MODES, "render": envs.RENDER_MODES}
    settings = dict(TINY_SETTINGS if run_config.get("preset") == "tiny" else PAPER_SETTINGS)
    for key in settings:
        saved = run_config.get(key)
        if saved in valid.get(key, ()) or (key == "max_response_tokens" and isinstance(saved, int) and saved > 0):
            settings[key] = saved
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    return tokenizer, settings


def first_prompt_tokens(tokenizer, settings, env_name, seeds, env_overrides):
    """Tokens in the longest first prompt over the puzzles, as agent.rollout builds it."""
    # with no room for a response, rollout builds every first prompt and ends each episode there,
    # before it asks the policy for anything (hence no policy)
    episodes = agent.rollout(None, tokenizer, env_name, seeds, 1, mode=settings["mode"], render=settings["render"],
                             instruction=settings["instruction"], max_response_tokens=settings["max_response_tokens"],
                             max_context_tokens=0, env_overrides=env_overrides)
    return max(len(ep.tokens) for ep in episodes)


def checkpoint_fingerprint(path):
    """What stands for a checkpoint's contents when a finished row is reused: its folder's files
    with their sizes and modification times (retrained in place, it is played again); a Hub id or
    None as it is."""
    if path is None or not os.path.isdir(path):
        return path
    files = sorted(name for name in os.listdir(path) if os.path.isfile(os.path.join(path, name)))
    return [[name, (stat := os.stat(os.path.join(path, name))).st_size, stat.st_mtime_ns] for name in files]


def tokenizer_fingerprint(tokenizer):
    """What stands for a tokenizer (its vocabulary and chat template) in a reference row's key: the
    reference rows play through the first model's tokenizer, whatever its weights."""
    text = json.dumps(sorted(tokenizer.get_vocab().items())) + str(tokenizer.chat_template)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


ROW_FLAGS = ("puzzles", "samples", "k", "val_seed_start", "env_overrides", "max_context_tokens", "temperature", "seed",
             "batch_puzzles")  # the flags a row's numbers depend on (besides its policy, env and prompt settings)


@functools.lru_cache(maxsize=1)
def code_fingerprint():
    """The code a row is played with: this file, the agent loop and the envs (prompts, rules and
    metrics change with them), and the libraries' versions."""
    import transformers
    root = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256(f"{torch.__version__} {transformers.__version__}".encode())
    for name in ("evaluate.py", "agent.py", "envs.py"):
        with open(os.path.join(root, name), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def row_key(args, device, name, env_name, settings, checkpoint):
    """Everything a row's numbers depend on: a row played with the same key is the same row."""
    return {"name": name, "env": env_name, "settings": settings, "checkpoint": checkpoint, "device": device.type,
            "code": code_fingerprint(), **{flag: getattr(args, flag) for flag in ROW_FLAGS}}


def earlier_rows(out, keys):
    """The rows this run can take from earlier runs in `out`, {(name, env): (row, successes)}: the
    pairs in `keys` that an earlier run finished with the same key and all their episodes.

    played.jsonl holds at most one row per (name, env), and episodes.jsonl the episodes of those
    rows (a row's episodes are the ones with its name and env). Both files are rewritten here to
    keep every complete row of the pairs this run does not play (another command's models or envs
    into the same --out) and the reused ones; dropped, with their episodes, are the rows of pairs
    this run plays whose key differs (a checkpoint retrained in place, other settings), rows
    missing episodes, and episodes left without a row by a crash. The run then appends a row only
    for a pair that has none left, so there is still at most one per (name, env)."""
    played_path, episodes_path = os.path.join(out, "played.jsonl"), os.path.join(out, "episodes.jsonl")
    wanted = {name_env: json.dumps(key, sort_keys=True) for name_env, key in keys.items()}
    played, episodes = agent.read_jsonl(played_path), agent.read_jsonl(episodes_path)
    count = collections.Counter((episode.get("name"), episode.get("env")) for episode in episodes)
    kept = {}  # (name, env) -> its line in played.jsonl
    for line in played:
        key = line.get("key", {})
        name_env = key.get("name"), key.get("env")
        complete = count[name_env] == key.get("puzzles", 0) * key.get("samples", 0)
        # a pair this run does not play keeps its row; a pair it plays, only under the same key
        if complete and (name_env not in wanted or wanted[name_env] == json.dumps(key, sort_keys=True)):
            kept[name_env] = line
    agent.write_jsonl(played_path, list(kept.values()))
    agent.write_jsonl(episodes_path, [episode for episode in episodes if (episode.get("name"), episode.get("env"))
                                      in kept])
    return {name_env: (line["row"], {int(seed): samples for seed, samples in line["successes"].items()})
            for name_env, line in kept.items() if name_env in keys}


LEGEND = ("pass@k: unbiased estimator over each puzzle's samples, averaged over puzzles; CI: 95% bootstrap over "
          "puzzles. exact: exact success probability. format valid: share of turns. actions, turns, score: per "
          "episode. obs./pred. exact: world-model accuracy (the best possible predictor's in brackets). Prompts:")


def fmt(value):
    return "–" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def differences_markdown(differences):
    """The --diff pairs as a table (lines): A − B, the difference and its two intervals."""
    lines = ["Paired differences of pass@1 (A − B on the same puzzles; 95% bootstrap intervals over puzzles, "
             "and over samples with the puzzles fixed):", "",
             "| env | A − B | difference | CI over puzzles | CI over samples |", "|---|---|---|---|---|"]
    for d in differences:
        (lo, hi), (s_lo, s_hi) = d["ci_puzzles"], d["ci_samples"]
        lines.append(f"| {d['env']} | {d['a']} − {d['b']} | {d['pass@1_diff']:.3f} | [{lo:.3f}, {hi:.3f}] | "
                     f"[{s_lo:.3f}, {s_hi:.3f}] |")
    return lines


def markdown(rows, env_names, ks, args, differences=()):
    """One table per env: the reference rows around the models; then the --diff pairs."""
    columns = ["pass@1 [95% CI]"] + [f"pass@{k}" for k in ks[1:]] + [
        "exact", "format valid", "actions", "turns", "score", "obs. exact", "pred. exact (best)"]
    lines = []
    for env_name in env_names:
        seeds = f"seeds {args.val_seed_start}–{args.val_seed_start + args.puzzles - 1}"
        lines += [f"### {env_name} ({args.puzzles} puzzles × {args.samples} samples, {seeds})", "",
                  "| policy | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        for r in (r for r in rows if r["env"] == env_name):
            lo, hi = r["pass@1_ci"]
            pred = ("–" if r["prediction_exact"] is None else
                    f"{r['prediction_exact']:.3f} ({r['prediction_bayes']:.3f})")
            cells = [f"{r['pass@1']:.3f} [{lo:.3f}, {hi:.3f}]"] + [fmt(r[f"pass@{k}"]) for k in ks[1:]] + [
                fmt(r["exact_success"]), fmt(r["format_valid"]), fmt(r["actions"]), fmt(r["turns"]),
                fmt(r["score"]), fmt(r["observation_exact"]), pred]
            lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
        lines.append("")
    if differences:
        lines += differences_markdown(differences) + [""]
    lines += [LEGEND, ""]
    for name, s in {r["name"]: r["settings"] for r in rows}.items():
        lines.append(f"- {name}: {s['mode']} mode, {s['render']} rendering, {s['instruction']} instruction, "
                     f"{s['max_response_tokens']} tokens per turn")
    return "\n".join(lines) + "\n"


def play_row(name, model, tokenizer, settings, env_name, seeds, ks, args, device):
    """One row of the report: `name` (random, oracle, or the model given) plays env_name's puzzles
    --samples times each. Returns (row, episodes)."""
    # every row starts from --seed: a row does not depend on which other rows are in the run
    reference = model is None
    if reference and name == "random":
        policy = agent.random_policy(tokenizer, random.Random(args.seed), settings["mode"])
    elif reference:
        policy = agent.oracle_policy(tokenizer, settings["mode"])
    else:
        generator = torch.Generator(device=device).manual_seed(args.seed)
        policy = agent.model_policy(model, tokenizer, temperature=args.temperature, generator=generator)
    episodes = []
    for i in range(0, len(seeds), args.batch_puzzles):
        episodes += agent.rollout(
            policy, tokenizer, env_name, seeds[i:i + args.batch_puzzles], args.samples,
            mode=settings["mode"], render=settings["render"], instruction=settings["instruction"],
            max_response_tokens=settings["max_response_tokens"], max_context_tokens=args.max_context_tokens,
            env_overrides=args.env_overrides)
    row = {"name": name, "env": env_name, **summarize(episodes, ks, settings["mode"], args.seed),
           "exact_success": exact_success(env_name, name, seeds, args.env_overrides) if reference else None,
           "settings": settings}
    if reference and row["truncated"]:
        tqdm.write(f"warning: {name} on {env_name}: {row['truncated']:.1%} of turns hit the token budget "
                   f"(--max-response-tokens {settings['max_response_tokens']}); its row understates it",
                   file=sys.stderr)
    if cut := sum(ep.end_reason == "context" for ep in episodes):
        tqdm.write(f"warning: {name} on {env_name}: {cut} of {len(episodes)} episodes ended early because a full "
                   f"{settings['max_response_tokens']}-token response no longer fit in --max-context-tokens "
                   f"{args.max_context_tokens}", file=sys.stderr)
    return row, episodes


def main(argv=None):
    args = parse_args(argv)
    env_names = list(envs.ENVS) if args.all_envs else [args.env]
    ks = [k for k in KS if k <= args.k] + ([args.k] if args.k not in KS else [])
    seeds = list(range(args.val_seed_start, args.val_seed_start + args.puzzles))
    device = torch.device(args.device) if args.device else agent.default_device()

    # 1. check every checkpoint (tokenizer, chat template) before any work; resolve its settings
    checkpoints = {path: checkpoint_settings(path, args) for path in args.model}
    references = reference_policies(args)
    if checkpoints:
        ref_tokenizer, ref_settings = next(iter(checkpoints.values()))
    else:
        ref_tokenizer = agent.train_tiny_tokenizer(seed=0)
        ref_settings = {key: getattr(args, key) if getattr(args, key) is not None else value
                        for key, value in PAPER_SETTINGS.items()}
    # a reference row is a property of the env: a small model budget must never cut its responses
    ref_settings = {**ref_settings, "max_response_tokens": max(ref_settings["max_response_tokens"],
                                                               PAPER_SETTINGS["max_response_tokens"])}
    config = {**vars(args), "envs": env_names, "ks": ks, "device": str(device), "reference_settings": ref_settings,
              "model_settings": {path: settings for path, (_, settings) in checkpoints.items()}}
    # every row's first turn (its prompt and a full response) must fit in --max-context-tokens, or its
    # episodes end before they start: on failure, name the smallest value that fits every row
    groups = {**checkpoints, None: (ref_tokenizer, ref_settings)}  # None: the reference rows (always some)
    first_turns = []  # (tokens, prompt tokens, response tokens, env, checkpoint path or "" for the references)
    for path, (tokenizer, settings) in groups.items():
        for env_name in env_names:
            prompt = first_prompt_tokens(tokenizer, settings, env_name, seeds, args.env_overrides)
            budget = settings["max_response_tokens"]
            first_turns.append((prompt + budget, prompt, budget, env_name, path or ""))
    need, prompt, budget, env_name, path = max(first_turns)
    if need > args.max_context_tokens:
        floor = not path and budget == PAPER_SETTINGS["max_response_tokens"]  # a reference row's least
        who = (f"{path} needs" if path else f"the {' and '.join(references)} rows" +
               (", added whenever a model is evaluated," if args.model else "") + " need")
        raise SystemExit(f"error: --max-context-tokens {args.max_context_tokens} is too small: {who} {need} tokens "
                         f"for a first turn on {env_name} (a {prompt}-token prompt and a {budget}-token response); "
                         f"give --max-context-tokens {need} or more" +
                         (f" ({budget} tokens per turn is the least a reference row gets)" if floor else
                          ", or a smaller --max-response-tokens"))
    print(json.dumps(config, indent=2, sort_keys=True), flush=True)
    agent.make_run_dir(args.out)
    for name in ("report.md", "report.json"):  # never an older run's report beside this run's episodes
        if os.path.isfile(os.path.join(args.out, name)):
            os.remove(os.path.join(args.out, name))

    # 2. play: random first, then the models, the oracle last (one model in memory at a time). Each
    # finished row is kept in played.jsonl with its episodes in episodes.jsonl: a run started again
    # (after a crash, or with more models) plays only the rows it does not find there, and another
    # command into the same --out keeps the rows it does not play (earlier_rows)
    policies = [(p, p) for p in checkpoints]  # (name, checkpoint path; None for a reference row)
    if "random" in references:
        policies.insert(0, ("random", None))
    if "oracle" in references:
        policies.append(("oracle", None))
    keys = {(name, env_name): row_key(args, device, name, env_name, checkpoints[path][1] if path else ref_settings,
                                      checkpoint_fingerprint(path) if path else tokenizer_fingerprint(ref_tokenizer))
            for name, path in policies for env_name in env_names}  # in play order
    reused = earlier_rows(args.out, keys)
    played_path, episodes_path = os.path.join(args.out, "played.jsonl"), os.path.join(args.out, "episodes.jsonl")
    rows, successes = [], {}  # successes: (name, env) -> {puzzle seed: [success of each sample]}
    progress = tqdm(total=len(policies) * len(env_names), desc="evaluate", disable=None)
    for name, path in policies:
        model = None
        if path is not None and any((name, env_name) not in reused for env_name in env_names):
            try:
                model = agent.load_model(path, device=device)[0]
            except agent.ModelLoadError as e:
                raise SystemExit(f"error: {e}") from None
        tokenizer, settings = checkpoints[path] if path else (ref_tokenizer, ref_settings)
        for env_name in env_names:
            if (name, env_name) in reused:
                row, row_successes = reused[name, env_name]
                rows.append(row)
                successes[name, env_name] = row_successes
                progress.update(1)
                tqdm.write(f"{name} on {env_name}: pass@1 {row['pass@1']:.3f} (played before, {played_path})",
                           file=sys.stderr)
                continue
            start = time.perf_counter()
            row, episodes = play_row(name, model, tokenizer, settings, env_name, seeds, ks, args, device)
            rows.append(row)
            for ep in episodes:
                successes.setdefault((name, env_name), {}).setdefault(ep.seed, []).append(ep.success)
            # the episodes first, then the row that they are
            agent.append_jsonl(episodes_path, *(episode_record(name, ep) for ep in episodes))
            agent.append_jsonl(played_path, {"key": keys[name, env_name], "row": row,
                                             "successes": successes[name, env_name]})
            progress.update(1)
            tqdm.write(f"{name} on {env_name}: pass@1 {row['pass@1']:.3f} ({time.perf_counter() - start:.1f}s)",
                       file=sys.stderr)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    progress.close()
    # episodes.jsonl: this run's rows in play order, whichever run played them, then the other rows kept
    # there as they were (sorted is stable)
    play_order = {key: i for i, key in enumerate(keys)}
    agent.write_jsonl(episodes_path, sorted(agent.read_jsonl(episodes_path),
                                            key=lambda r: play_order.get((r["name"], r["env"]), len(play_order))))

    # 3. report: rows grouped by env, in policy order
    rows.sort(key=lambda r: env_names.index(r["env"]))
    differences = [{"a": a, "b": b, "env": env_name, **paired_difference(
        successes[a, env_name], successes[b, env_name], np.random.default_rng(args.seed))}
        for a, b in args.diff for env_name in env_names]
    table = markdown(rows, env_names, ks, args, differences)
    agent.write_text(os.path.join(args.out, "report.md"), table)
    agent.write_json(os.path.join(args.out, "report.json"),
                     {"config": config, "rows": rows, "differences": differences})
    print(table, flush=True)
    print(json.dumps({"rows": rows, **({"differences": differences} if differences else {})}), flush=True)
    return rows


if __name__ == "__main__":
    agent.run_script(main, "Run the same command to continue: the rows finished are kept in --out's played.jsonl.")
