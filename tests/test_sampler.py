"""The hand-written KV-cache sampler against transformers' own generation and a full forward pass."""
import math
import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, Qwen2Config

import agent


def hf_greedy(model, prompts, new_tokens, stop_ids, pad_id):
    """model.generate on a left-padded batch; each row cut after its first stop token."""
    ids, mask = agent.left_pad(prompts, pad_id)
    width = ids.shape[1]
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                         eos_token_id=list(stop_ids) or None, pad_token_id=pad_id)
    rows = []
    for row in out[:, width:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))
        rows.append(row[:end])
    return rows


def varied_model(tiny_dir):
    """A fresh copy of the tiny model with wider weights: a freshly initialised model's logits are
    nearly flat and greedy decoding repeats one token, which would make the comparison vacuous."""
    model, tokenizer = agent.load_model(tiny_dir, device="cpu")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.1)
    return model, tokenizer


def gqa_model():
    """A random-init Qwen2 with grouped-query attention (4 query heads share 1 key/value head)."""
    config = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=512,
                         initializer_range=0.15, tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(2)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def random_prompts(n, vocab, lengths, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.choice(lengths))] for _ in range(n)]


def test_greedy_matches_generate_tiny_model(tiny_dir, monkeypatch):
    model, tokenizer = varied_model(tiny_dir)
    stops = agent.stop_token_ids(tokenizer)
    prompts = random_prompts(12, len(tokenizer), [3, 17, 40, 64, 90])
    monkeypatch.setattr(agent, "PREFILL_TOKENS", 150)  # several prefill groups, not one
    ours, _ = agent.sample(model, prompts, 40, stops, tokenizer.pad_token_id, temperature=0)
    theirs = hf_greedy(model, prompts, 40, stops, tokenizer.pad_token_id)
    assert ours == theirs
    assert len({tuple(o[:5]) for o in ours}) > 6, "outputs should differ between prompts"


def test_greedy_matches_generate_gqa_model_with_rows_stopping_at_different_times(monkeypatch):
    model = gqa_model()
    prompts = random_prompts(10, 300, [5, 12, 33, 50])
    free, _ = agent.sample(model, prompts, 30, [], 0, temperature=0)
    # stop on tokens that the rows emit at different steps, so rows finish early and are dropped
    stops = sorted({row[k] for k, row in zip((3, 8, 15, 22), free)})
    monkeypatch.setattr(agent, "PREFILL_TOKENS", 100)
    ours, _ = agent.sample(model, prompts, 30, stops, 0, temperature=0)
    theirs = hf_greedy(model, prompts, 30, stops, 0)
    assert ours == theirs
    lengths = [len(o) for o in ours]
    assert min(lengths) < 30 and max(lengths) == 30 and len(set(lengths)) > 2


def test_sampled_logprobs_match_a_full_forward(tiny_dir):
    model, tokenizer = varied_model(tiny_dir)
    prompts = random_prompts(6, len(tokenizer), [4, 20, 45])
    for kwargs in ({"temperature": 1.0}, {"temperature": 0.7, "top_k": 20, "top_p": 0.9}):
        generator = torch.Generator().manual_seed(0)
        tokens, logprobs = agent.sample(model, prompts, 25, agent.stop_token_ids(tokenizer), tokenizer.pad_token_id,
                                        generator=generator, **kwargs)
        for prompt, new, lps in zip(prompts, tokens, logprobs):
            assert len(new) == len(lps) > 0
            sequence = torch.tensor([prompt + new])
            with torch.no_grad():
                logits = model(sequence).logits[0, len(prompt) - 1:-1].float()  # (n, V): predicts each new token
            logits = logits / kwargs["temperature"]  # the distribution drawn from, before top-k / top-p
            expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(new)[:, None]).squeeze(-1)
            assert torch.allclose(torch.tensor(lps), expected, atol=1e-4)


def test_sampling_is_reproducible_and_respects_budgets(tiny_dir):
    model, tokenizer = varied_model(tiny_dir)
    prompts = random_prompts(5, len(tokenizer), [6, 30])
    runs = [agent.sample(model, prompts, [3, 10, 1, 7, 20], [], tokenizer.pad_token_id,
                         generator=torch.Generator().manual_seed(7))[0] for _ in range(2)]
    assert runs[0] == runs[1]
    assert [len(r) for r in runs[0]] == [3, 10, 1, 7, 20]
    other = agent.sample(model, prompts, [3, 10, 1, 7, 20], [], tokenizer.pad_token_id,
                         generator=torch.Generator().manual_seed(8))[0]
    assert other != runs[0]


def test_top_k_one_is_greedy_and_top_p_keeps_the_top_token(tiny_dir):
    model, tokenizer = varied_model(tiny_dir)
    prompts = random_prompts(4, len(tokenizer), [8, 25])
    greedy, _ = agent.sample(model, prompts, 12, [], tokenizer.pad_token_id, temperature=0)
    top1, _ = agent.sample(model, prompts, 12, [], tokenizer.pad_token_id, top_k=1,
                           generator=torch.Generator().manual_seed(0))
    nucleus, _ = agent.sample(model, prompts, 12, [], tokenizer.pad_token_id, top_p=1e-6,
                              generator=torch.Generator().manual_seed(0))
    assert greedy == top1 == nucleus


@pytest.mark.parametrize("kwargs", [{"top_k": 5}, {"top_p": 0.5}, {"top_p": 0.5, "temperature": 0.5}])
def test_top_k_and_top_p_draw_only_from_their_set_and_not_only_its_top(tiny_dir, kwargs):
    model, tokenizer = varied_model(tiny_dir)
    (prompt,) = random_prompts(1, len(tokenizer), [12])
    temperature = kwargs.get("temperature", 1.0)  # the set is the tempered distribution's
    tokens, _ = agent.sample(model, [prompt] * 64, 3, [], tokenizer.pad_token_id,
                             generator=torch.Generator().manual_seed(0), **{"temperature": 1.0, **kwargs})
    distinct_first = set()
    for new in tokens:
        with torch.no_grad():
            logits = model(torch.tensor([prompt + new])).logits[0, len(prompt) - 1:-1].float()  # (3, V)
        probs = (logits / temperature).softmax(-1)
        for position, token in enumerate(new):
            order = probs[position].argsort(descending=True)
            rank = (order == token).nonzero().item()
            if "top_k" in kwargs:
                assert rank < kwargs["top_k"]
            else:  # the smallest set of top tokens whose probability reaches top_p
                before = probs[position][order[:rank]].sum().item()
                assert before < kwargs["top_p"]
        distinct_first.add(new[0])
    assert len(distinct_first) > 1  # it samples within the set, not just its top token


def test_finished_rows_leave_the_batch(tiny_dir):
    model, tokenizer = varied_model(tiny_dir)
    prompts = random_prompts(8, len(tokenizer), [5, 9, 14])
    batch_sizes = []
    hook = model.register_forward_pre_hook(lambda module, args, kw: batch_sizes.append(kw["input_ids"].shape[0]),
                                           with_kwargs=True)
    try:
        tokens, _ = agent.sample(model, prompts, [1, 1, 1, 1, 1, 12, 12, 12], [], tokenizer.pad_token_id,
                                 temperature=0)
    finally:
        hook.remove()
    assert [len(t) for t in tokens] == [1] * 5 + [12] * 3
    decode = batch_sizes[-11:]  # the decode steps after the first token (prefill comes before)
    assert decode == [3] * 11  # the 5 rows that finished after one token cost nothing more
    # and dropping rows changed nothing: the same tokens as generating all 8 to the end
    full, _ = agent.sample(model, prompts, 12, [], tokenizer.pad_token_id, temperature=0)
    assert all(f[:len(t)] == t for f, t in zip(full, tokens))


def test_sampler_rejects_bad_arguments(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="at least one token"):
        agent.sample(model, [[1, 2], []], 4, [], 0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        agent.sample(model, [[1, 2]], 0, [], 0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        agent.sample(model, [[1, 2], [3]], [4], [], 0)
    for bad in ({"temperature": -1.0}, {"temperature": 1e-40}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1}):
        with pytest.raises(ValueError, match="need temperature 0"):  # not an error deep in torch.multinomial
            agent.sample(model, [[1, 2]], 4, [], 0, **bad)
    assert agent.sample(model, [], 4, [], 0) == ([], [])


# Operations that read a value back to the host. On a GPU each one waits for the device, and
# none can be recorded in a CUDA graph (nor can making a tensor from host data).
HOST_READS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "equal", "masked_select", "_unique2",
              "unique_consecutive", "unique_dim", "repeat_interleave", "lift_fresh"}


class OpsSeen(TorchDispatchMode):
    """Records the name of every aten operation run inside it."""
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_the_decode_step_can_be_recorded_as_a_cuda_graph(monkeypatch):
    """On a GPU the sampler records its decode step once as a CUDA graph and replays it. Here,
    on CPU, the graph path runs with a stand-in for the recording that replays the step by
    running it again, watching its operations: it must give the tokens transformers' generate
    gives (the step attends over the whole cache, its unwritten columns masked), be recorded
    again for a smaller batch after rows leave, and read nothing back to the host."""
    seen, recordings = OpsSeen(), []

    def stand_in(warm_up, step, device):
        warm_up()
        recordings.append(device)

        def replay():
            with seen:
                step()
        return replay
    monkeypatch.setattr(agent, "capture_graph", stand_in)
    model = gqa_model()
    prompts = random_prompts(10, 300, [5, 12, 33, 50])
    free, _ = agent.sample(model, prompts, 30, [], 0, temperature=0, cuda_graph=False)
    # rows end at different steps; with graphs rows leave once half the batch has finished
    stops = sorted({row[k] for k, row in zip((3, 5, 8, 11, 15, 22), free)})
    ours, _ = agent.sample(model, prompts, 30, stops, 0, temperature=0, cuda_graph=True)
    assert ours == hf_greedy(model, prompts, 30, stops, 0)
    assert len(recordings) >= 2  # once at the start, again once finished rows left the batch
    assert seen.names and not seen.names & HOST_READS, sorted(seen.names & HOST_READS)
    with seen:  # and the watch sees a host read where there is one
        torch.ones(2).sum().item()
    assert "_local_scalar_dense" in seen.names


def test_cudnn_attention_is_off_once_agent_is_imported():
    # its plan per shape would cost every step of SFT, PPO and the decode on a GPU (agent.py, top)
    assert not torch.backends.cuda.cudnn_sdp_enabled()


def test_sampler_needs_sdpa_attention():
    model = gqa_model()
    model.config._attn_implementation = "eager"
    with pytest.raises(ValueError, match="SDPA"):
        agent.sample(model, [[1, 2]], 4, [], 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_decoding_gives_the_eager_tokens(monkeypatch):
    recorded, capture_graph = [], agent.capture_graph

    def counted(warm_up, step, device):  # the real recording, counted when it succeeds
        replay = capture_graph(warm_up, step, device)
        recorded.append(replay is not None)
        return replay
    monkeypatch.setattr(agent, "capture_graph", counted)
    model = gqa_model().cuda()
    prompts = random_prompts(16, 300, [5, 12, 33, 50])
    free, _ = agent.sample(model, prompts, 30, [], 0, temperature=0, cuda_graph=False)
    stops = sorted({row[k] for k, row in zip((3, 5, 8, 11, 15, 22), free)})
    graphed, _ = agent.sample(model, prompts, 30, stops, 0, temperature=0, cuda_graph=True)
    eager, _ = agent.sample(model, prompts, 30, stops, 0, temperature=0, cuda_graph=False)
    assert len(recorded) >= 2 and all(recorded), agent.GRAPH_CAPTURE_FAILURES  # again after rows left
    assert graphed == eager
    # in bf16, as the rollout runs at paper scale (tokens may differ from eager's at near-ties)
    recorded.clear()
    tokens, logprobs = agent.sample(model.bfloat16(), prompts, 30, stops, 0,
                                    generator=torch.Generator("cuda").manual_seed(0), cuda_graph=True)
    assert recorded and all(recorded), agent.GRAPH_CAPTURE_FAILURES
    assert all(1 <= len(t) <= 30 for t in tokens)
    # no NaN from the left-padded rows' pad queries (SPEC §10) reaches a log-prob
    assert all(math.isfinite(x) and x <= 0 for row in logprobs for x in row)
