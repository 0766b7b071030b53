"""
Our KV-cache sampler against Hugging Face `model.generate` on the same prompts and token budget
(SPEC §9).

    python benchmarks/bench_generate.py            # CPU: the tiny preset, fp32, batch 64
    python benchmarks/bench_generate.py --batch 16 --new-tokens 64

On CPU the model is the tiny preset (freshly built). On CUDA it is additionally a randomly
initialised Qwen2.5-1.5B-shaped model in bf16, and the JSON gains `decode_ms_per_step` and
`bandwidth_fraction`: the decode step's time against the time needed just to read what it must
-- every weight once and the batch's KV cache -- at the GPU's memory bandwidth (SPEC §7), the
floor for a memory-bound step (`bandwidth_fraction_weights_only` leaves the cache out). The
sampler replays its decode step as a CUDA graph there (`cuda_graph`: whether it could be
recorded, else `cuda_graph_failure` says why); `decode_ms_per_step_eager` and
`bandwidth_fraction_eager` time the same steps launched one kernel at a time, for contrast.

Both samplers run greedy (so their outputs can be compared token for token) on the same prompts
-- real turn-3 conversations of the three envs, of different lengths, left-padded -- with the
same token budget and stop tokens; tokens/s counts the tokens each returns. (On CUDA the
1.5B-shaped model runs without stop tokens, so every row costs the full budget.)
Targets: CPU `speedup` >= 1.2 at batch 64 and `greedy_match` true; CUDA bandwidth_fraction >= 0.5.
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


def recording(policy, store):
    """The policy, also appending each batch of prompts it is given to store."""
    def recorded(prompts, episodes, budgets):
        store.append(list(prompts))
        return policy(prompts, episodes, budgets)
    return recorded


def conversation_prompts(tokenizer, batch, instruction, turn=3):
    """Realistic prompts: the conversations of all three envs as they stand before `turn`, played
    by the random-action policy in world-model mode (prompt lengths vary with env and history)."""
    prompts, seed = [], 0
    while len(prompts) < batch:
        seen = []
        policy = recording(agent.random_policy(tokenizer, random.Random(seed), "worldmodel"), seen)
        agent.rollout(policy, tokenizer, envs.ENVS[seed % 3], list(range(seed * 8, seed * 8 + 8)), 1,
                      instruction=instruction, max_turns=turn, max_response_tokens=128)
        prompts += seen[-1]
        seed += 1
    return prompts[:batch]


def hf_generate(model, prompts, new_tokens, stop_ids, pad_id):
    device = next(model.parameters()).device
    ids, mask = agent.left_pad(prompts, pad_id)
    width = ids.shape[1]
    model.generation_config.eos_token_id = list(stop_ids) or None  # no stop tokens: run to the budget
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=pad_id)
    rows = []
    for row in out[:, width:].tolist():  # HF pads a row after its stop token; cut there
        end = next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))
        rows.append(row[:end])
    return rows


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def compare(model, prompts, new_tokens, stop_ids, pad_id, device, repeats):
    """Greedy, the same budget and stop tokens; tokens/s counts the tokens each actually returns."""
    ours_fn = lambda: agent.sample(model, prompts, new_tokens, stop_ids, pad_id, temperature=0)[0]  # noqa: E731
    hf_fn = lambda: hf_generate(model, prompts, new_tokens, stop_ids, pad_id)  # noqa: E731
    ours_fn(), hf_fn()  # warm-up
    ours_s, hf_s = [], []
    for _ in range(repeats):  # interleaved, so drift on a noisy machine hits both alike
        ours, t = timed(ours_fn, device)
        ours_s.append(t)
        hf, t = timed(hf_fn, device)
        hf_s.append(t)
    tokens = sum(map(len, ours))
    # how far the two agree, row by row, up to their first differing token (in bf16 the two
    # compute in differently shaped batches, and near-ties in argmax may then go either way)
    agreed = sum(next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y)))
                 for x, y in zip(ours, hf))
    return {"ours_tokens_per_s": round(tokens / min(ours_s), 1),
            "hf_tokens_per_s": round(sum(map(len, hf)) / min(hf_s), 1),
            "speedup": round(min(hf_s) / min(ours_s), 3), "greedy_match": ours == hf,
            "greedy_prefix_share": round(agreed / max(1, sum(max(len(x), len(y)) for x, y in zip(ours, hf))), 4),
            "generated_tokens": tokens}


def peak_memory_bandwidth(device_name):
    """Bytes/s the GPU's memory can deliver: from its clock and bus width where torch reports them
    (double data rate: 2 transfers per clock), else by name."""
    props = torch.cuda.get_device_properties(0)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8
    by_name = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100": 2.0e12}
    return next((v for k, v in by_name.items() if k in device_name), 3.35e12)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64, help="prompts per batch")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per prompt")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each sampler (best is kept)")
    args = agent.help_with_defaults(parser).parse_args()
    torch.manual_seed(0)
    device = agent.default_device()
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "batch": args.batch, "new_tokens": args.new_tokens}

    with tempfile.TemporaryDirectory() as tmp:
        log("building the tiny preset model ...")
        # fp32 on CUDA too: greedy_match compares argmaxes, which bf16 rounding could flip
        model, tokenizer = agent.load_model(agent.build_tiny_model(os.path.join(tmp, "tiny")), device=device,
                                            dtype=torch.float32)
    # A fresh model's logits are nearly flat (greedy repeats one token); a wider init gives outputs
    # that vary by prompt and end (with <|im_end|>) after different numbers of tokens, as real ones do.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.1)
    prompts = conversation_prompts(tokenizer, args.batch, "short")
    stops = agent.stop_token_ids(tokenizer)
    log(f"tiny model, {device}: {args.batch} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, "
        f"at most {args.new_tokens} new tokens each")
    results.update(compare(model, prompts, args.new_tokens, stops, tokenizer.pad_token_id, device, args.repeats))
    results["prompt_tokens_mean"] = round(sum(map(len, prompts)) / len(prompts), 1)
    log(json.dumps(results))

    if device.type == "cuda":
        log("Qwen2.5-1.5B-shaped random-init model, bf16 ...")
        big = agent.random_model("qwen2.5-1.5b", device=device, dtype=torch.bfloat16)
        big_prompts = [[t % big.config.vocab_size for t in p] for p in
                       conversation_prompts(tokenizer, args.batch, "full")]
        big_results = compare(big, big_prompts, args.new_tokens, [], 0, device, args.repeats)
        # decode time per step: our sampler with a long and a short budget; the difference is
        # (long - short) decode steps, which cancels the prefill (and the graph's recording)
        times = {}
        for graph in (True, False):
            for n in (8, 8 + args.new_tokens):
                _, times[graph, n] = timed(lambda n=n, graph=graph: agent.sample(
                    big, big_prompts, n, stop_ids=[], pad_id=0, temperature=0, cuda_graph=graph), device)
        failures = sorted(agent.GRAPH_CAPTURE_FAILURES)  # any: the decode ran eagerly, this is why
        step_s, eager_step_s = ((times[graph, 8 + args.new_tokens] - times[graph, 8]) / args.new_tokens
                                for graph in (True, False))
        # what one decode step must read: every weight once, and every row's KV cache, which
        # spans the longest prompt plus the tokens so far (8 + new_tokens / 2 on average over the
        # timed steps; no stop tokens, so no row leaves the batch)
        weight_bytes = sum(p.numel() * p.element_size() for p in big.parameters())
        kv_bytes = (agent.kv_cache_bytes_per_token(big.config, 2) * len(big_prompts)
                    * (max(map(len, big_prompts)) + 8 + args.new_tokens / 2))
        peak = peak_memory_bandwidth(results["device"])
        results.update({f"qwen1.5b_{k}": v for k, v in big_results.items()})
        results["decode_ms_per_step"] = round(step_s * 1000, 3)
        results["bandwidth_fraction"] = round((weight_bytes + kv_bytes) / peak / step_s, 3)
        results["bandwidth_fraction_weights_only"] = round(weight_bytes / peak / step_s, 3)
        results["cuda_graph"] = not failures  # else the decode ran eagerly: the reason follows
        if failures:
            results["cuda_graph_failure"] = failures[0]
        results["decode_ms_per_step_eager"] = round(eager_step_s * 1000, 3)  # cuda_graph=False, for contrast
        results["bandwidth_fraction_eager"] = round((weight_bytes + kv_bytes) / peak / eager_step_s, 3)
        results["kv_cache_gb_read_per_step"] = round(kv_bytes / 1e9, 3)
        results["peak_bandwidth_tb_s"] = round(peak / 1e12, 3)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
