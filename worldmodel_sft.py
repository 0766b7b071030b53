"""
Stage 1 of SPA: self-play world-model SFT (SPEC §4).

The model plays the environment; each of its turns is rewritten so that <observation> holds the
true current state (grid + coordinates) and <prediction> the true state after the turn's
actions (grid); the model is then finetuned on those turns with cross entropy on the response.

    python worldmodel_sft.py --env frozenlake --preset tiny --out runs/sft-frozenlake    # CPU, minutes
    python worldmodel_sft.py --env sokoban --out runs/sft-sokoban                        # Qwen2.5-1.5B-Instruct, one GPU
    python worldmodel_sft.py --env sokoban --data runs/sft-sokoban/dataset.jsonl --loss-spans no-states --out runs/ablation

The run folder gets dataset.jsonl (every example, inspectable), metrics.jsonl, run_config.json,
train_state.pt (resume: run the same command again), model/ (the final Hugging Face checkpoint,
the input of rl.py) and eval.json (world-model accuracy on held-out turns), whose numbers are also
the last line printed.

Where this departs from the paper's recipe, and why:
- The tiny preset plays with a random-action behaviour policy (a fresh model cannot write the
  format); it states its planned actions in its thoughts before the prediction, so the
  prediction is a function of what the model has written so far. At paper scale the behaviour
  policy is the model itself and its own thoughts are kept.
- Held-out turns are whole puzzles (every 5th seed), not random turns, so no held-out puzzle was
  seen in training.
- States in the rewritten responses stand on lines of their own (see agent.replace_states).
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
                  instruction="full", max_response_tokens=400, lr=1e-4, batch_size=16, epochs=5,
                  micro_batch_tokens=16384, eval_turns=256),
    # a laptop CPU in minutes: a fresh tiny model, the random behaviour policy, a higher lr
    "tiny": dict(model=None, behaviour="random", env_groups=64, group_size=8, batches=2, instruction="short",
                 max_response_tokens=agent.TINY_MAX_RESPONSE_TOKENS, lr=2e-3, batch_size=16, epochs=5,
                 micro_batch_tokens=8192, eval_turns=200),
}
LOSS_SPANS = ("all", "states", "no-states")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # what to learn
    parser.add_argument("--env", required=True, choices=envs.ENVS, help="environment")
    parser.add_argument("--preset", default="paper", choices=PRESETS, help="defaults for the flags below")
    parser.add_argument("--model", help="HF id or folder to finetune (tiny preset: a fresh tiny model)")
    parser.add_argument("--out", required=True, help="run folder (created; an existing run there is resumed)")
    parser.add_argument("--seed", type=int, default=0, help="seed for data order, sampling and the tiny model")
    # self-play data
    parser.add_argument("--data", help="train on this dataset.jsonl instead of playing")
    parser.add_argument("--behaviour", choices=("model", "random"), help="who plays: the model or random actions")
    parser.add_argument("--env-groups", type=int, help="puzzles per self-play batch")
    parser.add_argument("--group-size", type=int, help="episodes per puzzle")
    parser.add_argument("--batches", type=int, help="self-play batches (seeds advance each batch)")
    parser.add_argument("--instruction", choices=("full", "short"), help="wording of the env instruction")
    parser.add_argument("--max-response-tokens", type=int, help="token budget per turn")
    parser.add_argument("--train-seed-start", type=int, default=10_000, help="first puzzle seed (SPEC §3)")
    # SFT
    parser.add_argument("--loss-spans", default="all", choices=LOSS_SPANS,
                        help="response tokens that carry loss: all, only the states, or all but the states")
    parser.add_argument("--epochs", type=int, help="passes over the training turns")
    parser.add_argument("--batch-size", type=int, help="examples per optimiser step")
    parser.add_argument("--micro-batch-tokens", type=int, help="padded tokens per forward/backward (memory)")
    parser.add_argument("--lr", type=float, help="peak learning rate")
    parser.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine schedule floor, times --lr")
    parser.add_argument("--warmup", type=float, default=0.1, help="warm-up, fraction of all steps")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (matrices only)")
    parser.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.95), help="AdamW betas")
    parser.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip")
    parser.add_argument("--max-length", type=int, default=2048, help="longer examples are dropped")
    parser.add_argument("--save-every", type=int, default=100, help="optimiser steps between resumable saves")
    # evaluation
    parser.add_argument("--eval-turns", type=int, help="held-out turns evaluated by greedy generation")
    args = parser.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.epochs < 1 or args.batch_size < 1 or args.lr <= 0 or not 0 <= args.warmup < 1:
        parser.error("need --epochs >= 1, --batch-size >= 1, --lr > 0 and 0 <= --warmup < 1")
    if args.data is not None and not os.path.isfile(args.data):
        parser.error(f"--data {args.data}: no such file")
    return args


# -----------------------------------------------------------------------------
# Self-play data: play, rewrite each turn with the true states, one example per kept turn

def examples_from_episodes(episodes, heldout_every=5):
    """One example per assistant turn whose response has the world-model structure.

    The prompt is the conversation up to that turn, with earlier kept turns also rewritten (the
    model learns from conversations whose states are all true); the target is the response with
    <observation> = the true state before the turn (coordinates rendering) and <prediction> = the
    true state after the actions it ran (grid rendering). Turns that break the structure are
    dropped but stay in later prompts as they were written. Every heldout_every-th puzzle is held
    out (split "heldout"), the rest are "train".
    """
    examples = []
    for ep in episodes:
        messages = list(ep.messages[:2])  # system, first user message
        history = []  # the actions each earlier turn ran, to rebuild the env at this turn
        for k, turn in enumerate(ep.turns):
            parsed = agent.parse_response(turn["response"], "worldmodel")
            if parsed["observation"] is not None and parsed["prediction"] is not None:
                target = agent.replace_states(turn["response"][len(agent.THINK_START):], turn["coords_before"],
                                              turn["state_after"])
                examples.append({
                    "env": ep.env_name, "seed": ep.seed, "turn": k + 1,
                    "split": "heldout" if ep.group % heldout_every == heldout_every - 1 else "train",
                    "messages": [dict(m) for m in messages], "response": target,
                    "observation": turn["coords_before"], "prediction": turn["state_after"],
                    "actions": turn["actions"], "executed": turn["executed"], "history": [list(h) for h in history],
                    "env_overrides": ep.env_overrides,
                })
                assistant = agent.THINK_START + target
            else:
                assistant = turn["response"]
            messages.append({"role": "assistant", "content": assistant})
            if 2 * k + 3 < len(ep.messages):  # the next user message, if the episode went on
                messages.append(ep.messages[2 * k + 3])
            history.append(turn["executed"])
    return examples


REQUIRED_KEYS = ("env", "seed", "turn", "split", "messages", "response", "observation", "prediction", "history")


def read_dataset(path):
    """Examples from a dataset.jsonl, with a clear error for a missing, corrupt or foreign file."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: dataset {path!r} does not exist")
    examples = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                example = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"error: {path}:{number} is not valid JSON ({e.msg}); the dataset is corrupt") from None
            missing = [k for k in REQUIRED_KEYS if not isinstance(example, dict) or k not in example]
            if missing:
                raise SystemExit(f"error: {path}:{number} lacks {', '.join(missing)}; not a dataset written by this script")
            if example["env"] not in envs.ENVS or example["split"] not in ("train", "heldout"):
                raise SystemExit(f"error: {path}:{number}: unknown env {example['env']!r} or split {example['split']!r}")
            examples.append(example)
    if not examples:
        raise SystemExit(f"error: dataset {path!r} is empty")
    return examples


def write_jsonl_atomic(path, rows):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# Tokenisation and loss masks

def encode_example(tokenizer, example, loss_spans):
    """(input_ids, labels) for one example: the prompt (chat template, ending in <think>) then the
    target response and <|im_end|>. labels are -100 except on the response tokens that carry loss:
    all of them, only those inside the <observation>/<prediction> contents ("states"), or all
    but those ("no-states"). Tokens are classified by their character offsets."""
    prompt = agent.prompt_text(tokenizer, example["messages"])
    target = example["response"] + "<|im_end|>"
    encoded = tokenizer(prompt + target, add_special_tokens=False, return_offsets_mapping=True)
    state_spans = []
    for open_tag, close_tag in (("<observation>", "</observation>"), ("<prediction>", "</prediction>")):
        start = target.find(open_tag)
        end = target.find(close_tag, start)
        if start < 0 or end < 0:
            raise ValueError(f"example {example['env']}/{example['seed']}/turn {example['turn']} has no {open_tag} span")
        state_spans.append((len(prompt) + start + len(open_tag), len(prompt) + end))
    labels = []
    for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"]):
        in_response = start >= len(prompt)
        in_state = any(s <= start and end <= e for s, e in state_spans) and end > start
        carries_loss = in_response and {"all": True, "states": in_state, "no-states": not in_state}[loss_spans]
        labels.append(token if carries_loss else -100)
    return encoded["input_ids"], labels


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


def micro_batches(batch, lengths, max_tokens):
    """Split a batch (sorted by length) into pieces of at most max_tokens padded tokens."""
    pieces, piece = [], []
    for i in sorted(batch, key=lambda i: lengths[i]):
        if piece and (len(piece) + 1) * lengths[i] > max_tokens:
            pieces.append(piece)
            piece = []
        piece.append(i)
    return pieces + [piece]


def collate(encoded, indices, pad_id, device):
    """Right-padded (input_ids, attention_mask, labels), each (b, T)."""
    width = max(len(encoded[i][0]) for i in indices)
    ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(indices), width), dtype=torch.long)
    labels = torch.full((len(indices), width), -100, dtype=torch.long)
    for row, i in enumerate(indices):
        tokens, target = encoded[i]
        ids[row, :len(tokens)] = torch.tensor(tokens)
        mask[row, :len(tokens)] = 1
        labels[row, :len(target)] = torch.tensor(target)
    return ids.to(device), mask.to(device), labels.to(device)


def token_losses(model, ids, mask, labels):
    """Summed cross entropy over the label tokens and their count (the next-token shift is here)."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # (b, T-1, V)
    targets = labels[:, 1:]  # (b, T-1)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                             ignore_index=-100, reduction="sum")
    return loss, (targets != -100).sum()


def learning_rate(step, total_steps, args):
    """Linear warm-up over the first args.warmup of the steps, then cosine down to min_lr_ratio."""
    warmup = max(1, int(args.warmup * total_steps))
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# -----------------------------------------------------------------------------
# World-model evaluation on held-out turns

def env_at_turn(example, render="coords"):
    """The env as it stood at the start of the example's turn: reset to its seed, then replay the
    actions earlier turns ran (same seed and actions give the same slips)."""
    env = envs.make(example["env"], **{**example.get("env_overrides", {}), "render_mode": render})
    env.reset(example["seed"])
    for turn_actions in example["history"]:
        for action in turn_actions:
            env.step(action)
    if env.render("coords") != example["observation"]:
        raise ValueError(f"dataset example {example['env']}/{example['seed']}/turn {example['turn']} does not "
                         f"replay to its recorded state; was it made with other env settings?")
    return env


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
        prompts = [tokenizer.encode(agent.prompt_text(tokenizer, ex["messages"]), add_special_tokens=False)
                   for ex in chunk]
        outputs, _ = agent.sample(model, prompts, max_response_tokens, stops, tokenizer.pad_token_id, temperature=0)
        for ex, tokens in zip(chunk, outputs):
            if tokens and tokens[-1] in stops:
                tokens = tokens[:-1]
            response = agent.THINK_START + tokenizer.decode(tokens)
            parsed = agent.parse_response(response, "worldmodel")
            outcomes = envs.next_grid_distribution(env_at_turn(ex), parsed["actions"])
            records.append({
                "env": ex["env"], "seed": ex["seed"], "turn": ex["turn"], "response": response,
                "format_valid": float(parsed["format_valid"]),
                "observation_exact": float(parsed["observation"] == ex["observation"]),
                "prediction_exact": outcomes.get(parsed["prediction"], 0.0) if parsed["format_valid"] else 0.0,
                "prediction_bayes": max(outcomes.values()),
            })
    keys = ("observation_exact", "prediction_exact", "prediction_bayes", "format_valid")
    summary = {k: round(sum(r[k] for r in records) / max(1, len(records)), 4) for k in keys}
    summary["heldout_turns"] = len(records)
    return summary, records


# -----------------------------------------------------------------------------
# Checkpoints

def save_train_state(path, model, optimizer, step, epoch, batch_in_epoch):
    """Everything needed to continue exactly where training stopped, written atomically. (The data
    order is a function of the seed and the epoch, so it needs no saved state.)"""
    tmp = path + ".tmp"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "epoch": epoch,
                "batch_in_epoch": batch_in_epoch, "torch_rng": torch.get_rng_state()}, tmp)
    os.replace(tmp, path)


def load_train_state(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or foreign file: say so, do not train from a half state
        raise SystemExit(f"error: cannot resume from {path} ({type(e).__name__}: {e}); "
                         f"delete it to start over") from None


def log_metrics(path, row):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    config = vars(args).copy()
    print(json.dumps(config, indent=2, sort_keys=True), flush=True)
    with open(os.path.join(args.out, "run_config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = agent.default_device()
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    state_path = os.path.join(args.out, "train_state.pt")
    data_path = os.path.join(args.out, "dataset.jsonl")

    # 1. the model to finetune (fp32 master weights; bf16 autocast on GPU)
    model_path = args.model
    if model_path is None:
        model_path = agent.ensure_tiny_model(os.path.join(args.out, "base_model"), seed=args.seed)
        config["model"] = model_path
        with open(os.path.join(args.out, "run_config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
    try:
        model, tokenizer = agent.load_model(model_path, device=device, dtype=torch.float32)
    except agent.ModelLoadError as e:
        raise SystemExit(f"error: {e}") from None

    # 2. self-play data (or a given / earlier dataset)
    if args.data is not None or os.path.isfile(data_path):
        examples = read_dataset(args.data or data_path)
        print(f"dataset: {len(examples)} turns from {args.data or data_path}", flush=True)
    else:
        rng = random.Random(args.seed)
        generator = torch.Generator(device=device).manual_seed(args.seed)
        policy = (agent.random_policy(tokenizer, rng, "worldmodel") if args.behaviour == "random" else
                  agent.model_policy(model, tokenizer, temperature=1.0, generator=generator))
        examples = []
        for batch in tqdm(range(args.batches), desc="self-play", disable=None):
            first = args.train_seed_start + batch * args.env_groups
            episodes = agent.rollout(policy, tokenizer, args.env, list(range(first, first + args.env_groups)),
                                     args.group_size, mode="worldmodel", render="coords",
                                     instruction=args.instruction, max_response_tokens=args.max_response_tokens)
            examples += examples_from_episodes(episodes)
        write_jsonl_atomic(data_path, examples)
        print(f"self-play: {len(examples)} turns kept, written to {data_path}", flush=True)
    train = [ex for ex in examples if ex["split"] == "train"]
    heldout = [ex for ex in examples if ex["split"] == "heldout"]
    if not train:
        raise SystemExit("error: no training turns (every turn broke the format?)")

    # 3. tokenise; drop what does not fit
    encoded = [encode_example(tokenizer, ex, args.loss_spans) for ex in train]
    keep = [i for i, (ids, _) in enumerate(encoded) if len(ids) <= args.max_length]
    encoded = [encoded[i] for i in keep]
    lengths = [len(ids) for ids, _ in encoded]
    heldout_encoded = [e for e in (encode_example(tokenizer, ex, args.loss_spans) for ex in heldout)
                       if len(e[0]) <= args.max_length]
    steps_per_epoch = math.ceil(len(encoded) / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    print(f"train: {len(encoded)} turns ({len(train) - len(encoded)} over --max-length dropped), "
          f"{sum(lengths)} tokens; held out: {len(heldout)} turns; {total_steps} steps", flush=True)

    # 4. optimiser: AdamW, weight decay on matrices only (not norms and biases)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=tuple(args.betas), fused=device.type == "cuda")
    step, first_epoch, skip_batches = 0, 0, 0
    if os.path.isfile(state_path):
        state = load_train_state(state_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, first_epoch, skip_batches = state["step"], state["epoch"], state["batch_in_epoch"]
        torch.set_rng_state(state["torch_rng"])
        print(f"resuming at step {step} (epoch {first_epoch}, batch {skip_batches})", flush=True)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    # 5. train
    progress = tqdm(total=total_steps, initial=step, desc="sft", disable=None)
    pad = tokenizer.pad_token_id
    for epoch in range(first_epoch, args.epochs):
        batches = length_bucketed_batches(lengths, args.batch_size, random.Random(f"{args.seed}-{epoch}"))
        for b, batch in enumerate(batches):
            if epoch == first_epoch and b < skip_batches:
                continue  # done before the interruption; the order is a function of (seed, epoch)
            model.train()
            start = time.perf_counter()
            lr = learning_rate(step, total_steps, args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            pieces = micro_batches(batch, lengths, args.micro_batch_tokens)
            n_loss_tokens = sum(sum(t != -100 for t in encoded[i][1][1:]) for i in batch)
            total_loss, computed = 0.0, 0
            for piece in pieces:  # gradient accumulation: every piece's loss is a share of the batch mean
                ids, mask, labels = collate(encoded, piece, pad, device)
                with autocast:
                    loss_sum, _ = token_losses(model, ids, mask, labels)
                (loss_sum / max(1, n_loss_tokens)).backward()
                total_loss += loss_sum.item()
                computed += ids.numel()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            real = sum(lengths[i] for i in batch)
            elapsed = time.perf_counter() - start
            row = {"step": step, "epoch": epoch, "train/loss": round(total_loss / max(1, n_loss_tokens), 5),
                   "train/lr": lr, "train/grad_norm": round(float(grad_norm), 4),
                   "train/padding_share": round(1 - real / computed, 4), "perf/tokens_per_s": round(computed / elapsed, 1)}
            log_metrics(metrics_path, row)
            progress.update(1)
            progress.set_postfix(loss=row["train/loss"], lr=f"{lr:.2e}")
            if step % args.save_every == 0:
                save_train_state(state_path, model, optimizer, step, epoch, b + 1)
        # held-out loss, once per epoch
        model.eval()
        loss_sum, count = 0.0, 0
        heldout_lengths = [len(ids) for ids, _ in heldout_encoded]
        with torch.no_grad(), autocast:
            for piece in micro_batches(range(len(heldout_encoded)), heldout_lengths, args.micro_batch_tokens):
                if piece:
                    ids, mask, labels = collate(heldout_encoded, piece, pad, device)
                    s, c = token_losses(model, ids, mask, labels)
                    loss_sum, count = loss_sum + s.item(), count + int(c)
        row = {"step": step, "epoch": epoch + 1, "heldout/loss": round(loss_sum / max(1, count), 5)}
        log_metrics(metrics_path, row)
        tqdm.write(json.dumps(row))
        save_train_state(state_path, model, optimizer, step, epoch + 1, 0)
    progress.close()

    # 6. the final checkpoint: a Hugging Face folder, the input of rl.py
    final = agent.save_checkpoint(model, tokenizer, os.path.join(args.out, "model"), run_config=config)
    print(f"checkpoint: {final}", flush=True)

    # 7. world-model accuracy on held-out turns, greedy
    rng = random.Random(args.seed)
    chosen = rng.sample(heldout, min(args.eval_turns, len(heldout))) if heldout else []
    summary, records = evaluate_world_model(model, tokenizer, chosen, args.max_response_tokens)
    summary.update(env=args.env, loss_spans=args.loss_spans, steps=step)
    with open(os.path.join(args.out, "eval.json"), "w") as f:
        json.dump(summary, f, indent=2)
    write_jsonl_atomic(os.path.join(args.out, "eval_samples.jsonl"), records)
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
