"""
Throughput of the world-model SFT step (SPEC §9): the real training step of worldmodel_sft.py --
whole conversations, length-bucketed batches, micro-batches with gradient accumulation, AdamW --
on self-play data of the random-action policy.

    python benchmarks/bench_sft.py                 # CPU: the tiny preset, FrozenLake and Sokoban data

JSON figures:
  tokens_per_s   -- computed positions (padding included) per second
  padding_share  -- share of computed positions that are padding (target < 0.15, from bucketing)
On CUDA it also trains a randomly initialised Qwen2.5-1.5B-shaped model (bf16 autocast, fp32
master weights) on the same token ids and reports qwen1.5b_tokens_per_s and mfu: model FLOPs
(6 x non-embedding parameters per real token -- padding excluded -- plus the output layer on the
response tokens) per second
against the GPU's dense bf16 peak (target >= 0.40 on an H100).
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
import worldmodel_sft as sft  # noqa: E402


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def self_play_sequences(tokenizer, episodes_per_env, seed):
    encoded = []
    for env_name in ("frozenlake", "sokoban"):
        episodes = agent.rollout(agent.random_policy(tokenizer, random.Random(seed), "worldmodel"), tokenizer,
                                 env_name, list(range(10_000, 10_000 + episodes_per_env // 8)), 8,
                                 instruction="short", max_response_tokens=agent.TINY_MAX_RESPONSE_TOKENS)
        encoded += [sft.encode_conversation(tokenizer, turns, "all")
                    for turns in sft.conversations(sft.examples_from_episodes(episodes))]
    return encoded


def measure(model, encoded, steps, batch_size, micro_batch_tokens, device, pad_id):
    """Run `steps` training steps after one warm-up step; (positions/s, padding share, response tokens/s)."""
    lengths = [len(e[0]) for e in encoded]
    batches = sft.length_bucketed_batches(lengths, batch_size, random.Random(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    run = lambda batch: sft.train_step(model, optimizer, encoded, batch, lengths, pad_id, device, autocast,  # noqa: E731
                                       micro_batch_tokens, 1.0)
    run(batches[0])
    if device.type == "cuda":
        torch.cuda.synchronize()
    computed = real = response = 0
    start = time.perf_counter()
    for batch in batches[1:steps + 1]:
        computed += run(batch)[1]
        real += sum(lengths[i] for i in batch)
        response += sum(sum(k != sft.PROMPT for k in encoded[i][2]) for i in batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return computed / elapsed, 1 - real / computed, response / elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=512, help="self-play episodes per env")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps")
    parser.add_argument("--batch-size", type=int, default=16, help="conversations per step")
    args = agent.help_with_defaults(parser).parse_args()
    torch.manual_seed(0)
    device = agent.default_device()
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer = agent.load_model(agent.build_tiny_model(os.path.join(tmp, "tiny")), device=device,
                                            dtype=torch.float32)
    encoded = self_play_sequences(tokenizer, args.episodes, seed=0)
    log(f"{len(encoded)} conversations, {sum(len(e[0]) for e in encoded)} tokens")
    tokens_per_s, padding, _ = measure(model, encoded, args.steps, args.batch_size, 8192, device,
                                       tokenizer.pad_token_id)
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "tokens_per_s": round(tokens_per_s, 1), "padding_share": round(padding, 4),
               "steps": args.steps, "batch_size": args.batch_size}
    log(json.dumps(results))

    if device.type == "cuda":
        log("Qwen2.5-1.5B-shaped random-init model, fp32 weights, bf16 autocast ...")
        del model
        big = agent.random_model("qwen2.5-1.5b", device=device, dtype=torch.float32)
        tokens_per_s, padding, response_per_s = measure(big, encoded, args.steps, args.batch_size, 16384, device, 0)
        config = big.config
        embedding = config.vocab_size * config.hidden_size
        non_embedding = sum(p.numel() for p in big.parameters()) - embedding  # tied: one embedding matrix
        # useful FLOPs only: the padding (padding_share of the computed positions) does not count
        flops = 6 * non_embedding * tokens_per_s * (1 - padding) + 6 * embedding * response_per_s
        peak = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16, first match
        peak_flops = next((v for k, v in peak.items() if k in results["device"]), 989e12)
        results.update({"qwen1.5b_tokens_per_s": round(tokens_per_s, 1), "qwen1.5b_padding_share": round(padding, 4),
                        "mfu": round(flops / peak_flops, 3), "peak_tflops_assumed": peak_flops / 1e12,
                        "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2)})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
