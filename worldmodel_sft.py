"""
Stage 1 of SPA: self-play world-model SFT (SPEC §4).

The model plays the environment; each of its turns is rewritten so that <observation> holds the
true current state (grid + coordinates) and <prediction> the true state after the turn's
actions (grid); the model is then finetuned on those turns with cross entropy on the response.

    python worldmodel_sft.py --env frozenlake --preset tiny      # CPU, minutes; run folder runs/sft-frozenlake
    python worldmodel_sft.py --env sokoban --out runs/sft-sokoban             # Qwen2.5-1.5B-Instruct, one GPU
    python worldmodel_sft.py --env sokoban --data runs/sft-sokoban/dataset.jsonl --loss-spans no-states \\
        --out runs/ablation

The run folder (--out, default runs/sft-ENV) gets dataset.jsonl (every example, inspectable; not
with --data), metrics.jsonl, run_config.json, train_state.pt (resume: run the same command again),
model/ (the final Hugging Face checkpoint, the input of rl.py) and eval.json (world-model accuracy on
held-out turns), whose numbers are also the last line printed.

Where this departs from the paper's recipe, and why:
- The tiny preset plays with a random-action behaviour policy (a fresh model cannot write the
  format); it states its planned actions in its thoughts before the prediction, so the
  prediction is a function of what the model has written so far. At paper scale the behaviour
  policy is the model itself and its own thoughts are kept.
- `--behaviour oracle` lets the optimal policy play instead: not the method, a ceiling on what
  SFT can copy (README, "Can the tiny model play at all?").
- `--episodes successful` trains on the turns of the episodes that succeeded only: with
  `--behaviour model` and a finetuned `--model`, one round of rejection-sampling finetuning on the
  model's own wins (expert iteration) -- not the method, a comparison for it (README).
- Held-out turns are whole puzzles (every 5th puzzle of each self-play batch: 6 of the paper
  preset's 32), not random turns, so no held-out puzzle was seen in training.
- States in the rewritten responses stand on lines of their own (see agent.replace_states).
- The tiny preset's rewritten thoughts end with a trace of the turn (`--thought-trace`: "Right to
  (2,2)." -- where the player and any pushed box went after each action), written before the
  prediction: a scratchpad that a 2.3M-parameter model needs to predict next states (README). At
  paper scale the model's own thoughts are kept as written.
"""
import argparse
import json
import math
import os
import random
import sys
import time

import torch
from tqdm import tqdm

import agent
import envs

PRESETS = {
    # SPEC §4, reference config: 32 groups x 8 samples per batch, several batches, lr 1e-4, batch 16, 5 epochs
    "paper": dict(model=agent.DEFAULT_MODEL, behaviour="model", env_groups=32, group_size=8, batches=3,
                  instruction="full", max_response_tokens=agent.MAX_RESPONSE_TOKENS, lr=1e-4, batch_size=16, epochs=5,
                  max_train_tokens=None, micro_batch_tokens=16384, eval_turns=256, pack=False,
                  thought_trace=False),
    # a laptop CPU in minutes: a fresh tiny model and the random behaviour policy. Self-play costs
    # seconds, so the preset plays many episodes and trains on each twice -- repeating a small
    # dataset made the tiny model memorise instead of learning to copy and update grids. FrozenLake
    # and Sokoban train on whole episodes (--pack: every turn's loss at about 40% of the compute of
    # one sequence per turn), 4 a step at lr 1e-3: the copy of a state emerges abruptly after
    # enough optimiser steps, and this gets the most steps into the budget. FrozenLake plays 18
    # batches (its episodes are shorter), Sokoban 12: 10 to 21 minutes each on a 2-core CPU, by machine
    # (README). Sudoku keeps 16 single turns a step at 2e-3, and a cap of 6M trained tokens that ends its
    # run within a CPU budget (the preset's first settings; not retuned since).
    "tiny": dict(model=None, behaviour="random", env_groups=64, group_size=8,
                 batches={"frozenlake": 18, "sokoban": 12, "sudoku": 12}, instruction="short",
                 max_response_tokens=agent.TINY_MAX_RESPONSE_TOKENS,
                 lr={"frozenlake": 1e-3, "sokoban": 1e-3, "sudoku": 2e-3},
                 batch_size={"frozenlake": 4, "sokoban": 4, "sudoku": 16}, epochs=2,
                 max_train_tokens={"frozenlake": None, "sokoban": None, "sudoku": 6e6}, micro_batch_tokens=8192,
                 eval_turns=200, pack={"frozenlake": True, "sokoban": True, "sudoku": False}, thought_trace=True),
}
LOSS_SPANS = ("all", "states", "no-states")
HELDOUT_EVERY = 5  # every 5th puzzle of a self-play batch is held out: SPEC §4's 20%
STATE_TARGETS = ("true", "shuffled")
BEHAVIOURS = ("model", "random", "oracle")
EPISODES = ("all", "successful")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # what to learn
    parser.add_argument("--env", required=True, choices=envs.ENVS, help="environment")
    parser.add_argument("--preset", default="paper", choices=PRESETS, help="defaults for the flags below")
    parser.add_argument("--model", help="HF id or folder to finetune; unset: a fresh tiny model")
    parser.add_argument("--out", help="run folder (created; an existing run there is resumed; default: runs/sft-ENV)")
    parser.add_argument("--seed", type=agent.seed_int, default=0,
                        help="seed for data order, sampling and the tiny model")
    parser.add_argument("--env-overrides", type=agent.json_object, default={},
                        help='JSON of envs.make overrides for self-play, e.g. \'{"slippery": false}\'')
    # self-play data
    parser.add_argument("--data", help="train on this dataset.jsonl instead of playing")
    parser.add_argument("--behaviour", choices=BEHAVIOURS,
                        help="who plays: the model, random actions, or the oracle (an imitation ceiling: README)")
    parser.add_argument("--env-groups", type=int, help="puzzles per self-play batch")
    parser.add_argument("--group-size", type=int, help="episodes per puzzle")
    parser.add_argument("--batches", type=int, help="self-play batches (seeds advance each batch)")
    parser.add_argument("--instruction", choices=("full", "short"), help="wording of the env instruction")
    parser.add_argument("--max-response-tokens", type=int, help="token budget per turn")
    parser.add_argument("--train-seed-start", type=int, default=10_000,
                        help="first puzzle seed (far from the validation seeds)")
    parser.add_argument("--episodes", default="all", choices=EPISODES,
                        help="the episodes whose turns train the model: all, or only those that succeeded "
                             "(with --behaviour model, one round of rejection-sampling finetuning on the "
                             "model's own successes: README); held-out turns are all kept, they measure the "
                             "world model")
    parser.add_argument("--thought-trace", action=argparse.BooleanOptionalAction,
                        help="end each rewritten turn's thoughts with where the player (and a pushed box) went "
                             "after each action, e.g. 'Right to (2,2).' (see agent.trace_sentence; self-play "
                             "only, a --data file keeps what it was written with)")
    # SFT
    parser.add_argument("--loss-spans", default="all", choices=LOSS_SPANS,
                        help="response tokens that carry loss: all, only the states, or all but the states "
                             "(states: the observation, the prediction and the position trace before it)")
    parser.add_argument("--state-targets", default="true", choices=STATE_TARGETS,
                        help="states the training responses hold: the truth, or the states of other random "
                             "training turns (the format without the world model: the vanilla baseline at tiny "
                             "scale, see README)")
    parser.add_argument("--pack", action=argparse.BooleanOptionalAction,
                        help="one sequence per episode with the loss on all its turns, instead of one per turn "
                             "(the same loss in about 40%% of the compute; --batch-size then counts episodes)")
    parser.add_argument("--epochs", type=int, help="passes over the training turns")
    parser.add_argument("--max-train-tokens", type=agent.finite_float,
                        help="stop once this many tokens (each batch padded to its longest sequence) were trained "
                             "on; the schedule ends there")
    parser.add_argument("--batch-size", type=int, help="examples per optimiser step")
    parser.add_argument("--micro-batch-tokens", type=int, help="padded tokens per forward/backward (memory)")
    parser.add_argument("--lr", type=agent.finite_float, help="peak learning rate")
    parser.add_argument("--min-lr-ratio", type=agent.finite_float, default=0.0,
                        help="cosine schedule floor, times --lr")
    parser.add_argument("--warmup", type=agent.finite_float, default=0.1, help="warm-up, fraction of all steps")
    parser.add_argument("--weight-decay", type=agent.finite_float, default=0.01,
                        help="AdamW weight decay (matrices only)")
    parser.add_argument("--betas", type=agent.finite_float, nargs=2, default=(0.9, 0.95), help="AdamW betas")
    parser.add_argument("--grad-clip", type=agent.finite_float, default=1.0, help="gradient norm clip")
    parser.add_argument("--max-length", type=int, default=2048,
                        help="longer sequences are dropped (a warning counts their turns by turn number)")
    parser.add_argument("--save-every", type=int, default=100, help="optimiser steps between resumable saves")
    # evaluation
    parser.add_argument("--eval-turns", type=int, help="held-out turns evaluated by greedy generation")
    parser.add_argument("--heldout-loss-turns", type=int, default=1000,
                        help="held-out turns (a fixed random sample) for the loss and teacher-forced accuracy "
                             "after each epoch")
    args = agent.help_with_defaults(parser, PRESETS).parse_args(argv)
    args.out = args.out or os.path.join("runs", f"sft-{args.env}")
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value[args.env] if isinstance(value, dict) else value)
    counts = ("epochs", "batch_size", "eval_turns", "save_every", "max_length", "micro_batch_tokens",
              "max_response_tokens")
    if args.data is None:  # self-play
        counts += ("batches", "group_size")
    checks = [(getattr(args, name) >= 1, f"--{name.replace('_', '-')} >= 1") for name in counts] + [
        (args.data is not None or args.env_groups >= HELDOUT_EVERY,
         f"--env-groups >= {HELDOUT_EVERY} (every {HELDOUT_EVERY}th puzzle of a batch is held out)"),
        (args.train_seed_start >= 0, "--train-seed-start >= 0"),
        (args.lr > 0, "--lr > 0"),
        (0 <= args.warmup < 1, "0 <= --warmup < 1"),
        (0 <= args.min_lr_ratio <= 1, "0 <= --min-lr-ratio <= 1"),
        (args.weight_decay >= 0, "--weight-decay >= 0"),
        (all(0 <= beta < 1 for beta in args.betas), "0 <= --betas < 1"),
        (args.grad_clip > 0, "--grad-clip > 0"),
        (args.max_train_tokens is None or args.max_train_tokens > 0, "--max-train-tokens > 0"),
        (args.heldout_loss_turns >= 0, "--heldout-loss-turns >= 0")]
    if needs := [need for ok, need in checks if not ok]:
        parser.error("need " + ", ".join(needs))
    if args.data is not None and os.path.isdir(args.data):
        inside = os.path.join(args.data, "dataset.jsonl")
        parser.error(f"--data {args.data} is a folder" + (f"; did you mean {inside}?" if os.path.isfile(inside) else
                                                          ", not a dataset.jsonl file"))
    if args.data is not None and not os.path.isfile(args.data):
        parser.error(f"--data {args.data}: no such file")
    if problem := agent.env_overrides_problem(args.env, args.env_overrides):
        parser.error(problem)
    return args


# -----------------------------------------------------------------------------
# Self-play data: play, rewrite each turn with the true states, one example per kept turn

def examples_from_episodes(episodes, thought_trace=False):
    """One example per assistant turn whose response follows the world-model format
    (agent.parse_response: the observation and prediction spans, and an answer with actions).

    The prompt is the conversation up to that turn, with earlier kept turns also rewritten (the
    model learns from conversations whose states are all true); the target is the response with
    <observation> = the true state before the turn (coordinates rendering) and <prediction> = the
    true state after the actions it ran (grid rendering); with thought_trace, the thoughts end
    with the trace of the pieces' moves (agent.trace_sentence; the example's "trace"). Each example
    records whether its episode succeeded ("episode_success": --episodes successful). Turns that
    break the format are dropped but stay in later prompts as they were written. Every
    HELDOUT_EVERY-th puzzle of the rollout is held out (split "heldout"), the rest are "train".
    """
    examples = []
    for ep in episodes:
        messages = list(ep.messages[:2])  # system, first user message
        history = []  # the actions each earlier turn ran, to rebuild the env at this turn
        for k, turn in enumerate(ep.turns):
            parsed = agent.parse_response(turn["response"], "worldmodel")
            if parsed["format_valid"]:
                trace = agent.trace_sentence(turn["executed"], turn["pieces"]) if thought_trace else ""
                target = agent.replace_states(turn["response"][len(agent.THINK_START):], turn["coords_before"],
                                              turn["state_after"], trace)
                examples.append({
                    "env": ep.env_name, "seed": ep.seed, "sample": ep.sample, "turn": k + 1,
                    "split": "heldout" if ep.group % HELDOUT_EVERY == HELDOUT_EVERY - 1 else "train",
                    "messages": [dict(m) for m in messages], "response": target,
                    "observation": turn["coords_before"], "prediction": turn["state_after"], "trace": trace,
                    "actions": turn["actions"], "executed": turn["executed"], "history": [list(h) for h in history],
                    "env_overrides": ep.env_overrides, "episode_success": ep.success,
                })
                assistant = agent.THINK_START + target
            else:
                assistant = turn["response"]
            messages.append({"role": "assistant", "content": assistant})
            if 2 * k + 3 < len(ep.messages):  # the next user message, if the episode went on
                messages.append(ep.messages[2 * k + 3])
            history.append(turn["executed"])
    return examples


SELFPLAY_STATE = "selfplay_state.pt"  # beside dataset.jsonl.partial while self-play runs


def self_play(args, model, tokenizer, device, data_path):
    """--batches self-play batches of --env-groups puzzles x --group-size episodes, each turn one
    example; written to data_path at the end. After every batch its examples and the sampling
    state are saved beside it, so an interrupted self-play continues with the batch it was playing
    and gives the same dataset as one that ran through."""
    partial_path, state_path = data_path + ".partial", os.path.join(args.out, SELFPLAY_STATE)
    rng = random.Random(args.seed)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    if args.behaviour == "random":
        policy = agent.random_policy(tokenizer, rng, "worldmodel")
    elif args.behaviour == "oracle":
        policy = agent.oracle_policy(tokenizer, "worldmodel")
    else:
        policy = agent.model_policy(model, tokenizer, temperature=1.0, generator=generator)
    examples, first_batch = [], 0
    if os.path.isfile(state_path) and os.path.isfile(partial_path):
        def restore(state):
            rng.setstate(state["rng"])
            generator.set_state(state["generator"])
        state = agent.resume_train_state(state_path, ("batches", "examples", "rng", "generator"), restore,
                                         "worldmodel_sft.py's self-play")
        examples, first_batch = agent.read_jsonl(partial_path)[:state["examples"]], state["batches"]
        if len(examples) < state["examples"]:  # the file lost turns its state counts: start self-play over
            rng.seed(args.seed)
            generator.manual_seed(args.seed)
            examples, first_batch = [], 0
        print(f"self-play: resuming at batch {first_batch} with {len(examples)} turns kept", flush=True)
    agent.write_jsonl(partial_path, examples)
    for batch in tqdm(range(first_batch, args.batches), desc="self-play", disable=None):
        first = args.train_seed_start + batch * args.env_groups
        episodes = agent.rollout(policy, tokenizer, args.env, list(range(first, first + args.env_groups)),
                                 args.group_size, mode="worldmodel", render="coords",
                                 instruction=args.instruction, max_response_tokens=args.max_response_tokens,
                                 env_overrides=args.env_overrides)
        batch_examples = examples_from_episodes(episodes, thought_trace=args.thought_trace)
        agent.append_jsonl(partial_path, *batch_examples)  # the examples first, then the state that counts them
        examples += batch_examples
        agent.save_train_state(state_path, {"batches": batch + 1, "examples": len(examples), "rng": rng.getstate(),
                                            "generator": generator.get_state()})
    os.replace(partial_path, data_path)
    os.remove(state_path)
    return examples


def shuffled_states(examples, rng):
    """The examples with the states in their responses taken from other examples, at random (one
    permutation of all of them): every response keeps its form, thoughts and actions, and holds a
    well-formed observation, prediction and thought trace (if any) that say nothing about its own
    puzzle. Trained on with the loss on every token, a model learns to write the world-model
    format without learning the world model -- what `--loss-spans no-states` means for an
    instruction-tuned model, which writes plausible states of its own in the spans the loss leaves
    out. A tiny model learns nothing there at all: after <observation> it never learns to write a
    state, nor when to close one. The "observation"/"prediction" fields keep the truth (evaluation
    scores against them); "trace" is the trace the new response holds (encode_conversation checks
    that the loss masks find it there).

    A turn's prompt holds the episode's earlier responses; they are rewritten too, to the shuffled
    responses those turns train on, so that a conversation reads the same in every later prompt
    (and --pack, which trains on a whole conversation at once, sees one consistent text)."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    new_traces = [examples[j].get("trace", "") for j in order]
    new_responses = [agent.replace_states(_without_trace(ex), examples[j]["observation"], examples[j]["prediction"],
                                          trace) for ex, j, trace in zip(examples, order, new_traces)]
    turn_of = lambda ex, turn: (ex["env"], ex["seed"], ex["sample"], turn)  # noqa: E731
    by_turn = {turn_of(ex, ex["turn"]): response for ex, response in zip(examples, new_responses)}
    shuffled = []
    for ex, response, trace in zip(examples, new_responses, new_traces):
        messages = [dict(m) for m in ex["messages"]]
        for turn in range(1, ex["turn"]):  # messages: system, user 1, assistant 1, user 2, ...
            earlier = by_turn.get(turn_of(ex, turn))
            if earlier is not None:  # a kept turn (the others stay as they were written)
                messages[2 * turn]["content"] = agent.THINK_START + earlier
        shuffled.append({**ex, "messages": messages, "response": response, "trace": trace})
    return shuffled


def _trace_at(example):
    """Where the example's thought trace is in its response: (start, end) in characters, or None
    if it has none. The trace ends the thoughts after a space, right before <prediction>."""
    trace, response = example.get("trace", ""), example["response"]
    end = response.find("<prediction>")
    if not trace:
        return None
    if end <= len(trace) or response[end - len(trace) - 1:end] != " " + trace:
        raise ValueError(f"{example['env']} seed {example['seed']} turn {example['turn']}: the thought trace is "
                         f"not right before <prediction>; the dataset is inconsistent")
    return end - len(trace), end


def _without_trace(example):
    """The example's response with its thought trace (and the space before it) taken out."""
    at = _trace_at(example)
    return example["response"] if at is None else example["response"][:at[0] - 1] + example["response"][at[1]:]


REQUIRED_KEYS = ("env", "seed", "sample", "turn", "split", "messages", "response", "observation", "prediction",
                 "history")
FIELD_TYPES = {"seed": int, "sample": int, "turn": int, "messages": list, "response": str, "observation": str,
               "prediction": str, "history": list}


def read_dataset(path):
    """Examples from a dataset.jsonl, with a clear error for a missing, corrupt or foreign file."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: dataset {path!r} does not exist")
    examples = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                example = json.loads(line)
            except UnicodeDecodeError:
                raise SystemExit(f"error: {path}:{number} is not UTF-8 text; the dataset is corrupt") from None
            except json.JSONDecodeError as e:
                raise SystemExit(f"error: {path}:{number} is not valid JSON ({e.msg}); the dataset is corrupt") \
                    from None
            missing = [k for k in REQUIRED_KEYS if not isinstance(example, dict) or k not in example]
            if missing:
                raise SystemExit(f"error: {path}:{number} lacks {', '.join(missing)}; "
                                 f"not a dataset written by this script")
            if not isinstance(example.get("trace", ""), str):
                raise SystemExit(f"error: {path}:{number}: the thought trace is not a string")
            wrong = [k for k, kind in FIELD_TYPES.items()
                     if not isinstance(example[k], kind) or (kind is int and isinstance(example[k], bool))]
            if "messages" not in wrong and not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                   and isinstance(m.get("content"), str) for m in example["messages"]):
                wrong.append("messages")
            if "history" not in wrong and not all(isinstance(h, list) and all(isinstance(a, str) for a in h)
                                                  for h in example["history"]):
                wrong.append("history")
            if not isinstance(example.get("env_overrides", {}), dict):
                wrong.append("env_overrides")
            if not isinstance(example.get("episode_success", False), bool):
                wrong.append("episode_success")
            if wrong:
                raise SystemExit(f"error: {path}:{number}: {', '.join(wrong)} of the wrong type; "
                                 f"not a dataset written by this script")
            if example["env"] not in envs.ENVS or example["split"] not in ("train", "heldout"):
                raise SystemExit(f"error: {path}:{number}: unknown env {example['env']!r} "
                                 f"or split {example['split']!r}")
            if example["seed"] < 0:
                raise SystemExit(f"error: {path}:{number}: seed {example['seed']} (puzzle seeds are >= 0)")
            examples.append(example)
    if not examples:
        raise SystemExit(f"error: dataset {path!r} is empty")
    return examples



# -----------------------------------------------------------------------------
# Tokenisation and loss masks

PROMPT, OBSERVATION, PREDICTION, OTHER, TRACE = 0, 1, 2, 3, 4  # what each token of a sequence is
STATE_KINDS = (OBSERVATION, PREDICTION, TRACE)  # the world-model tokens: --loss-spans states / no-states
STATE_KIND = {"observation": OBSERVATION, "prediction": PREDICTION, "trace": TRACE}  # agent.state_spans' kinds


def conversations(examples):
    """The per-turn examples grouped by episode, in turn order (--pack: one sequence each).

    Training on a whole conversation with the loss on every kept turn is the sum of the per-turn
    examples' losses -- each turn's prompt is exactly the conversation before it, and causal
    attention sees nothing later -- but it computes each prefix once instead of once per later
    turn (a 5-turn episode of equal turns costs a third as much; the tiny preset's data, about 40%).
    The optimisation is not the same, though: a step holds whole episodes, so --batch-size counts
    episodes; at 16 of them (about 50 turns) a step the tiny model learned to copy states several
    times more slowly per token, at 4 (the tiny preset) faster than with one sequence per turn,
    since it takes more steps."""
    episodes = {}
    for ex in examples:
        episodes.setdefault((ex["env"], ex["seed"], ex["sample"]), []).append(ex)
    return [sorted(turns, key=lambda ex: ex["turn"]) for turns in episodes.values()]


def encode_conversation(tokenizer, turns, loss_spans):
    """(input_ids, labels, kinds) for one episode's kept turns: the last turn's prompt (the chat
    template up to its <think>), its response and <|im_end|>; every kept turn's response sits in
    that text. kinds tells each token apart: PROMPT (everything the model does not write, and
    turns that were not kept), a state -- OBSERVATION or PREDICTION contents, or the thought TRACE
    (world-model content too: it says where the pieces went), found by agent.state_spans, the rule
    PPO's --no-state-loss uses -- or OTHER response tokens (tags, thoughts, answer, <|im_end|>).
    labels are -100 except on the response tokens that carry loss: all of them, only the states
    ("states"), or all but those ("no-states"). Tokens are classified by their character offsets;
    each response is tokenised apart from the prompt before it, as in the rollout (agent.encode_chat)."""
    last = turns[-1]
    text = agent.prompt_text(tokenizer, last["messages"]) + last["response"] + "<|im_end|>"
    responses, states = [], []  # (start, end) of each kept turn's response; (kind, start, end) of its states
    for ex in turns:
        start = len(agent.prompt_text(tokenizer, ex["messages"]))
        target = ex["response"] + "<|im_end|>"
        where = f"{ex['env']} seed {ex['seed']} turn {ex['turn']}"
        if text[start:start + len(target)] != target:
            raise ValueError(f"{where}: the response is not where the conversation of the later turns has it; "
                             f"the dataset is inconsistent")
        responses.append((start, start + len(target)))
        found = agent.state_spans(ex["response"])
        found_kinds = {kind for kind, _, _ in found}
        for kind in ("observation", "prediction"):
            if kind not in found_kinds:
                raise ValueError(f"{where}: no <{kind}> span")
        trace = _trace_at(ex)  # the rewrite's trace, where the rewrite put it (or a clear error)
        if trace and not any(k == "trace" and s <= trace[0] and e == trace[1] for k, s, e in found):
            raise ValueError(f"{where}: the recorded thought trace is not one agent.state_spans finds")
        states += [(kind, start + s, start + e) for kind, s, e in found]
    ids, offsets = agent.encode_chat(tokenizer, text)  # as the rollout tokenises it
    labels, kinds = [], []
    for token, (lo, hi), state in zip(ids, offsets, agent.state_token_kinds(offsets, states)):
        if state is not None:
            kind = STATE_KIND[state]
        elif any(s <= lo and hi <= e and hi > lo for s, e in responses):
            kind = OTHER
        else:
            kind = PROMPT
        carries_loss = kind != PROMPT and {"all": True, "states": kind in STATE_KINDS,
                                          "no-states": kind == OTHER}[loss_spans]
        labels.append(token if carries_loss else -100)
        kinds.append(kind)
    return ids, labels, kinds


def encode_example(tokenizer, example, loss_spans):
    """One turn on its own: its prompt, with loss on its response only (see encode_conversation)."""
    return encode_conversation(tokenizer, [example], loss_spans)


def length_bucketed_batches(lengths, batch_size, rng, window=50):
    """Batches of examples of similar length, so little of a batch is padding: shuffle, sort
    within windows of window x batch_size examples, cut into batches, shuffle the batch order."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    for start in range(0, len(order), window * batch_size):
        chunk = sorted(order[start:start + window * batch_size], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(encoded, indices, pad_id, device):
    """Right-padded (input_ids, attention_mask, labels, kinds), each (b, T); pads are PROMPT kind."""
    width = max(len(encoded[i][0]) for i in indices)
    ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(indices), width), dtype=torch.long)
    labels = torch.full((len(indices), width), -100, dtype=torch.long)
    kinds = torch.full((len(indices), width), PROMPT, dtype=torch.long)
    for row, i in enumerate(indices):
        tokens, target, kind = encoded[i]
        ids[row, :len(tokens)] = torch.tensor(tokens)
        mask[row, :len(tokens)] = 1
        labels[row, :len(target)] = torch.tensor(target)
        kinds[row, :len(kind)] = torch.tensor(kind)
    return ids.to(device), mask.to(device), labels.to(device), kinds.to(device)


def response_logits(model, ids, mask, kinds):
    """Logits for the response tokens only, (n, V), with where they are: a (b, T-1) mask over the
    next-token targets ids[:, 1:] (agent.scored_logits: the prompt's logits are never computed)."""
    where = kinds[:, 1:] != PROMPT  # (b, T-1): position t predicts token t+1
    return agent.scored_logits(model, ids, mask, where), where


def token_losses(model, ids, mask, labels, kinds):
    """Summed cross entropy over the label tokens, their count, and the response logits with
    their positions (see response_logits)."""
    logits, where = response_logits(model, ids, mask, kinds)
    targets = labels[:, 1:][where]  # (n,)
    loss = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
    return loss, (targets != -100).sum(), logits, where


@torch.no_grad()
def heldout_metrics(model, encoded, pad_id, device, max_tokens, autocast):
    """Held-out loss (on the tokens that carry loss) and, with the true response as context
    (teacher forcing), how often the model's top token is right inside the observation and the
    prediction -- per token, and for whole states (every token right; one sequence per turn)."""
    model.eval()
    totals = {"loss": 0.0, "loss_tokens": 0}
    right = {OBSERVATION: [0, 0], PREDICTION: [0, 0]}  # tokens right, tokens
    exact = {OBSERVATION: [0, 0], PREDICTION: [0, 0]}  # states all right, states
    lengths = [len(e[0]) for e in encoded]
    for piece in agent.micro_batches(range(len(encoded)), lengths, max_tokens):
        ids, mask, labels, kinds = collate(encoded, piece, pad_id, device)
        with autocast:
            loss, count, logits, where = token_losses(model, ids, mask, labels, kinds)
        totals["loss"] += loss.item()
        totals["loss_tokens"] += int(count)
        correct = torch.zeros_like(where)  # (b, T-1): the top token is the true next token
        correct[where] = logits.argmax(-1) == ids[:, 1:][where]
        for kind in (OBSERVATION, PREDICTION):
            of_kind = kinds[:, 1:] == kind  # (b, T-1)
            right[kind][0] += int((correct & of_kind).sum())
            right[kind][1] += int(of_kind.sum())
            has = of_kind.any(-1)  # (b,)
            exact[kind][0] += int(((correct | ~of_kind).all(-1) & has).sum())
            exact[kind][1] += int(has.sum())
    ratio = lambda pair: round(pair[0] / pair[1], 4) if pair[1] else None  # noqa: E731  (None: nothing held out)
    loss = round(totals["loss"] / totals["loss_tokens"], 5) if totals["loss_tokens"] else None
    return {"heldout/loss": loss,
            "heldout/observation_token_acc": ratio(right[OBSERVATION]),
            "heldout/prediction_token_acc": ratio(right[PREDICTION]),
            "heldout/observation_exact_forced": ratio(exact[OBSERVATION]),
            "heldout/prediction_exact_forced": ratio(exact[PREDICTION])}


def train_step(model, optimizer, encoded, batch, lengths, pad_id, device, autocast, max_tokens, grad_clip):
    """One optimiser step on a batch of sequences, in micro-batches of at most max_tokens padded
    tokens with gradient accumulation. The loss is the mean over the whole batch's loss tokens,
    so each micro-batch's summed loss is divided by the batch's count, not its own.
    Returns (mean loss, computed positions including padding, gradient norm before clipping)."""
    model.train()
    n_loss_tokens = max(1, sum(sum(t != -100 for t in encoded[i][1][1:]) for i in batch))
    total_loss, computed = 0.0, 0
    for piece in agent.micro_batches(batch, lengths, max_tokens):
        ids, mask, labels, kinds = collate(encoded, piece, pad_id, device)
        with autocast:
            loss_sum = token_losses(model, ids, mask, labels, kinds)[0]
        (loss_sum / n_loss_tokens).backward()
        total_loss += loss_sum.item()
        computed += ids.numel()
    grad_norm = agent.clip_gradients(model, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total_loss / n_loss_tokens, computed, grad_norm


def planned_steps(lengths, args):
    """Optimiser steps of the whole run: every batch of every epoch, or fewer where
    --max-train-tokens runs out first (counted as each batch padded to its longest sequence, along
    the same batch order the run will use, so the cosine schedule ends exactly where training
    does; how a batch is split into micro-batches changes neither)."""
    steps = tokens = 0
    for epoch in range(args.epochs):
        for batch in length_bucketed_batches(lengths, args.batch_size, random.Random(f"{args.seed}-{epoch}")):
            if args.max_train_tokens is not None and tokens >= args.max_train_tokens:
                return steps
            tokens += len(batch) * max(lengths[i] for i in batch)
            steps += 1
    return steps


def learning_rate(step, total_steps, args):
    """Linear warm-up over the first args.warmup of the steps, then cosine down to min_lr_ratio."""
    warmup = max(1, int(args.warmup * total_steps))
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# -----------------------------------------------------------------------------
# World-model evaluation on held-out turns

def env_at_turn(example):
    """The env as it stood at the start of the example's turn: reset to its seed, then replay the
    actions earlier turns ran (same seed and actions give the same slips)."""
    env = envs.make(example["env"], **{**example.get("env_overrides", {}), "render_mode": "coords"})
    env.reset(example["seed"])
    for turn_actions in example["history"]:
        for action in turn_actions:
            env.step(action)
    if env.render("coords") != example["observation"]:
        raise ValueError(f"dataset example {example['env']}/{example['seed']}/turn {example['turn']} does not "
                         f"replay to its recorded state; was it made with other env settings?")
    return env

def split_examples(examples, path, episodes="all"):
    """(training turns, held-out turns) of a dataset read from path; with episodes "successful" (the
    flag), only the training turns of the episodes that succeeded. Refuses one without either, and
    replays every held-out turn: the evaluation after training does, and a bad one fails now, not then."""
    train = [ex for ex in examples if ex["split"] == "train"]
    heldout = [ex for ex in examples if ex["split"] == "heldout"]
    if not train or not heldout:
        raise SystemExit(f"error: {path}: no {'training' if not train else 'held-out'} turns (every turn broke "
                         f"the format? or a --data file without them)")
    for example in heldout:
        try:
            env_at_turn(example)
        except (TypeError, ValueError, RuntimeError) as e:
            raise SystemExit(f"error: {path}: held-out turn {example['env']}/{example['seed']}/"
                             f"turn {example['turn']} does not replay: {e}") from None
    return (successful_turns(train, path) if episodes == "successful" else train), heldout


def successful_turns(train, path):
    """The training turns of the episodes that succeeded (--episodes successful). A dataset written
    before examples recorded their episode's outcome cannot say which those are: an error, not a guess."""
    if unknown := sum("episode_success" not in ex for ex in train):
        raise SystemExit(f"error: {path}: {unknown} training turns do not record whether their episode succeeded "
                         f"(a dataset written before --episodes existed); play it again for --episodes successful")
    kept = [ex for ex in train if ex["episode_success"]]
    print(f"--episodes successful: {len(kept)} of {len(train)} training turns, from "
          f"{len({(ex['seed'], ex['sample']) for ex in kept})} episodes", flush=True)
    if not kept:
        raise SystemExit(f"error: {path}: no training turn comes from an episode that succeeded; nothing for "
                         f"--episodes successful to learn from")
    return kept


@torch.no_grad()
def evaluate_world_model(model, tokenizer, examples, max_response_tokens, batch_size=64):
    """Greedy responses on held-out turns, scored against the truth. Per turn:
      format_valid      -- the response has the world-model format
      observation_exact -- its observation equals the true state (coordinates rendering)
      prediction_exact  -- the probability that the state after ITS OWN actions equals its
                           prediction (0 or 1 except on slippery FrozenLake)
      prediction_bayes  -- the same for the best possible predictor: the most likely outcome's
                           probability (1 on deterministic envs)
    Returns (mean of each, per-turn records)."""
    model.eval()
    stops = agent.stop_token_ids(tokenizer)
    records = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        prompts = [agent.encode_chat(tokenizer, agent.prompt_text(tokenizer, ex["messages"]))[0] for ex in chunk]
        outputs, _ = agent.sample(model, prompts, max_response_tokens, stops, tokenizer.pad_token_id, temperature=0)
        for ex, tokens in zip(chunk, outputs):
            if tokens and tokens[-1] in stops:
                tokens = tokens[:-1]
            response = agent.THINK_START + tokenizer.decode(tokens)
            parsed = agent.parse_response(response, "worldmodel")
            observation_exact, prediction_exact, prediction_bayes = agent.world_model_scores(
                env_at_turn(ex), parsed, ex["observation"])
            records.append({
                "env": ex["env"], "seed": ex["seed"], "turn": ex["turn"], "response": response,
                "format_valid": float(parsed["format_valid"]), "observation_exact": observation_exact,
                "prediction_exact": prediction_exact, "prediction_bayes": prediction_bayes,
            })
    keys = ("observation_exact", "prediction_exact", "prediction_bayes", "format_valid")
    summary = {k: round(sum(r[k] for r in records) / max(1, len(records)), 4) for k in keys}
    summary["heldout_turns"] = len(records)
    return summary, records


# -----------------------------------------------------------------------------
# Checkpoints

# What may differ when a run is resumed: how often it saves, the micro-batch size (the same
# gradients, accumulated in other pieces) and how much it evaluates (a moved folder is not a
# change: agent.settings_changed lets the recorded paths follow it)
RESUME_MAY_CHANGE = ("save_every", "micro_batch_tokens", "eval_turns", "heldout_loss_turns")
# What self-play does not read, so that until training has saved a state these may change too: a
# folder's self-play data can be trained on with other training settings (a --max-length that
# dropped every sequence, say) without playing again
TRAINING_FLAGS = ("episodes", "loss_spans", "state_targets", "pack", "epochs", "max_train_tokens", "batch_size",
                  "lr", "min_lr_ratio", "warmup", "weight_decay", "betas", "grad_clip", "max_length")


def save_train_state(path, model, optimizer, step, epoch, batch_in_epoch):
    """Everything needed to continue exactly where training stopped, written atomically. (The data
    order is a function of the seed and the epoch, so it needs no saved state.)"""
    agent.save_train_state(path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                                  "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                                  "torch_rng": torch.get_rng_state()})


def resume(path, model, optimizer):
    """Load the saved state into model and optimizer (and torch's RNG); returns the state."""
    def restore(state):
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
    return agent.resume_train_state(path, ("model", "optimizer", "step", "epoch", "batch_in_epoch", "torch_rng"),
                                    restore, "worldmodel_sft.py")


def main(argv=None):
    args = parse_args(argv)
    agent.make_run_dir(args.out)
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    state_path = os.path.join(args.out, "train_state.pt")
    data_path = os.path.join(args.out, "dataset.jsonl")
    config = agent.run_config(args)
    if any(os.path.isfile(path) for path in (state_path, data_path, os.path.join(args.out, SELFPLAY_STATE))):
        # resuming training or self-play, or reusing the self-play data: only with the same settings
        may_change = RESUME_MAY_CHANGE + (() if os.path.isfile(state_path) else TRAINING_FLAGS)
        changed = agent.settings_changed(args.out, config, may_change,
                                         agent.default_run_config(parse_args, args, PRESETS))
        if changed:
            raise SystemExit(f"error: {args.out} holds a run that these flags cannot continue ({changed}); "
                             f"use another --out, or delete the folder to start over")
    elif foreign := agent.another_scripts_run(args.out, config, RESUME_MAY_CHANGE):
        raise SystemExit(f"error: {args.out} holds {foreign}; use another --out")
    print(json.dumps(config, indent=2, sort_keys=True), flush=True)
    agent.write_json(os.path.join(args.out, "run_config.json"), config)
    torch.manual_seed(args.seed)  # every other draw has a generator of its own, seeded from --seed
    device = agent.default_device()

    # 1. the data: a given dataset (--data) or this run's from before is read and checked first, so that
    # a bad file fails in a second rather than after a 1.5B model has loaded; else self-play, in step 2
    dataset = args.data or (data_path if os.path.isfile(data_path) else None)
    if dataset is not None:
        examples = read_dataset(dataset)
        print(f"dataset: {len(examples)} turns from {dataset}", flush=True)
        if foreign := sorted({ex["env"] for ex in examples} - {args.env}):
            raise SystemExit(f"error: {dataset} holds {', '.join(foreign)} turns, not {args.env}; "
                             f"pass the --env it was made for")
        train, heldout = split_examples(examples, dataset, args.episodes)

    # 2. the model to finetune (fp32 master weights; bf16 autocast on GPU), and self-play if there is no data
    model_path = config["model"]
    if args.model is None:
        agent.ensure_tiny_model(model_path, seed=args.seed)
    try:
        model, tokenizer = agent.load_model(model_path, device=device, dtype=torch.float32)
    except agent.ModelLoadError as e:
        raise SystemExit(f"error: {e}") from None
    if dataset is None:
        examples = self_play(args, model, tokenizer, device, data_path)
        print(f"self-play: {len(examples)} turns kept, written to {data_path}", flush=True)
        train, heldout = split_examples(examples, data_path, args.episodes)
    if args.state_targets == "shuffled":  # held-out turns keep the truth: they measure the world model
        train = shuffled_states(train, random.Random(f"{args.seed}-states"))

    # 3. tokenise: one sequence per turn, or per episode with --pack; drop what does not fit
    sequences = conversations(train) if args.pack else [[ex] for ex in train]
    heldout_sample = random.Random(f"{args.seed}-heldout").sample(heldout, min(args.heldout_loss_turns, len(heldout)))
    try:  # a response without its spans, say: the dataset's fault, said in one line
        encoded = [encode_conversation(tokenizer, turns, args.loss_spans) for turns in sequences]
        heldout_encoded = [e for e in (encode_example(tokenizer, ex, args.loss_spans) for ex in heldout_sample)
                           if len(e[0]) <= args.max_length]
    except ValueError as e:
        raise SystemExit(f"error: {dataset or data_path}: {e}") from None
    dropped = [ex["turn"] for turns, e in zip(sequences, encoded) if len(e[0]) > args.max_length for ex in turns]
    encoded = [e for e in encoded if len(e[0]) <= args.max_length]
    lengths = [len(e[0]) for e in encoded]
    if dropped:  # the long ones are the late turns: dropping them tilts the data toward early turns
        by_turn = ", ".join(f"turn {t}: {dropped.count(t)}" for t in sorted(set(dropped)))
        tqdm.write(f"warning: {len(dropped)} of {len(train)} training turns are in sequences over --max-length "
                   f"{args.max_length} and are not trained on ({by_turn})", file=sys.stderr)
    if not encoded:
        raise SystemExit(f"error: no training sequence fits in --max-length {args.max_length}" +
                         ("" if args.data else f"; the self-play data stays in {data_path}: run again with a "
                                             f"larger --max-length to train on it"))
    total_steps = planned_steps(lengths, args)
    print(f"train: {len(train)} turns in {len(sequences)} sequences ({len(sequences) - len(encoded)} over "
          f"--max-length dropped), {sum(lengths)} tokens; held out: {len(heldout)} turns; {total_steps} steps",
          flush=True)

    # 4. optimiser: AdamW, weight decay on matrices only (not norms and biases)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=tuple(args.betas), fused=device.type == "cuda")
    step, first_epoch, skip_batches, finished = 0, 0, 0, False
    if os.path.isfile(state_path):
        state = resume(state_path, model, optimizer)
        step, first_epoch, skip_batches = state["step"], state["epoch"], state["batch_in_epoch"]
        finished = first_epoch == args.epochs or (step >= total_steps and not skip_batches)  # nothing left to train
        print(f"trained to step {step} before" if finished else
              f"resuming at step {step} (epoch {first_epoch}, batch {skip_batches})", flush=True)
    # a fresh start forgets an earlier partial run; a resume, what was logged after the saved state
    agent.drop_metrics_after(metrics_path, step if step else -1, first_epoch)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))

    # 5. train
    progress = tqdm(total=total_steps, initial=step, desc="sft", disable=None)
    pad = tokenizer.pad_token_id
    for epoch in range(first_epoch, args.epochs):
        if step >= total_steps and not (epoch == first_epoch and skip_batches):
            break  # --max-train-tokens ended training, and that epoch's end is logged and saved
        batches = length_bucketed_batches(lengths, args.batch_size, random.Random(f"{args.seed}-{epoch}"))
        for b, batch in enumerate(batches):
            if epoch == first_epoch and b < skip_batches:
                continue  # done before the interruption; the order is a function of (seed, epoch)
            if step >= total_steps:  # --max-train-tokens
                break
            start = time.perf_counter()
            lr = learning_rate(step, total_steps, args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, computed, grad_norm = train_step(model, optimizer, encoded, batch, lengths, pad, device, autocast,
                                                   args.micro_batch_tokens, args.grad_clip)
            step += 1
            real = sum(lengths[i] for i in batch)
            elapsed = time.perf_counter() - start
            row = {"step": step, "epoch": epoch, "train/loss": round(loss, 5), "train/lr": lr,
                   "train/grad_norm": round(grad_norm, 4), "train/padding_share": round(1 - real / computed, 4),
                   "perf/tokens_per_s": round(computed / elapsed, 1)}  # computed, padding included: as bench_sft
            agent.append_jsonl(metrics_path, row)
            progress.update(1)
            progress.set_postfix(loss=row["train/loss"], lr=f"{lr:.2e}")
            if step % args.save_every == 0:
                save_train_state(state_path, model, optimizer, step, epoch, b + 1)
        # held-out loss and teacher-forced state accuracy, once per epoch (and when --max-train-tokens ends it)
        row = {"step": step, "epoch": epoch + 1,
               **heldout_metrics(model, heldout_encoded, pad, device, args.micro_batch_tokens, autocast)}
        agent.append_jsonl(metrics_path, row)
        tqdm.write(json.dumps(row))
        save_train_state(state_path, model, optimizer, step, epoch + 1, 0)
    progress.close()
    eval_path, model_dir = os.path.join(args.out, "eval.json"), os.path.join(args.out, "model")
    if finished and os.path.isdir(model_dir) and os.path.isfile(eval_path):
        with open(eval_path) as f:
            summary = json.load(f)
        if summary.get("eval_turns") == args.eval_turns:  # finished before, and evaluated as asked now
            print(f"finished before: {model_dir} and its evaluation", flush=True)
            print(json.dumps(summary, sort_keys=True), flush=True)
            return summary

    # 6. the final checkpoint: a Hugging Face folder, the input of rl.py. A finished run evaluated again
    # (another --eval-turns) leaves its checkpoint as it is: evaluate.py would take a rewritten one for a
    # retrained one and play it again
    if not finished or not os.path.isdir(model_dir):
        print(f"checkpoint: {agent.save_checkpoint(model, tokenizer, model_dir, run_config=config)}", flush=True)

    # 7. world-model accuracy on held-out turns, greedy
    rng = random.Random(args.seed)
    chosen = rng.sample(heldout, min(args.eval_turns, len(heldout)))
    summary, records = evaluate_world_model(model, tokenizer, chosen, args.max_response_tokens)
    summary.update(env=args.env, loss_spans=args.loss_spans, state_targets=args.state_targets, steps=step,
                   eval_turns=args.eval_turns)
    agent.write_jsonl(os.path.join(args.out, "eval_samples.jsonl"), records)
    agent.write_json(eval_path, summary)  # last: bench_learning's "stage done" mark
    print(json.dumps(summary, sort_keys=True), flush=True)  # as eval.json, and a finished run started again
    return summary


if __name__ == "__main__":
    agent.run_script(main, "Run the same command to continue: training from its last save (every --save-every "
                           "steps and at each epoch's end), self-play from the batch it was playing.")
