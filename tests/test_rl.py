"""rl.py: GAE, the PPO losses, log-prob recomputation, group filtering, an update's direction,
resume, data parallelism and bad input."""
import copy
import json
import math
import os
import random
import shutil
import socket
import subprocess
import sys

import pytest
import torch

import agent
import envs
import rl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -----------------------------------------------------------------------------
# GAE

def reference_gae(rewards, values, mask, gamma, lam):
    """The textbook recursion, one sequence at a time, on the list of masked positions."""
    advantages = torch.zeros_like(values)
    for row in range(values.shape[0]):
        steps = [t for t in range(values.shape[1]) if mask[row, t]]
        running = 0.0
        for i in reversed(range(len(steps))):
            t = steps[i]
            next_value = values[row, steps[i + 1]] if i + 1 < len(steps) else 0.0
            delta = rewards[row, t] + gamma * next_value - values[row, t]
            running = delta + gamma * lam * running
            advantages[row, t] = running
    return advantages, (advantages + values) * mask


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0), (0.5, 1.0)])
def test_gae_matches_a_reference_loop_on_multi_turn_masks(gamma, lam):
    g = torch.Generator().manual_seed(0)
    b, T = 6, 40
    values = torch.randn(b, T, generator=g)
    mask = torch.zeros(b, T)
    for row in range(b):  # several assistant runs with prompt gaps between them, then padding
        t = int(torch.randint(0, 4, (1,), generator=g))
        while t < T - 8:
            run = int(torch.randint(1, 6, (1,), generator=g))
            mask[row, t:t + run] = 1
            t += run + int(torch.randint(1, 5, (1,), generator=g))
    rewards = torch.randn(b, T, generator=g) * mask
    advantages, returns = rl.gae(rewards, values, mask, gamma, lam)
    expected_advantages, expected_returns = reference_gae(rewards, values, mask, gamma, lam)
    assert torch.allclose(advantages, expected_advantages, atol=1e-5)
    assert torch.allclose(returns, expected_returns, atol=1e-5)
    assert (advantages[mask == 0] == 0).all()


def test_gae_with_gamma_and_lambda_one_gives_the_return_minus_the_value():
    rewards = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0, 0.0]])
    mask = torch.tensor([[0, 1, 1, 0, 1, 0]])
    values = torch.tensor([[9.0, 0.2, 0.4, 9.0, 0.5, 9.0]])
    advantages, returns = rl.gae(rewards, values, mask, 1.0, 1.0)
    assert torch.allclose(advantages, torch.tensor([[0.0, 0.8, 0.6, 0.0, 0.5, 0.0]]))
    assert torch.allclose(returns, torch.tensor([[0.0, 1.0, 1.0, 0.0, 1.0, 0.0]]))


# -----------------------------------------------------------------------------
# The losses on hand-computed tensors

def test_policy_loss_clips_asymmetrically():
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 0.5, 1.1, 0.9]))  # ratios 1.5, 0.5, 1.1, 0.9
    adv = torch.tensor([1.0, -1.0, 2.0, -2.0])
    loss, low, high = rl.policy_loss_terms(logp, old, adv, 0.2, 0.28)
    # ratio 1.5, A>0: clipped at 1.28 -> -1.28 (bigger than -1.5); ratio 0.5, A<0: clipped at 0.8 -> 0.8
    # ratio 1.1 and 0.9: inside the clip range, unclipped
    assert torch.allclose(loss, torch.tensor([-1.28, 0.8, -2.2, 1.8]))
    assert low.tolist() == [False, True, False, False]
    assert high.tolist() == [True, False, False, False]


def test_policy_loss_does_not_clip_a_move_against_the_advantage():
    # ratio 0.5 with A>0 (the policy moved away from a good token): the unclipped term is larger, kept
    loss, low, high = rl.policy_loss_terms(torch.log(torch.tensor([0.5])), torch.zeros(1), torch.ones(1), 0.2, 0.28)
    assert torch.allclose(loss, torch.tensor([-0.5])) and not low.any() and not high.any()


def test_policy_loss_stays_finite_when_a_token_out_of_the_loss_moved_far():
    # a state token under --no-state-loss: advantage 0 (whitened out of the policy mask), mask 0, and
    # its log-prob up by 100 nats since sampling; exp(100) is inf in float32 and -0 x inf is NaN
    logp = torch.tensor([-1.0, 0.0, -150.0], requires_grad=True)
    old = torch.tensor([-1.2, -100.0, 0.0])
    adv, mask = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([1.0, 0.0, 0.0])
    loss, low, high = rl.policy_loss_terms(logp, old, adv, 0.2, 0.28)
    ((loss * mask).sum() / mask.sum()).backward()
    assert torch.isfinite(loss).all() and torch.isfinite(logp.grad).all()
    assert logp.grad[0] < 0 and logp.grad[1:].abs().sum() == 0  # the token in the loss is pushed up


def test_value_loss_clips_around_the_old_value():
    values, old, returns = torch.tensor([1.0, 0.1, 0.0]), torch.tensor([0.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 1.0])
    loss, clipped = rl.value_loss_terms(values, old, returns, 0.5)
    # 1: moved 1.0 from old, clipped to 0.5: max(1^2, 0.5^2)/2 = 0.5 (the unclipped error is larger)
    # 2: inside the clip: (0.1-1)^2/2; 3: no move: 1/2
    assert torch.allclose(loss, torch.tensor([0.5, 0.405, 0.5]))
    assert clipped.tolist() == [False, False, False]
    loss, clipped = rl.value_loss_terms(torch.tensor([2.0]), torch.tensor([0.0]), torch.tensor([2.0]), 0.5)
    assert torch.allclose(loss, torch.tensor([0.5 * 1.5 ** 2])) and clipped.tolist() == [True]


def test_kl_estimator_is_zero_at_equality_and_positive_otherwise():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    assert torch.allclose(rl.kl_terms(logp, logp), torch.zeros(3))
    assert (rl.kl_terms(logp, logp + torch.tensor([0.3, -0.7, 1.0])) > 0).all()
    # k3 of KL(policy || reference), with r = p_ref / p_policy: r - log r - 1 (not the other direction)
    policy, reference = torch.log(torch.tensor([0.5, 0.2])), torch.log(torch.tensor([0.25, 0.6]))
    r = torch.tensor([0.5, 3.0])
    assert torch.allclose(rl.kl_terms(policy, reference), r - torch.log(r) - 1)


def test_whiten_over_the_mask_of_every_token_it_covers():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, -7.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 1]])
    out = rl.whiten(x, mask, torch.device("cpu"))
    inside = out[mask.bool()]
    assert torch.allclose(inside.mean(), torch.tensor(0.0), atol=1e-6)
    assert torch.allclose(inside.pow(2).mean(), torch.tensor(1.0), atol=1e-5)  # population std 1
    assert (out[~mask.bool()] == 0).all()
    values = x[mask.bool()]
    assert torch.allclose(inside, (values - values.mean()) / values.std(unbiased=False), atol=1e-5)


def two_scored_rows(tokenizer):
    """(ids, attention, where): two rows, the second right-padded by two, scored from position 5."""
    text = "Turn 1:\nState:\nP_G_\n<think> I will try Right"
    ids = torch.tensor([tokenizer.encode(text), tokenizer.encode(text)[:-2] + [0, 0]])
    attention = torch.ones_like(ids)
    attention[1, -2:] = 0
    where = torch.zeros_like(ids)
    where[:, 5:-2] = 1
    return ids, attention, where


def test_the_training_forward_runs_causal_attention_without_a_mask(tiny, monkeypatch):
    """Right-padded rows need no attention mask (agent.training_hidden_states): the real tokens'
    states and the gradients are the masked pass's, every attention call runs the causal kernel
    with no mask, and a row with a pad before a real token is refused. Compared in float64, where
    the two passes are the same arithmetic to 1e-12: in float32 both are about 2e-3 (relative) from
    the float64 gradients, and torch 2.5's masked and causal CPU kernels round apart by 5e-4."""
    model = copy.deepcopy(tiny[0]).double()
    ids, attention, _ = two_scored_rows(tiny[1])
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def watched(*args, **kwargs):
        calls.append((kwargs.get("attn_mask"), kwargs.get("is_causal")))
        return sdpa(*args, **kwargs)

    masked = model.base_model(input_ids=ids, attention_mask=attention).last_hidden_state
    (masked[attention.bool()] ** 2).sum().backward()
    grads = [p.grad.clone() for p in model.base_model.parameters()]
    model.zero_grad()
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", watched)
    hidden = agent.training_hidden_states(model.base_model, ids, attention)
    (hidden[attention.bool()] ** 2).sum().backward()
    assert len(calls) == model.config.num_hidden_layers
    assert all(mask is None and causal for mask, causal in calls)
    assert torch.allclose(hidden[attention.bool()], masked[attention.bool()], rtol=0, atol=1e-12)
    for p, expected in zip(model.base_model.parameters(), grads):
        assert torch.allclose(p.grad, expected, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="right-padded"):
        agent.training_hidden_states(model.base_model, ids.flip(1), attention.flip(1))  # left-padded


def test_token_logprobs_and_entropy_match_a_full_forward(tiny):
    model, tokenizer = tiny
    ids, attention, where = two_scored_rows(tokenizer)
    with torch.no_grad():
        logp, entropy = rl.token_logprobs(model, ids, attention, where, with_entropy=True)
        full = torch.log_softmax(model(input_ids=ids, attention_mask=attention).logits.float(), -1)
    expected = full[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert torch.allclose(logp[:, 1:][where[:, 1:].bool()], expected[where[:, 1:].bool()], atol=1e-5)
    assert (logp[where == 0] == 0).all()
    expected_entropy = -(full[:, :-1].exp() * full[:, :-1]).sum(-1)
    assert torch.allclose(entropy[:, 1:][where[:, 1:].bool()], expected_entropy[where[:, 1:].bool()], atol=1e-4)


def test_values_are_read_from_the_hidden_state_before_each_token(tiny, tiny_dir):
    """V at token t is the value of the state before t (the hidden state at t-1), as the log-prob of t
    is: a critic that read the hidden state at t would see the token it is the baseline for. The
    value head starts at zero, which hides any offset, so it gets random weights here."""
    _, tokenizer = tiny
    ids, attention, where = two_scored_rows(tokenizer)
    critic = rl.build_critic(tiny_dir, "cpu")
    with torch.no_grad():
        torch.nn.init.normal_(critic["value_head"].weight, generator=torch.Generator().manual_seed(0))
        critic["value_head"].bias.fill_(0.3)
        values = rl.token_values(critic, ids, attention, where)
        hidden = critic["backbone"](input_ids=ids, attention_mask=attention).last_hidden_state
        expected = critic["value_head"](hidden).squeeze(-1)  # (b, T): the value after each position
    scored = where.bool()
    assert torch.allclose(values[:, 1:][scored[:, 1:]], expected[:, :-1][scored[:, 1:]], atol=1e-5)
    assert not torch.allclose(values[:, 1:][scored[:, 1:]], expected[:, 1:][scored[:, 1:]], atol=1e-2)
    assert (values[~scored] == 0).all()


# -----------------------------------------------------------------------------
# Batches from rollouts

def small_args(**overrides):
    args = rl.parse_args(["--env", "frozenlake", "--preset", "tiny", "--out", "unused"])
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


def forward_and_advantages(model, critic, batch, args, device=torch.device("cpu")):
    """main's steps 4 and 5 on a batch: old log-probs and values, then GAE and whitened advantages."""
    rl.old_policy_forward(model, critic, None, batch, args, device, rl.nullcontext())
    rl.add_advantages(batch, args, device)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_recomputed_logprobs_equal_the_samplers(tiny, tiny_dir, temperature):
    model, tokenizer = tiny
    args = small_args(max_response_tokens=40, micro_batch_tokens=2000, temperature=temperature)
    generator = torch.Generator().manual_seed(0)
    policy = agent.model_policy(model, tokenizer, temperature=temperature, generator=generator)
    episodes = agent.rollout(policy, tokenizer, "frozenlake", [10, 11], 3, **rl.rollout_kwargs(args))
    batch, kept = rl.build_batch(episodes, tokenizer, args)
    critic = rl.build_critic(tiny_dir, "cpu")
    rl.old_policy_forward(model, critic, None, batch, args, torch.device("cpu"), rl.nullcontext())
    assistant = batch["assistant"].bool()
    assert assistant.sum() > 100
    assert torch.allclose(batch["old_logprobs"][assistant], batch["sampler_logprobs"][assistant], atol=1e-4)
    assert (batch["old_logprobs"][~assistant] == 0).all()


def test_rewards_sit_on_the_last_token_or_on_each_turns_last_token(tiny):
    model, tokenizer = tiny
    responses = iter(["<observation></observation><prediction></prediction></think><answer>Up</answer>",
                      "no format at all", "<observation></observation><prediction></prediction></think>"
                      "<answer>Down || Left</answer>"] * 10)
    policy = agent.text_policy(tokenizer, lambda ep: next(responses))
    kwargs = dict(mode="worldmodel", instruction="short", max_turns=3, max_response_tokens=64,
                  env_overrides={"slippery": False, "max_steps": 10})
    episodes = agent.rollout(policy, tokenizer, "frozenlake", [10], 1, **kwargs)
    ep = episodes[0]
    batch, _ = rl.build_batch(episodes, tokenizer, small_args(turn_rewards=False))
    nonzero = batch["rewards"][0].nonzero().squeeze(-1).tolist()
    assert nonzero == [ep.turn_ends[-1]] and math.isclose(batch["rewards"][0, ep.turn_ends[-1]].item(), ep.score,
                                                          abs_tol=1e-6)
    batch, _ = rl.build_batch(episodes, tokenizer, small_args(turn_rewards=True))
    for end, reward in zip(ep.turn_ends, ep.turn_rewards):
        assert math.isclose(batch["rewards"][0, end].item(), reward, abs_tol=1e-6)
    assert math.isclose(batch["rewards"].sum().item(), ep.score, abs_tol=1e-6)
    # every reward position is an assistant token; the assistant mask is exactly the assistant tokens
    assert batch["assistant"][0, :len(ep.tokens)].tolist() == ep.assistant_mask
    assert (batch["assistant"][0][batch["rewards"][0] != 0] == 1).all()


def test_worldmodel_reward_pays_exact_states_only(tiny):
    _, tokenizer = tiny

    def respond(ep):  # the true observation, a wrong prediction
        return agent.replace_states("<observation></observation>go<prediction></prediction></think>"
                                    "<answer>Right</answer>", ep.env.render("coords"), "?")
    policy = agent.text_policy(tokenizer, respond)
    episodes = agent.rollout(policy, tokenizer, "frozenlake", [10], 1, mode="worldmodel", instruction="short",
                             max_turns=2, env_overrides={"slippery": False})
    ep = episodes[0]
    assert [rl.worldmodel_hits(t) for t in ep.turns] == [(True, False)] * len(ep.turns)
    assert rl.episode_rewards(ep, 0.1) == pytest.approx([r + 0.1 for r in ep.turn_rewards])
    assert rl.episode_rewards(ep, 0.0) == pytest.approx(ep.turn_rewards)

    def respond_truly(ep):  # both states true: the prediction is the grid after this turn's move
        after = envs.make("frozenlake", slippery=False)
        after.reset(10)
        for turn in ep.turns:
            for action in turn["executed"]:
                after.step(action)
        after.step("Right")
        return agent.replace_states("<observation></observation>go<prediction></prediction></think>"
                                    "<answer>Right</answer>", ep.env.render("coords"), after.render("grid"))
    (ep,) = agent.rollout(agent.text_policy(tokenizer, respond_truly), tokenizer, "frozenlake", [10], 1,
                          mode="worldmodel", instruction="short", max_turns=2, env_overrides={"slippery": False})
    assert [rl.worldmodel_hits(t) for t in ep.turns] == [(True, True)] * len(ep.turns)
    assert rl.episode_rewards(ep, 0.1) == pytest.approx([r + 0.2 for r in ep.turn_rewards])
    # the bonus reaches the tokens: on each turn's last token, or summed on the episode's last
    args = small_args(worldmodel_reward=0.1, state_loss=True, turn_rewards=True)
    batch, _ = rl.build_batch([ep], tokenizer, args)
    assert batch["rewards"][0, ep.turn_ends].tolist() == pytest.approx(rl.episode_rewards(ep, 0.1))
    args.turn_rewards = False
    batch, _ = rl.build_batch([ep], tokenizer, args)
    assert batch["rewards"][0, ep.turn_ends[-1]].item() == pytest.approx(ep.score + 0.2 * len(ep.turns))

    def copy_and_idle(ep):  # the state copied into both spans, no answer: nothing moves, so both "true"
        return agent.replace_states("<observation></observation>go<prediction></prediction></think>"
                                    "<answer></answer>", ep.env.render("coords"), ep.env.render("grid"))
    (ep,) = agent.rollout(agent.text_policy(tokenizer, copy_and_idle), tokenizer, "frozenlake", [10], 1,
                          mode="worldmodel", instruction="short", max_turns=2, env_overrides={"slippery": False})
    assert [t["format_valid"] for t in ep.turns] == [False, False]
    assert [rl.worldmodel_hits(t) for t in ep.turns] == [(True, False)] * 2  # as evaluate.py scores it
    assert rl.episode_rewards(ep, 0.1) == pytest.approx(ep.turn_rewards) == [-0.1, -0.1]  # no bonus: no reward hack


def test_state_span_mask_covers_exactly_the_state_contents(tiny):
    _, tokenizer = tiny
    response = ("<observation>\nP___\n____\nPlayer (0,0); goal at (3,3).\n</observation>I will try Right."
                "<prediction>\n_P__\n____\n</prediction></think><answer>Right</answer><|im_end|>")
    tokens = tokenizer.encode(response, add_special_tokens=False)
    mask = rl.state_span_mask(tokenizer, tokens)
    masked = tokenizer.decode([t for t, m in zip(tokens, mask) if m])
    kept = tokenizer.decode([t for t, m in zip(tokens, mask) if not m])
    assert masked.replace("\n", "") == "P_______Player (0,0); goal at (3,3)._P______"
    assert kept == "<observation></observation>I will try Right.<prediction></prediction></think>" \
                   "<answer>Right</answer><|im_end|>"
    # an unclosed span is not a state: nothing masked
    tokens = tokenizer.encode("<observation>\nP___\n</think><answer>Up</answer>", add_special_tokens=False)
    assert sum(rl.state_span_mask(tokenizer, tokens)) == 0


def test_state_span_mask_covers_the_thought_trace_before_the_prediction(tiny):
    _, tokenizer = tiny
    # the layout self-play SFT trains on: the trace of positions ends the thoughts (agent.replace_states)
    response = ("<observation>\nP___\n____\n</observation>I will try Right || Down. Right to (0,1); Down to (1,1)."
                "<prediction>\n____\n_P__\n</prediction></think><answer>Right || Down</answer><|im_end|>")
    tokens = tokenizer.encode(response, add_special_tokens=False)
    kept = tokenizer.decode([t for t, m in zip(tokens, rl.state_span_mask(tokenizer, tokens)) if not m])
    assert kept.replace(" ", "") == ("<observation></observation>Iwilltry Right||Down.<prediction></prediction>"
                                     "</think><answer>Right||Down</answer><|im_end|>").replace(" ", "")
    # a Sokoban trace with a push is masked as well; the same words anywhere else in the thoughts are not
    response = ("<observation>\n#P\n</observation>Up to (1,1), box to (0,1). Then I will try Up."
                "<prediction>\n#P\n</prediction></think><answer>Up</answer>")
    tokens = tokenizer.encode(response, add_special_tokens=False)
    masked = tokenizer.decode([t for t, m in zip(tokens, rl.state_span_mask(tokenizer, tokens)) if m])
    assert masked.replace("\n", "") == "#P#P"
    response = ("<observation>\n#P\n</observation>I will try Up. Up to (1,1), box to (0,1)."
                "<prediction>\n#P\n</prediction></think><answer>Up</answer>")
    tokens = tokenizer.encode(response, add_special_tokens=False)
    masked = tokenizer.decode([t for t, m in zip(tokens, rl.state_span_mask(tokenizer, tokens)) if m])
    assert masked.replace("\n", "").replace(" ", "") == "#PUpto(1,1),boxto(0,1).#P"

def test_advantages_are_whitened_over_the_tokens_of_the_policy_loss(tiny, tiny_dir):
    model, tokenizer = tiny
    policy = agent.random_policy(tokenizer, random.Random(0), "worldmodel")
    episodes = agent.rollout(policy, tokenizer, "sokoban", [10, 11], 2, mode="worldmodel", instruction="short")
    args = small_args(state_loss=False, micro_batch_tokens=4000)
    batch, _ = rl.build_batch(episodes, tokenizer, args)
    for i in range(len(batch["lengths"])):  # varied rewards, so the advantages vary
        batch["rewards"][i, batch["lengths"][i] - 1] += i
    forward_and_advantages(model, rl.build_critic(tiny_dir, "cpu"), batch, args)
    policy_mask, outside = batch["policy"].bool(), (batch["assistant"] - batch["policy"]).bool()
    assert outside.any()  # the states: response tokens outside the policy loss
    used = batch["advantages"][policy_mask]
    assert abs(used.mean().item()) < 1e-5 and abs(used.pow(2).mean().item() - 1) < 1e-4
    assert (batch["advantages"][outside] == 0).all()
    # GAE itself ran over every assistant token, the states too (the critic learns their values)
    _, returns = rl.gae(batch["rewards"], batch["values"], batch["assistant"], args.gamma, args.lam)
    assert torch.equal(batch["returns"], returns) and (batch["returns"][outside] != 0).any()


def test_no_state_loss_removes_the_states_from_the_policy_mask_only(tiny):
    _, tokenizer = tiny
    policy = agent.random_policy(tokenizer, random.Random(0), "worldmodel")
    episodes = agent.rollout(policy, tokenizer, "sokoban", [10, 11], 2, mode="worldmodel", instruction="short")
    with_states, _ = rl.build_batch(episodes, tokenizer, small_args(state_loss=True))
    without, _ = rl.build_batch(episodes, tokenizer, small_args(state_loss=False))
    assert torch.equal(with_states["policy"], with_states["assistant"])
    assert torch.equal(without["assistant"], with_states["assistant"])
    dropped = (with_states["policy"] - without["policy"]).bool()
    text = tokenizer.decode(with_states["ids"][0][dropped[0]])
    grid = episodes[0].turns[0]["state_before"].replace("\n", "")
    assert grid in text.replace("\n", "") and "<answer>" not in text and "</think>" not in text
    # in every turn of every episode, not only the first
    for row, ep in enumerate(episodes):
        spans = rl.turn_spans(ep.assistant_mask)
        assert len(spans) == len(ep.turns) and all(dropped[row, first:last + 1].any() for first, last in spans)
    assert max(len(ep.turns) for ep in episodes) > 1


def one_turn_episode(tokens, prompt_length, reward, group=0):
    """A real agent.Episode of one valid turn: a response after a prompt of prompt_length tokens,
    rewarded `reward` (a stand-in of another type would break when batch code reads a new field;
    the per-turn record is still the three keys the batch code reads)."""
    n = len(tokens)
    return agent.Episode("frozenlake", seed=0, group=group, sample=0, env=None, tokens=tokens,
                         assistant_mask=[0] * prompt_length + [1] * (n - prompt_length), logprobs=[0.0] * n,
                         turn_ends=[n - 1], turn_rewards=[reward], score=reward,
                         turns=[{"observation": None, "prediction": None, "format_valid": True}])


def test_filter_groups_keeps_the_groups_with_the_largest_score_std():
    scores = {0: [0, 0, 0, 0], 1: [1, 0, 1, 0], 2: [1, 1, 1, 1], 3: [0, 0, 0, 1], 4: [0.5, 0, 0, 0],
              5: [1, 0, 0, 1], 6: [-1, 1, -1, 1], 7: [0, 0, 0, 0]}
    episodes = [one_turn_episode([], 0, s, group=g) for g, ss in scores.items() for s in ss]
    kept = rl.filter_groups(episodes, 0.25)
    assert sorted({ep.group for ep in kept}) == [1, 6]  # std 1 (group 6), then 0.5 (1 and 5: the earlier)
    assert len(kept) == 8
    assert {ep.group for ep in rl.filter_groups(episodes, 0.5)} == {6, 1, 5, 3}
    assert {ep.group for ep in rl.filter_groups(episodes, 0.01)} == {6}  # at least one group
    assert len(rl.filter_groups(episodes, 1.0)) == len(episodes)
    hundred = [one_turn_episode([], 0, s, group=g) for g in range(100) for s in (0.0, g + 1.0)]
    assert len({ep.group for ep in rl.filter_groups(hundred, 0.29)}) == 29  # 0.29 * 100 is 28.999999999999996
    assert len({ep.group for ep in rl.filter_groups(hundred[:20], 0.25)}) == 2  # 0.25 of 10 groups: 2, not 3


def test_the_group_filter_ranks_by_the_training_reward_with_the_world_model_bonus():
    # group 0: equal scores, but only one sample's observation is exact; group 1: scores 0 and 0.1
    def episode(group, score, exact):
        turn = {"observation": "state" if exact else "?", "coords_before": "state", "prediction": None,
                "state_after": "next", "format_valid": True}
        return agent.Episode("frozenlake", seed=0, group=group, sample=0, env=None, tokens=[], assistant_mask=[],
                             logprobs=[], turn_ends=[0], turn_rewards=[score], score=score, turns=[turn])
    episodes = [episode(0, 0.0, True), episode(0, 0.0, False), episode(1, 0.0, False), episode(1, 0.1, False)]
    assert {ep.group for ep in rl.filter_groups(episodes, 0.5)} == {1}  # by score alone
    assert {ep.group for ep in rl.filter_groups(episodes, 0.5, worldmodel_reward=1.0)} == {0}  # bonus 1 vs 0


def free_port():
    """A free local port for a torchrun rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The group filter under torchrun: each rank plays its share of the step's puzzles (rank r the step's
# groups r, r + 2, ...), with the scores of test_filter_groups_... but laid out so that the groups
# with the largest std were all played by rank 0.
FILTER_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
import agent, rl
rank, world, device = rl.setup_distributed()
scores = json.loads(sys.argv[2])
kept = {}
for keep in (0.25, 0.5):
    mine = [agent.Episode("frozenlake", seed=g, group=g // world, sample=i, env="an env object", score=s,
                          turn_rewards=[s], turns=[{"observation": None, "prediction": None, "format_valid": True}])
            for g, ss in enumerate(scores) if g % world == rank for i, s in enumerate(ss)]
    kept[keep] = [[ep.seed, ep.group, ep.sample, ep.env] for ep in rl.filter_groups(mine, keep, 0.0, rank, world)]
json.dump(kept, open(sys.argv[3] + str(rank), "w"))
rl.dist.barrier()
rl.dist.destroy_process_group()  # gloo can abort a process that exits with its group alive
"""


def test_the_group_filter_chooses_over_every_ranks_groups_and_deals_the_kept_episodes_out_equally(tmp_path):
    scores = [[0, 0, 0, 0], [0, 0, 0, 1], [-1, 1, -1, 1], [0.5, 0, 0, 0], [1, 0, 1, 0], [1, 1, 1, 1],
              [0, 0, 0, 0], [1, 0, 0, 1]]  # std 0, 0.43, 1, 0.22, 0.5, 0, 0, 0.5: groups 2 and 4 first
    one_process = [one_turn_episode([], 0, s, group=g) for g, ss in enumerate(scores) for s in ss]
    assert sorted({ep.group for ep in rl.filter_groups(one_process, 0.25)}) == [2, 4]
    assert sorted({ep.group for ep in rl.filter_groups(one_process, 0.5)}) == [1, 2, 4, 7]
    script = tmp_path / "filter.py"
    script.write_text(FILTER_SCRIPT)
    port = free_port()
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             f"--master_port={port}", str(script), ROOT, json.dumps(scores), str(tmp_path / "kept")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    kept = [json.load(open(tmp_path / f"kept{rank}")) for rank in (0, 1)]
    # the groups one process keeps, though rank 0 played both of 0.25's (a choice per rank would
    # keep one group of each rank's); the episodes dealt out in the step's order, every other one
    # to each rank, their group now the step's index and their environment left behind
    assert kept[0]["0.25"] == [[2, 2, 0, None], [2, 2, 2, None], [4, 4, 0, None], [4, 4, 2, None]]
    assert kept[1]["0.25"] == [[2, 2, 1, None], [2, 2, 3, None], [4, 4, 1, None], [4, 4, 3, None]]
    for keep, groups in (("0.25", [2, 4]), ("0.5", [1, 2, 4, 7])):
        both = sorted(tuple(ep) for rank in (0, 1) for ep in kept[rank][keep])
        assert both == [(g, g, i, None) for g in groups for i in range(4)]
        assert len(kept[0][keep]) == len(kept[1][keep])


def test_step_puzzle_seeds_are_new_every_step_or_cycle_through_the_training_puzzles():
    args = rl.parse_args(["--env", "frozenlake", "--out", "unused", "--env-groups", "3", "--train-seed-start", "100"])
    assert [rl.step_puzzle_seeds(args, step) for step in range(3)] == [[100, 101, 102], [103, 104, 105],
                                                                       [106, 107, 108]]
    args.train_puzzles = 4
    assert [rl.step_puzzle_seeds(args, step) for step in range(3)] == [[100, 101, 102], [103, 100, 101],
                                                                       [102, 103, 100]]
    args.train_puzzles = 2  # fewer puzzles than groups: every group still gets one, in turn
    assert rl.step_puzzle_seeds(args, 0) == [100, 101, 100]


# -----------------------------------------------------------------------------
# An update moves the policy the right way

def test_one_update_raises_the_probability_of_the_higher_advantage_response(tiny_dir):
    model, tokenizer = agent.load_model(tiny_dir, device="cpu")
    critic = rl.build_critic(tiny_dir, "cpu")
    prompt = tokenizer.encode("<|im_start|>user\nTurn 1:\nState:\nP_G_\n<|im_end|>\n<|im_start|>assistant\n<think>",
                              add_special_tokens=False)
    good = tokenizer.encode("</think><answer>Right</answer><|im_end|>", add_special_tokens=False)
    bad = tokenizer.encode("</think><answer>Left</answer><|im_end|>", add_special_tokens=False)
    sequences = [prompt + good, prompt + bad] * 4
    episodes = []
    for i, seq in enumerate(sequences):
        episodes.append(one_turn_episode(seq, len(prompt), 1.0 if i % 2 == 0 else 0.0))
    args = small_args(actor_lr=1e-3, critic_lr=1e-3, mini_batch=8, entropy_coef=0.0)
    batch, _ = rl.build_batch(episodes, tokenizer, args)
    device = torch.device("cpu")

    def response_logprob():
        with torch.no_grad():
            logp, _ = rl.token_logprobs(model, batch["ids"], batch["attention"], batch["assistant"])
        return logp.sum(-1)
    before = response_logprob()
    forward_and_advantages(model, critic, batch, args, device)
    assert (batch["advantages"][0::2].sum(-1) > 0).all() and (batch["advantages"][1::2].sum(-1) < 0).all()
    actor_opt = torch.optim.AdamW(model.parameters(), lr=args.actor_lr)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=args.critic_lr)
    stats = rl.update(model, critic, actor_opt, critic_opt, batch, args, 1, device, rl.nullcontext(), 0)
    after = response_logprob()
    assert (after[0::2] > before[0::2]).all()  # the rewarded answer became more likely
    assert (after[1::2] < before[1::2]).all()  # the other less
    assert stats["optimizer_steps"] == 1 and stats["policy_tokens"] == batch["assistant"].sum()
    # and the critic moved its values toward the returns
    with torch.no_grad():
        values = rl.token_values(critic, batch["ids"], batch["attention"], batch["assistant"])
    assistant = batch["assistant"].bool()
    assert ((values[assistant] - batch["returns"][assistant]) ** 2).mean() < \
           ((batch["values"][assistant] - batch["returns"][assistant]) ** 2).mean()


def scored_random_batch(model, tokenizer, tiny_dir, args):
    """A scored batch of random-policy Sokoban conversations of different lengths, varied rewards."""
    episodes = agent.rollout(agent.random_policy(tokenizer, random.Random(3), "worldmodel"), tokenizer, "sokoban",
                             [20, 21], 3, mode="worldmodel", instruction="short", max_turns=2)
    batch, _ = rl.build_batch(episodes, tokenizer, args)
    for i in range(len(batch["lengths"])):
        batch["rewards"][i, batch["lengths"][i] - 1] += (-1) ** i * (1 + i / 3)
    forward_and_advantages(model, rl.build_critic(tiny_dir, "cpu"), batch, args)
    return batch


def one_update(tiny_dir, batch, args, lr):
    """Actor and critic weights after one update (plain SGD, so the step is the gradient) of fresh copies."""
    model, _ = agent.load_model(tiny_dir, device="cpu")
    critic = rl.build_critic(tiny_dir, "cpu")
    actor_opt, critic_opt = torch.optim.SGD(model.parameters(), lr=lr), torch.optim.SGD(critic.parameters(), lr=lr)
    rl.update(model, critic, actor_opt, critic_opt, batch, args, 1, torch.device("cpu"), rl.nullcontext(), 0)
    return model, critic


def test_the_update_is_the_same_in_any_micro_batches_and_the_entropy_bonus_raises_entropy(tiny, tiny_dir):
    model, tokenizer = tiny
    args = small_args(state_loss=False, kl_coef=0.0, mini_batch=6, ppo_epochs=1, grad_clip=1e9,
                      micro_batch_tokens=10**6)
    batch = scored_random_batch(model, tokenizer, tiny_dir, args)
    assert len(set(batch["lengths"])) > 1  # micro-batches of 1 token each hold one sequence: 6 pieces
    whole = one_update(tiny_dir, batch, args, lr=1.0)
    pieces = one_update(tiny_dir, batch, small_args(**{**vars(args), "micro_batch_tokens": 1}), lr=1.0)
    start, _ = agent.load_model(tiny_dir, device="cpu")
    moved = max((a - s).abs().max().item() for a, s in zip(whole[0].parameters(), start.parameters()))
    assert moved > 1e-3  # the step did something
    for a, b in zip([*whole[0].parameters(), *whole[1].parameters()],
                    [*pieces[0].parameters(), *pieces[1].parameters()]):
        assert torch.allclose(a, b, atol=1e-5)  # a token mean over the mini-batch, however it is split
    # the entropy bonus alone (no advantages, no KL): the policy's entropy rises
    batch["advantages"].zero_()

    def entropy(m):
        with torch.no_grad():
            _, h = rl.token_logprobs(m, batch["ids"], batch["attention"], batch["assistant"], with_entropy=True)
        return h[batch["policy"].bool()].mean().item()
    bonus = one_update(tiny_dir, batch, small_args(**{**vars(args), "entropy_coef": 1.0}), lr=0.05)[0]
    assert entropy(bonus) > entropy(start) + 1e-4


def test_the_update_scores_tokens_at_the_sampling_temperature(tiny, tiny_dir):
    # before any step the policy is the one that acted: ratio 1 everywhere, at any temperature
    model, tokenizer = tiny
    args = small_args(state_loss=False, kl_coef=0.0, mini_batch=6, ppo_epochs=1, temperature=0.7)
    batch = scored_random_batch(model, tokenizer, tiny_dir, args)
    actor, _ = agent.load_model(tiny_dir, device="cpu")  # the same weights; the shared model stays untouched
    critic = rl.build_critic(tiny_dir, "cpu")
    opts = [torch.optim.SGD(m.parameters(), lr=0.0) for m in (actor, critic)]
    stats = rl.update(actor, critic, *opts, batch, args, 1, torch.device("cpu"), rl.nullcontext(), 0)
    assert abs(stats["approx_kl"]) < 1e-6 * stats["policy_tokens"]
    assert stats["clip_low"] == stats["clip_high"] == 0


def test_each_sequence_is_in_exactly_one_mini_batch_per_epoch(tiny, tiny_dir, monkeypatch):
    """Six sequences in mini-batches of two: three optimiser steps, and every sequence's tokens
    counted once (overlapping slices would train some sequences twice in an epoch, unnoticed as long
    as a batch fits in one mini-batch)."""
    model, tokenizer = tiny
    args = small_args(state_loss=False, kl_coef=0.0, mini_batch=2, ppo_epochs=1)
    batch = scored_random_batch(model, tokenizer, tiny_dir, args)
    assert len(batch["lengths"]) == 6
    actor, _ = agent.load_model(tiny_dir, device="cpu")
    critic = rl.build_critic(tiny_dir, "cpu")
    opts = [torch.optim.SGD(m.parameters(), lr=0.0) for m in (actor, critic)]
    stats = rl.update(actor, critic, *opts, batch, args, 1, torch.device("cpu"), rl.nullcontext(), 0)
    assert stats["optimizer_steps"] == 3
    args.ppo_epochs = 2  # every epoch goes over the whole batch again, in another order
    seen, real = [], agent.micro_batches
    monkeypatch.setattr(agent, "micro_batches", lambda rows, *rest: seen.append(list(rows)) or real(rows, *rest))
    assert rl.update(actor, critic, *opts, batch, args, 1, torch.device("cpu"), rl.nullcontext(), 0)[
        "optimizer_steps"] == 6
    assert len(seen) == 6 and seen[:3] != seen[3:]
    assert sorted(sum(seen[:3], [])) == sorted(sum(seen[3:], [])) == list(range(6))
    assert stats["response_tokens"] == batch["assistant"].sum()
    assert stats["policy_tokens"] == batch["policy"].sum()
    assert stats["outside_tokens"] == (batch["assistant"] - batch["policy"]).sum() > 0


def test_step_metrics_divide_each_sum_by_what_it_counts():
    turn = {"executed": ["Up"], "format_valid": True, "observation": None, "prediction": None,
            "coords_before": "", "state_after": ""}
    episodes = [agent.Episode("frozenlake", seed=0, group=0, sample=i, env=None, tokens=[1, 2, 3, 4],
                              assistant_mask=[0, 1, 1, 1], logprobs=[0.0] * 4, turn_ends=[3], turn_rewards=[i],
                              score=float(i), success=bool(i), turns=[turn, turn]) for i in range(2)]
    assistant = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 1]])
    returns = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 0.0, 1.0, 5.0]]) * assistant
    values = torch.tensor([[0.0, 1.5, 1.5, 2.0], [0.0, 0.5, 1.0, 3.0]]) * assistant
    batch = {"assistant": assistant, "returns": returns, "values": values, "lengths": [4, 4],
             "sampler_logprobs": torch.zeros(2, 4), "old_logprobs": torch.zeros(2, 4)}
    stats = {"pg_loss": 1.0, "entropy": 2.0, "clip_low": 1.0, "clip_high": 3.0, "approx_kl": 0.5,
             "approx_kl_outside": 0.0, "kl_ref": 0.0, "policy_tokens": 4.0, "outside_tokens": 2.0, "value_loss": 1.2,
             "value_clip": 3.0, "response_tokens": 6.0, "actor_grad_norm": 6.0, "critic_grad_norm": 9.0,
             "optimizer_steps": 3.0}
    row = rl.step_metrics(1, episodes, batch, stats, small_args(), torch.device("cpu"), 1, {"step_s": 2.0})
    assert (row["actor/clip_frac_low"], row["actor/clip_frac_high"]) == (0.25, 0.75)
    assert (row["actor/grad_norm"], row["critic/grad_norm"]) == (2.0, 3.0)  # a mean over optimiser steps
    assert (row["critic/value_loss"], row["critic/value_clip_frac"]) == (0.2, 0.5)  # over response tokens
    assert (row["train/reward"], row["train/success"], row["train/turns"]) == (0.5, 0.5, 2.0)
    assert row["train/response_tokens"] == 1.5  # per turn
    r, v = returns[assistant.bool()], values[assistant.bool()]
    assert row["critic/explained_var"] == pytest.approx(1 - (r - v).var(unbiased=False) / r.var(unbiased=False),
                                                        abs=1e-5)


def test_validation_score_is_per_episode_and_format_validity_per_turn(tiny, monkeypatch):
    model, tokenizer = tiny
    args = rl.parse_args(["--env", "frozenlake", "--preset", "tiny", "--out", "unused", "--val-puzzles", "3",
                          "--val-samples", "2"])
    monkeypatch.setattr(agent, "model_policy", lambda *a, **k: agent.random_policy(tokenizer, random.Random(0),
                                                                                   "worldmodel"))
    played, real = [], agent.rollout

    def recorded(*a, **k):
        episodes = real(*a, **k)
        played.extend(episodes)
        return episodes
    monkeypatch.setattr(agent, "rollout", recorded)
    row = rl.validate(model, tokenizer, args, 0, 1, torch.device("cpu"), 0)
    turns = [t for ep in played for t in ep.turns]
    assert len(played) == 6 and len(turns) > len(played)
    assert row["val/score"] == round(sum(ep.score for ep in played) / len(played), 4)
    assert row["val/format_valid"] == round(sum(t["format_valid"] for t in turns) / len(turns), 4)


def test_kl_ref_is_the_kl_of_the_policy_from_the_reference(tiny_dir):
    model, tokenizer = agent.load_model(tiny_dir, device="cpu")
    critic = rl.build_critic(tiny_dir, "cpu")
    episodes = agent.rollout(agent.random_policy(tokenizer, random.Random(0), "worldmodel"), tokenizer, "frozenlake",
                             [10, 11], 2, mode="worldmodel", instruction="short")
    args = small_args(state_loss=False, kl_coef=0.5, entropy_coef=0.0, mini_batch=64)
    batch, _ = rl.build_batch(episodes, tokenizer, args)
    forward_and_advantages(model, critic, batch, args)
    states = (batch["assistant"] - batch["policy"]).bool()
    batch["ref_logprobs"] = batch["old_logprobs"] - states.float()  # log(p_ref / p) = -1 on the states, 0 elsewhere
    opts = [torch.optim.SGD(m.parameters(), lr=0.0) for m in (model, critic)]
    stats = rl.update(model, critic, *opts, batch, args, 1, torch.device("cpu"), rl.nullcontext(), 0)
    # k3 of KL(policy || reference) on samples of the policy: r - log r - 1 with r = p_ref / p = e^-1
    # (the reverse direction would give e - 2 per state token)
    assert stats["kl_ref"] == pytest.approx(states.sum().item() * math.exp(-1), rel=1e-3)


def test_kl_penalty_anchors_the_states_that_the_policy_loss_leaves_out(tiny_dir):
    """With --no-state-loss the policy gradient skips the <observation>/<prediction> contents; the KL
    penalty to the reference must still cover them, or nothing holds the SFT's world model in place
    (measured: lr 5e-4 without it, exact observations in play went 0.85 -> 0.02 in 20 steps)."""
    model, tokenizer = agent.load_model(tiny_dir, device="cpu")
    critic = rl.build_critic(tiny_dir, "cpu")
    policy = agent.random_policy(tokenizer, random.Random(0), "worldmodel")
    episodes = agent.rollout(policy, tokenizer, "frozenlake", [10, 11], 2, mode="worldmodel", instruction="short")
    args = small_args(state_loss=False, kl_coef=0.5, entropy_coef=0.0, weight_decay=0.0, mini_batch=64)
    batch, _ = rl.build_batch(episodes, tokenizer, args)
    device = torch.device("cpu")
    forward_and_advantages(model, critic, batch, args, device)
    states = (batch["assistant"] - batch["policy"]).bool()
    assert states.any()
    # no policy gradient at all; a reference that finds the state tokens less likely than the actor does
    batch["advantages"].zero_()
    batch["ref_logprobs"] = batch["old_logprobs"] - states.float()

    def state_logprob():
        with torch.no_grad():
            logp, _ = rl.token_logprobs(model, batch["ids"], batch["attention"], batch["assistant"])
        return logp[states].sum()
    before = state_logprob()
    actor_opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=1e-3)
    stats = rl.update(model, critic, actor_opt, critic_opt, batch, args, 1, device, rl.nullcontext(), 0)
    assert stats["kl_ref"] > 0
    assert state_logprob() < before - 1.0  # pulled toward the reference
    # the metrics of how far that update moved the policy, measured by a pass that changes nothing:
    # on the tokens outside the policy loss (the states) and on those in it
    for optimizer in (actor_opt, critic_opt):
        optimizer.param_groups[0]["lr"] = 0.0
    moved = rl.update(model, critic, actor_opt, critic_opt, batch, args, 1, device, rl.nullcontext(), 1)
    assert moved["outside_tokens"] == states.sum() and moved["policy_tokens"] == batch["policy"].sum()
    assert moved["approx_kl_outside"] / moved["outside_tokens"] > 0.1  # moved toward the reference
    assert 0 < moved["approx_kl"] / moved["policy_tokens"] < moved["approx_kl_outside"] / moved["outside_tokens"]


def test_the_critic_is_trained_on_the_states_that_the_policy_loss_leaves_out(tiny, tiny_dir):
    """With --no-state-loss GAE still runs over every response token, the states' too, so the value
    loss must cover them (assistant mask, not policy mask). Returns that equal the old values except
    on the state tokens, +1 there: only a value loss over the states gives the critic a gradient."""
    model, tokenizer = tiny
    args = small_args(state_loss=False, kl_coef=0.0, mini_batch=6, ppo_epochs=1)
    batch = scored_random_batch(model, tokenizer, tiny_dir, args)
    states = (batch["assistant"] - batch["policy"]).bool()
    assert states.any()
    batch["advantages"].zero_()
    batch["returns"] = (batch["values"] + states.float()) * batch["assistant"]
    actor, _ = agent.load_model(tiny_dir, device="cpu")
    critic = rl.build_critic(tiny_dir, "cpu")
    actor_opt, critic_opt = torch.optim.SGD(actor.parameters(), lr=0.0), torch.optim.SGD(critic.parameters(), lr=0.1)
    rl.update(actor, critic, actor_opt, critic_opt, batch, args, 1, torch.device("cpu"), rl.nullcontext(), 0)
    assert critic["value_head"].bias.item() > 0
    with torch.no_grad():
        values = rl.token_values(critic, batch["ids"], batch["attention"], batch["assistant"])
    error = lambda v: ((v[states] - batch["returns"][states]) ** 2).mean().item()  # noqa: E731
    assert error(values) < error(batch["values"]) - 1e-3  # the states' values moved toward their returns


# -----------------------------------------------------------------------------
# The script: resume, data parallelism, bad input

def tiny_run(tiny_dir, out, *extra):
    """A two-step tiny run's flags; out None: no --out (the run folder's default)."""
    return ["--env", "frozenlake", "--preset", "tiny", "--model", tiny_dir, *(["--out", str(out)] if out else []),
            "--steps", "2", "--env-groups", "4", "--group-size", "4", "--keep-groups", "0.5", "--mini-batch", "4",
            "--val-puzzles", "2", "--val-samples", "2", "--val-every", "0", "--max-response-tokens", "24",
            "--actor-lr", "1e-3", "--critic-lr", "2e-3", *extra]


def test_validation_plays_in_batches_no_larger_than_the_rollout_and_counts_each_puzzle_apart(tiny, monkeypatch):
    """The paper preset validates 64 x 8 episodes and plays 32 x 8 a step: validation comes in
    batches of at most the rollout's episodes, which the memory plan bounds. The oracle stands in
    for the model, so that puzzles differ in how often they are solved and Pass@k (k > 1) would
    show a success counted against the wrong puzzle."""
    model, tokenizer = tiny
    args = rl.parse_args(["--env", "frozenlake", "--preset", "tiny", "--out", "unused", "--env-groups", "4",
                          "--group-size", "2", "--val-puzzles", "5", "--val-samples", "4"])
    assert rl.validation_batches(args, 1) == 2 and rl.validation_batches(args, 2) == 1
    monkeypatch.setattr(agent, "model_policy", lambda *a, **k: agent.oracle_policy(tokenizer, "worldmodel"))
    batches, real_rollout = [], agent.rollout

    def recorded_rollout(policy, tokenizer, env_name, seeds, group_size, **kwargs):
        episodes = real_rollout(policy, tokenizer, env_name, seeds, group_size, **kwargs)
        batches.append((list(seeds), episodes))
        return episodes

    monkeypatch.setattr(agent, "rollout", recorded_rollout)
    row = rl.validate(model, tokenizer, args, 0, 1, torch.device("cpu"), 0)
    assert [seeds for seeds, _ in batches] == [[123, 124], [125, 126], [127]]  # <= 8 episodes each
    successes = {}
    for _, episodes in batches:
        for ep in episodes:
            successes[ep.seed] = successes.get(ep.seed, 0) + ep.success
    assert len(set(successes.values())) > 1  # the puzzles differ, or the check below could not fail
    for k in (1, 2, 4):
        expected = sum(rl.pass_at_k(4, c, k) for c in successes.values()) / 5
        assert row[f"val/pass@{k}"] == round(expected, 4)


def test_resume_gives_the_same_next_step_as_an_uninterrupted_run(tiny_dir, tmp_path, monkeypatch, capsys):
    straight = rl.main(tiny_run(tiny_dir, tmp_path / "a"))

    original = agent.append_jsonl

    def interrupt(path, *rows):
        original(path, *rows)
        if any(row.get("step") == 2 and "train/reward" in row for row in rows):  # after step 1's save, before step 2's
            raise KeyboardInterrupt
    monkeypatch.setattr(agent, "append_jsonl", interrupt)
    # the interrupted run starts from a checkpoint beside it (a benchmark's folder), and the folder
    # is moved before the run is resumed: the recorded paths follow it
    shutil.copytree(tiny_dir, tmp_path / "first" / "sft")
    with pytest.raises(KeyboardInterrupt):
        rl.main(tiny_run(str(tmp_path / "first" / "sft"), tmp_path / "first" / "b", "--save-every", "1"))
    monkeypatch.setattr(agent, "append_jsonl", original)
    shutil.move(tmp_path / "first", tmp_path / "moved")
    resumed = rl.main(tiny_run(str(tmp_path / "moved" / "sft"), tmp_path / "moved" / "b", "--save-every", "1"))

    def rows(run):
        lines = [json.loads(line) for line in open(tmp_path / run / "metrics.jsonl")]
        return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in lines]
    assert rows("a") == rows("moved/b")
    assert [r["step"] for r in rows("moved/b")] == [0, 1, 2, 2]
    a = torch.load(tmp_path / "a" / "train_state.pt", weights_only=False)
    b = torch.load(tmp_path / "moved" / "b" / "train_state.pt", weights_only=False)
    for part in ("actor", "critic"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    assert [a[f"{part}_opt"]["param_groups"][0]["lr"] for part in ("actor", "critic")] == [1e-3, 2e-3]  # each its own
    assert straight == {**resumed, "checkpoint": straight["checkpoint"]}
    # the same folder with another learning rate is another run: a clear error, the run untouched
    with pytest.raises(SystemExit, match=r"cannot continue \(actor_lr: 0.001 there, 0.0005 now\)"):
        rl.main(tiny_run(str(tmp_path / "moved" / "sft"), tmp_path / "moved" / "b", "--save-every", "1",
                         "--actor-lr", "5e-4"))
    assert rows("moved/b")[-1]["step"] == 2
    # the finished run run again: nothing is redone or logged twice, the same summary; the flags that
    # only change how it fits in memory (the usual fix after running out of it) may differ
    again = rl.main(tiny_run(str(tmp_path / "moved" / "sft"), tmp_path / "moved" / "b", "--save-every", "1",
                             "--micro-batch-tokens", "2048", "--grad-checkpointing", "--offload-optimizer"))
    assert rows("moved/b") == rows("a") and again == resumed
    assert json.load(open(tmp_path / "moved" / "b" / "run_config.json"))["actor_lr"] == 1e-3
    # resumed on another number of ranks: allowed (a machine setting), with a warning that it differs;
    # and from a run_config.json written before --clip-high existed: it was at its default then
    config_path = tmp_path / "moved" / "b" / "run_config.json"
    config_path.write_text(json.dumps({**{k: v for k, v in json.loads(config_path.read_text()).items()
                                          if k != "clip_high"}, "world_size": 2}))
    capsys.readouterr()
    rl.main(tiny_run(str(tmp_path / "moved" / "sft"), tmp_path / "moved" / "b", "--save-every", "1"))
    assert "warning: resuming a run of 2 ranks on 1" in capsys.readouterr().err
    config_path.write_text(json.dumps({k: v for k, v in json.loads(config_path.read_text()).items()
                                       if k != "clip_high"}))
    with pytest.raises(SystemExit, match=r"\(clip_high: not recorded \(taken as 0.28\) there, 0.3 now\)"):
        rl.main(tiny_run(str(tmp_path / "moved" / "sft"), tmp_path / "moved" / "b", "--clip-high", "0.3"))
    # a run can be extended, not shortened: its model would be published under the shorter --steps
    with pytest.raises(SystemExit, match="trained to step 2; --steps 1"):
        rl.main(tiny_run(str(tmp_path / "moved" / "sft"), tmp_path / "moved" / "b", "--steps", "1"))
    assert json.load(open(tmp_path / "moved" / "b" / "run_config.json"))["steps"] == 2  # the record is untouched
    # a state whose run_config.json is gone cannot be checked against the flags: refused, not resumed
    os.remove(tmp_path / "moved" / "b" / "run_config.json")
    with pytest.raises(SystemExit, match="no run_config.json there records its settings"):
        rl.main(tiny_run(str(tmp_path / "moved" / "sft"), tmp_path / "moved" / "b", "--save-every", "1"))
    assert os.path.isfile(tmp_path / "a" / "model" / "model.safetensors")
    reloaded, _ = agent.load_model(str(tmp_path / "a" / "model"), device="cpu")
    assert all(torch.equal(p, a["actor"][k]) for k, p in reloaded.state_dict().items() if k in a["actor"])


def test_each_step_samples_with_its_own_seed_from_the_updated_policy(tiny_dir, tmp_path, monkeypatch):
    # the bf16 sampling copy (the default on a GPU) must follow the actor's updates, or every rollout
    # would come from the starting model
    calls, real = [], agent.model_policy

    def recording(model, tokenizer, **kw):
        calls.append((kw["generator"].initial_seed(), sum(p.double().sum().item() for p in model.parameters())))
        return real(model, tokenizer, **kw)
    monkeypatch.setattr(agent, "model_policy", recording)
    rl.main(tiny_run(tiny_dir, tmp_path / "r", "--rollout-dtype", "bf16", "--steps", "3"))
    seeds = [rl.seed_for(0, "rollout", step, 0) for step in range(3)]
    rollouts = [call for call in calls if call[0] in seeds]
    assert [seed for seed, _ in rollouts] == seeds
    assert len({weights for _, weights in rollouts}) == 3


def test_torchrun_two_ranks_on_cpu_stay_in_sync(tiny_dir, tmp_path):
    port = free_port()
    # as the README runs it, `torchrun rl.py --env frozenlake ...` with no --out: the run folder is runs/rl-ENV
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
               os.path.join(ROOT, "rl.py"), *tiny_run(tiny_dir, None)]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["ranks_in_sync"] is True and summary["step"] == 2
    assert os.path.samefile(summary["checkpoint"], tmp_path / "runs" / "rl-frozenlake" / "model")
    rows = [json.loads(line) for line in open(tmp_path / "runs" / "rl-frozenlake" / "metrics.jsonl")]
    train = [r for r in rows if "train/reward" in r]
    assert [r["step"] for r in train] == [1, 2]
    assert all(r["train/kept_episodes"] == 8 for r in train)  # 2 of 4 groups x 4 samples, over both ranks
    # the finished run started again: every rank resumes at step 2 and, as rank 0 has its last
    # validation, none validates again (validation is collective: ranks that disagreed would hang)
    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout.strip().splitlines()[-1])["ranks_in_sync"] is True
    assert [json.loads(line) for line in open(tmp_path / "runs" / "rl-frozenlake" / "metrics.jsonl")] == rows


# One update on a fixed batch, by one process on all of it or by each torchrun rank on its share.
UPDATE_SCRIPT = """
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
import agent, rl
tiny_dir, out = sys.argv[2], sys.argv[3]
rank, world, device = rl.setup_distributed()
model, tokenizer = agent.load_model(tiny_dir, device="cpu")
critic = rl.build_critic(tiny_dir, "cpu")
prompt = tokenizer.encode("<|im_start|>user\\nTurn 1:\\nState:\\nP_G_\\n<|im_end|>\\n<|im_start|>assistant\\n<think>",
                          add_special_tokens=False)
answers = ["Right", "Left", "Up || Down", "Right || Right || Down", "Down", "Up", "Left || Up", "Right || Up"]
episodes = []
for i, answer in enumerate(answers):
    response = tokenizer.encode(f"I go.</think><answer>{answer}</answer><|im_end|>", add_special_tokens=False)
    n, reward = len(prompt) + len(response), (i % 3) - 0.7 * i
    episodes.append(agent.Episode("frozenlake", seed=0, group=i, sample=0, env=None, tokens=prompt + response,
                                  assistant_mask=[0] * len(prompt) + [1] * len(response), logprobs=[0.0] * n,
                                  turn_ends=[n - 1], turn_rewards=[reward], score=reward,
                                  turns=[{"observation": None, "prediction": None, "format_valid": True}]))
args = rl.parse_args(["--env", "frozenlake", "--preset", "tiny", "--out", "unused", "--mini-batch", "16",
                      "--ppo-epochs", "1", "--grad-clip", "0.5", "--entropy-coef", "0.01",
                      "--micro-batch-tokens", "60"])
share = episodes[rank::world] if sys.argv[4] == "halves" else (episodes if rank == 0 else [])  # or "lopsided"
batch, _ = rl.build_batch(share, tokenizer, args)
rl.old_policy_forward(model, critic, None, batch, args, device, rl.nullcontext())
rl.add_advantages(batch, args, device)  # whitened over the tokens of every rank
opts = [torch.optim.SGD(m.parameters(), lr=1.0) for m in (model, critic)]
rl.update(model, critic, *opts, batch, args, world, device, rl.nullcontext(), 0)
if rank == 0:
    torch.save({"actor": model.state_dict(), "critic": critic.state_dict()}, out)
if world > 1:
    rl.dist.barrier()
    rl.dist.destroy_process_group()  # gloo can abort a process that exits with its group alive
"""


@pytest.mark.parametrize("split", ["halves", "lopsided"])
def test_an_update_split_over_two_ranks_equals_one_process_on_the_whole_batch(tiny_dir, tmp_path, split):
    """Gradients summed over ranks, losses divided by the token counts of all ranks: two ranks on
    halves of a batch take exactly the step one process takes on all of it (a rank that averaged
    its gradients over ranks, normalised by its own tokens, or clipped its share before the sum -- the
    clip binds here -- would take another). A rank with no
    sequence at all (lopsided: rank 0 holds the whole batch) joins every collective call with
    nothing, and the step is still the same."""
    script = tmp_path / "update.py"
    script.write_text(UPDATE_SCRIPT)
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(script), ROOT, tiny_dir, str(tmp_path / "one.pt"), split], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env=env)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                          str(script), ROOT, tiny_dir, str(tmp_path / "two.pt"), split], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    start, _ = agent.load_model(tiny_dir, device="cpu")
    a, b = (torch.load(tmp_path / name, weights_only=True) for name in ("one.pt", "two.pt"))
    moved = max((a["actor"][k] - v).abs().max().item() for k, v in start.state_dict().items())
    assert moved > 1e-3
    for part in ("actor", "critic"):
        for k in a[part]:
            assert torch.allclose(a[part][k], b[part][k], atol=1e-5), (part, k)


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "rl.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_bad_input_gives_one_clear_error(tiny_dir, tmp_path):
    result = run_cli("--env", "chess", "--out", str(tmp_path))
    assert result.returncode == 2 and "invalid choice: 'chess'" in result.stderr
    result = run_cli("--env", "frozenlake", "--out", str(tmp_path), "--env-overrides", '{"slipery": false}')
    assert result.returncode == 2 and "--env-overrides" in result.stderr and "slipery" in result.stderr
    result = run_cli("--env", "frozenlake", "--out", str(tmp_path), "--worldmodel-reward", "0.1")
    assert result.returncode == 2 and "--mode worldmodel" in result.stderr
    # --out given the checkpoint itself: its run_config.json (how it was trained) would be replaced
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(tiny_dir, checkpoint)
    before = {p.name: p.read_bytes() for p in checkpoint.iterdir() if p.is_file()}
    with pytest.raises(SystemExit, match="is a model checkpoint .* pass a new folder"):
        rl.main(tiny_run(str(checkpoint), checkpoint))
    assert {p.name: p.read_bytes() for p in checkpoint.iterdir()} == before
    result = run_cli("--env", "frozenlake", "--out", str(tmp_path), "--train-puzzles", "-1")
    assert result.returncode == 2 and "--train-puzzles must be >= 0" in result.stderr
    result = run_cli("--env", "frozenlake", "--out", str(tmp_path), "--model", str(tmp_path / "missing"))
    assert result.returncode == 1 and "error: cannot load" in result.stderr and "Traceback" not in result.stderr
    out = tmp_path / "corrupt"
    out.mkdir()
    with open(out / "run_config.json", "w") as f:  # the run's own settings: the state itself is what is wrong
        json.dump(agent.run_config(rl.parse_args(tiny_run(tiny_dir, out))), f)
    for state, message in ((b"not a checkpoint", "cannot resume from"),
                           (None, "not a train state written by rl.py"),  # SFT's state, say
                           ("shapes", "Error(s) in loading state_dict")):  # another model's weights
        if state is None:
            torch.save({"model": {}, "step": 3}, out / "train_state.pt")
        elif state == "shapes":
            torch.save({"actor": {"lm_head.weight": torch.zeros(2, 2)}, "critic": {}, "actor_opt": {},
                        "critic_opt": {}, "step": 1}, out / "train_state.pt")
        else:
            (out / "train_state.pt").write_bytes(state)
        result = run_cli(*tiny_run(tiny_dir, out))
        assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize("flags, message", [
    (["--save-every", "0"], "--save-every must be >= 1"),
    (["--ppo-epochs", "0", "--max-turns", "-1"], "--ppo-epochs, --max-turns must be >= 1"),
    (["--val-every", "-1"], "--val-every >= 0"),
    (["--temperature", "0"], "--temperature must be >= 0.001"),
    (["--temperature", "1e-40"], "--temperature must be >= 0.001"),  # logits / 1e-40 overflow float32
    (["--keep-groups", "1.5"], "--keep-groups must be in (0, 1]"),
    (["--grad-clip", "-1"], "--grad-clip > 0"),  # a negative clip would ascend the loss
    (["--clip-low", "1.5"], "0 < --clip-low < 1"),
    (["--gamma", "nan"], "must be a finite number"),
    (["--actor-lr", "inf"], "must be a finite number"),
    (["--lam", "2"], "--gamma and --lam must be in [0, 1]"),
    (["--entropy-coef", "-0.1"], "--entropy-coef, --worldmodel-reward and --weight-decay must be >= 0"),
    (["--val-seed-start", "-5"], "--val-seed-start must be >= 0"),
    (["--seed", "-1"], "a seed is a whole number from 0 to 2**63 - 1"),  # numpy's generators refuse it
    (["--seed", str(2 ** 64)], "a seed is a whole number from 0 to 2**63 - 1"),  # torch's refuse it
    (["--max-response-tokens", "5000"], "--max-response-tokens must be below --max-context-tokens"),
    (["--env-overrides", "{bad"], "not valid JSON"),
    # the tiny preset keeps the states out of the policy loss, where a bonus for them could not reach them
    (["--preset", "tiny", "--worldmodel-reward", "0.1"], "keeps out of the policy loss: add --state-loss"),
    (["--env-overrides", '{"render_mode": "grid"}'], "set it with --render"),
])
def test_bad_flags_are_refused_before_anything_runs(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        rl.parse_args(["--env", "frozenlake", "--out", "unused", *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_help_shows_each_flags_default_and_every_presets_value(capsys):
    with pytest.raises(SystemExit):
        rl.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere
    assert "actor learning rate (paper: 1e-06; tiny: 0.0002)" in help_text  # filled in by the preset
    assert "PPO ratio clip above 1 (default: 0.28)" in help_text
    assert "(paper: on; tiny: off)" in help_text  # --state-loss / --no-state-loss
    assert "first validation puzzle seed (as evaluate.py) (default: 123)" in help_text
    # a switch shows no default
    assert "--grad-checkpointing recompute activations in the backward pass --offload" in help_text
    # the flags still start unset, so that a preset can fill them in
    assert rl.parse_args(["--env", "sokoban", "--out", "x", "--preset", "tiny"]).actor_lr == 2e-4


def test_memory_plan_of_the_paper_configuration():
    from transformers import Qwen2Config
    config = Qwen2Config(**agent.ARCHITECTURES["qwen2.5-1.5b"])
    args = rl.parse_args(["--env", "sokoban", "--out", "unused"])
    n = 1_543_714_304
    plan = rl.memory_plan(n, config, args, torch.device("cuda"), 1)
    assert plan["weights (actor + critic, fp32)"] == pytest.approx(2 * 4 * n / 1e9, abs=0.01)
    assert plan["sampler copy + reference"] == pytest.approx(2 * n / 1e9, abs=0.01)  # no reference at --kl-coef 0
    # 256 sequences x 3600 tokens x 28 layers x K and V x 2 heads x 128 x 2 bytes
    assert plan["kv cache (rollout)"] == pytest.approx(256 * 3600 * 28 * 2 * 2 * 128 * 2 / 1e9, abs=0.01)
    assert plan["rollout phase"] == pytest.approx(26 * n / 1e9 + plan["kv cache (rollout)"], abs=0.02)
    offloaded = rl.memory_plan(n, config, rl.parse_args(["--env", "sokoban", "--out", "x", "--offload-optimizer"]),
                               torch.device("cuda"), 1)
    assert offloaded["rollout phase"] == pytest.approx(plan["rollout phase"] - 16 * n / 1e9, abs=0.02)
    assert offloaded["update phase (+ activations)"] == plan["update phase (+ activations)"]
    assert rl.memory_plan(n, config, args, torch.device("cuda"), 2)["kv cache (rollout)"] == \
        pytest.approx(plan["kv cache (rollout)"] / 2, abs=0.01)
    # one validation puzzle's samples, more than a step's rollout on 32 ranks (8 sequences each): the cache's size
    assert rl.memory_plan(n, config, args, torch.device("cuda"), 32)["kv cache (rollout)"] == \
        pytest.approx(plan["kv cache (rollout)"] / 32, abs=0.01)
    many_samples = rl.parse_args(["--env", "sokoban", "--out", "x", "--val-samples", "32"])
    assert rl.memory_plan(n, config, many_samples, torch.device("cuda"), 32)["kv cache (rollout)"] == \
        pytest.approx(plan["kv cache (rollout)"] / 8, abs=0.01)


def test_every_switch_runs_end_to_end(tiny_dir, tmp_path):
    """KL to a reference, turn-level rewards, the online world-model reward (with the states in the
    policy loss, which it needs; the other tiny runs keep them out), two PPO epochs, gradient
    checkpointing, optimiser offload, a bf16 sampler copy and a fixed set of training puzzles (fewer
    than a step's groups: one puzzle twice in a step), together."""
    summary = rl.main(tiny_run(tiny_dir, tmp_path / "all", "--kl-coef", "0.05", "--turn-rewards",
                               "--worldmodel-reward", "0.1", "--state-loss", "--ppo-epochs", "2",
                               "--train-puzzles", "3",
                               "--grad-checkpointing", "--offload-optimizer", "--rollout-dtype", "bf16"))
    rows = [json.loads(line) for line in open(tmp_path / "all" / "metrics.jsonl")]
    train = [r for r in rows if "train/reward" in r]
    assert [r["step"] for r in train] == [1, 2] and summary["step"] == 2
    assert train[-1]["actor/kl_ref"] > 0  # the policy moved away from the reference in step 1
    assert all(math.isfinite(v) for r in train for v in r.values() if isinstance(v, float))
    assert train[0]["actor/sampler_logprob_gap"] > 1e-4  # bf16 sampling vs the fp32 training forward
    config = json.load(open(tmp_path / "all" / "run_config.json"))
    assert config["memory_plan_gb"]["sampler copy + reference"] > 0
