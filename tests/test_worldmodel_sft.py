"""Self-play world-model SFT: state substitution, loss masks, training, resume, bad input."""
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys

import pytest
import torch

import agent
import envs
import rl
import worldmodel_sft as sft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wm(plan, answer=None, observation="x", prediction="y"):
    """A world-model response (after <think>) with placeholder states and a plan."""
    return (f"<observation>{observation}</observation>I will try {plan}.<prediction>{prediction}</prediction>"
            f"</think><answer>{answer or plan}</answer>")


def play(tokenizer, env_name, responses, env_overrides, group_size=1, seeds=(0,), **kwargs):
    policy = agent.text_policy(tokenizer, lambda ep: responses[len(ep.turns)])
    return agent.rollout(policy, tokenizer, env_name, list(seeds), group_size, mode="worldmodel", render="coords",
                         instruction="short", env_overrides=env_overrides, **kwargs)


def states(response):
    parsed = agent.parse_response(agent.THINK_START + response, "worldmodel")
    return parsed["observation"], parsed["prediction"]


# -----------------------------------------------------------------------------
# substitution

def test_substitution_multi_action_turns_and_mid_turn_end(tiny):
    _, tokenizer = tiny
    room = "######\n#P_XO#\n#____#\n######"
    responses = [wm("Down || Right"),  # two moves
                 wm("Up || Right || Down || Left")]  # the box lands on the target at the 2nd move; the rest never runs
    (ep,) = play(tokenizer, "sokoban", responses, {"room": room})
    assert ep.success and [t["executed"] for t in ep.turns] == [["Down", "Right"], ["Up", "Right"]]
    examples = sft.examples_from_episodes([ep])
    assert [ex["turn"] for ex in examples] == [1, 2]
    env = envs.make("sokoban", room=room)
    env.reset(0)
    for ex, turn in zip(examples, ep.turns):
        observation, prediction = states(ex["response"])
        assert observation == env.render("coords") == ex["observation"]
        for action in turn["executed"]:
            env.step(action)
        assert prediction == env.render("grid") == ex["prediction"]
    assert examples[1]["prediction"] == "######\n#__P√#\n#____#\n######"  # the state when the episode ended
    # the states stand on lines of their own; the thoughts and the answer are kept as written
    assert examples[0]["response"] == (
        "<observation>\n" + room + "\nPlayer (P) is at (1,1); box (X) is at (1,3); target (O) is at (1,4).\n"
        "</observation>I will try Down || Right.<prediction>\n######\n#__XO#\n#_P__#\n######\n</prediction>"
        "</think><answer>Down || Right</answer>")
    # --thought-trace: the thoughts end with where the player, and the box it pushed, went after each
    # action that ran (not after those the ended episode never ran); otherwise the same example
    traced = sft.examples_from_episodes([ep], thought_trace=True)
    assert [ex["trace"] for ex in traced] == ["Down to (2,1); Right to (2,2).",
                                              "Up to (1,2); Right to (1,3), box to (1,4)."]
    assert [ex["trace"] for ex in examples] == ["", ""]
    for ex, plain in zip(traced, examples):
        assert ex["response"] == plain["response"].replace(".<prediction>", ". " + ex["trace"] + "<prediction>")
        assert {k: v for k, v in ex.items() if k not in ("response", "trace", "messages")} == \
            {k: v for k, v in plain.items() if k not in ("response", "trace", "messages")}
    assert traced[1]["messages"][2]["content"] == agent.THINK_START + traced[0]["response"]  # the history too


def test_thought_trace_follows_the_slips_and_is_empty_without_pieces(tiny):
    _, tokenizer = tiny
    # slippery FrozenLake: the trace says where the player really went, slips included
    responses = [wm("Right || Right || Down"), wm("Left || Up"), wm("Down"), wm("Up"), wm("Right")]
    episodes = play(tokenizer, "frozenlake", responses, {}, group_size=4, seeds=(11, 12))
    examples = sft.examples_from_episodes(episodes, thought_trace=True)
    assert len(examples) >= 8
    for ex in examples:
        env = sft.env_at_turn(ex)
        expected = []
        for action in ex["executed"]:
            env.step(action)
            expected.append(f"{action} to ({env.pieces()['player'][0]},{env.pieces()['player'][1]})")
        assert ex["trace"] == "; ".join(expected) + "."
        assert env.render("grid") == ex["prediction"]
    # Sudoku has no pieces that move: no trace
    sudoku = play(tokenizer, "sudoku", [wm("1,2,3"), wm("2,2,2")], {}, seeds=(3,), max_turns=2)
    assert [ex["trace"] for ex in sft.examples_from_episodes(sudoku, thought_trace=True)] == ["", ""]
    assert agent.trace_sentence([], [{"player": (0, 0)}]) == ""


def test_substitution_invalid_actions_broken_turns_and_history(tiny):
    _, tokenizer = tiny
    room = "#######\n#P____#\n#___XO#\n#######"
    responses = [wm("Right || Jump || Right"),  # an action the env rejects: the state reflects the valid ones
                 "no structure at all</think><answer>Down</answer>",  # broken: dropped, but stays in the history
                 wm("Down"),
                 wm("Up", answer=" ")]  # both states but no action: format-invalid, dropped too
    (ep,) = play(tokenizer, "sokoban", responses, {"room": room}, max_turns=4)
    assert len(ep.turns) == 4 and not ep.turns[3]["format_valid"] and ep.turns[3]["observation"] == "x"
    examples = sft.examples_from_episodes([ep])
    assert [ex["turn"] for ex in examples] == [1, 3]
    first, third = examples
    assert first["executed"] == ["Right", "Right"]
    assert states(first["response"])[1] == "#######\n#__P__#\n#___XO#\n#######"
    # turn 2 ran nothing (broken format), so turn 3 starts where turn 1 ended
    assert third["observation"].startswith("#######\n#__P__#") and third["history"] == [["Right", "Right"], []]
    assert states(third["response"]) == (third["observation"], "#######\n#_____#\n#__PXO#\n#######")
    # the prompt of turn 3: turn 1 rewritten with its true states, turn 2 verbatim
    assistant = [m["content"] for m in third["messages"] if m["role"] == "assistant"]
    assert assistant[0] == agent.THINK_START + first["response"]
    assert assistant[1] == agent.THINK_START + responses[1]
    assert [m["role"] for m in third["messages"]] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert sft.env_at_turn(third).render("coords") == third["observation"]


def test_heldout_split_is_by_puzzle(tiny):
    _, tokenizer = tiny
    episodes = agent.rollout(agent.random_policy(tokenizer, random.Random(0), "worldmodel"), tokenizer, "frozenlake",
                             list(range(100, 110)), 3, instruction="short")
    examples = sft.examples_from_episodes(episodes)
    split_of_seed = {}
    for ex in examples:
        split_of_seed.setdefault(ex["seed"], set()).add(ex["split"])
    assert all(len(s) == 1 for s in split_of_seed.values())
    assert {s for (s,) in split_of_seed.values()} == {"train", "heldout"}
    assert sorted(seed for seed, (s,) in split_of_seed.items() if s == "heldout") == [104, 109]


@pytest.mark.parametrize("env_name", ["sokoban", "frozenlake"])
def test_oracle_self_play_records_the_oracles_turns_with_true_states(tmp_path, tiny, env_name):
    """--behaviour oracle: every example is the oracle's plan from its turn's state ("I will play",
    the actions) and, on Sokoban (no chance), every episode is solved; rewritten with the true
    states like any self-play turn (the states asserts hold for any behaviour)."""
    _, tokenizer = tiny
    args = sft.parse_args(["--env", env_name, "--preset", "tiny", "--behaviour", "oracle", "--env-groups", "5",
                           "--group-size", "2", "--batches", "1", "--out", str(tmp_path)])
    examples = sft.self_play(args, None, tokenizer, torch.device("cpu"), str(tmp_path / "dataset.jsonl"))
    assert len({(ex["seed"], ex["sample"]) for ex in examples}) == 10  # every episode kept its turns
    for ex in examples:
        env = sft.env_at_turn(ex)  # replays the history to the recorded observation
        assert ex["actions"] == agent.oracle_plan(env, agent.MAX_TURNS - (ex["turn"] - 1))
        assert "I will play " + " || ".join(ex["actions"]) in ex["response"]
        assert states(ex["response"]) == (ex["observation"], ex["prediction"])
        for action in ex["executed"]:
            env.step(action)
        assert env.render("grid") == ex["prediction"]
    if env_name == "sokoban":
        last_turns = {}
        for ex in examples:
            last_turns[(ex["seed"], ex["sample"])] = ex
        for ex in last_turns.values():
            env = sft.env_at_turn(ex)
            assert [env.step(a)[3]["success"] for a in ex["executed"]][-1]


# -----------------------------------------------------------------------------
# loss masks, checked by decoding the tokens that carry loss

def test_sft_and_ppo_take_the_same_tokens_for_states_when_a_token_straddles_a_tag(qwen_style_tokenizer):
    """SFT's --loss-spans and PPO's --no-state-loss find the states by one rule (agent.state_spans):
    a token that overlaps a state is a state token, in both, with a tokenizer whose tokens cross tags."""
    tokenizer = qwen_style_tokenizer
    episodes = agent.rollout(agent.random_policy(tokenizer, random.Random(2), "worldmodel"), tokenizer,
                             "sokoban", [5, 6], 2, instruction="short")
    straddling = 0
    for ex in sft.examples_from_episodes(episodes, thought_trace=True)[:6]:
        ids, labels, kinds = sft.encode_example(tokenizer, ex, "states")
        response = [i for i, kind in enumerate(kinds) if kind != sft.PROMPT]
        assert response == list(range(response[0], len(ids)))  # the response is the end of the sequence
        ppo_states = rl.state_span_mask(tokenizer, ids[response[0]:])
        assert ppo_states == [int(kinds[i] in sft.STATE_KINDS) for i in response]
        assert [int(label != -100) for label in labels[response[0]:]] == ppo_states
        pieces = tokenizer.batch_decode([[t] for t in ids[response[0]:]])
        straddling += sum(piece.startswith(">") and len(piece.strip()) == 1 and piece != piece.strip()
                          for piece, state in zip(pieces, ppo_states) if state)  # ">\n", a state token
    assert straddling > 0  # the case this test is about did occur


def test_a_trace_like_thought_before_the_recorded_trace_is_a_state_as_in_ppo(tiny):
    """Thoughts that end in a step of their own ("Up to (1,1); ") run into the rewrite's trace: the
    rule (agent.state_spans) takes both as one trace, in SFT as in PPO, and the recorded trace is
    still where the dataset says -- not an error."""
    _, tokenizer = tiny
    episodes = agent.rollout(agent.random_policy(tokenizer, random.Random(1), "worldmodel"), tokenizer, "sokoban",
                             [5], 1, instruction="short")
    ex = sft.examples_from_episodes(episodes, thought_trace=True)[0]
    ex = {**ex, "response": ex["response"].replace(" " + ex["trace"], " Up to (1,1); " + ex["trace"])}
    ids, _, kinds = sft.encode_example(tokenizer, ex, "all")
    assert tokenizer.decode([t for t, k in zip(ids, kinds) if k == sft.TRACE]) == "Up to (1,1); " + ex["trace"]
    start = kinds.index(sft.OTHER)
    assert rl.state_span_mask(tokenizer, ids[start:]) == [int(k in sft.STATE_KINDS) for k in kinds[start:]]


@pytest.mark.parametrize("thought_trace", [False, True])
def test_loss_masks_cover_exactly_the_intended_tokens(tiny, thought_trace):
    _, tokenizer = tiny
    episodes = agent.rollout(agent.random_policy(tokenizer, random.Random(1), "worldmodel"), tokenizer, "sokoban",
                             [5, 6], 2, instruction="short")
    examples = sft.examples_from_episodes(episodes, thought_trace=thought_trace)
    assert examples and all(bool(ex["trace"]) == thought_trace for ex in examples)
    for ex in examples[:6]:
        response = ex["response"]
        o_start, o_end = response.index("<observation>") + 13, response.index("</observation>")
        p_start, p_end = response.index("<prediction>") + 12, response.index("</prediction>")
        t_start = p_start - 12 - len(ex["trace"])  # the trace ends the thoughts (after a space)
        expected = {"all": response + "<|im_end|>",
                    "states": response[o_start:o_end] + ex["trace"] + response[p_start:p_end],
                    "no-states": response[:o_start] + response[o_end:t_start] + response[p_start - 12:p_start]
                    + response[p_end:] + "<|im_end|>"}
        ids, _, kinds = sft.encode_example(tokenizer, ex, "all")
        assert tokenizer.decode([t for t, k in zip(ids, kinds) if k == sft.TRACE]) == ex["trace"]
        if ex["trace"]:  # a trace that is not where the response has it: a clear error, not a wrong mask
            with pytest.raises(ValueError, match="thought trace is not right before"):
                sft.encode_example(tokenizer, {**ex, "trace": "Up to (9,9)."}, "all")
        for spans, text in expected.items():
            ids, labels, kinds = sft.encode_example(tokenizer, ex, spans)
            assert len(ids) == len(labels) == len(kinds)
            observation = [t for t, k in zip(ids, kinds) if k == sft.OBSERVATION]
            prediction = [t for t, k in zip(ids, kinds) if k == sft.PREDICTION]
            assert tokenizer.decode(observation) == response[o_start:o_end]
            assert tokenizer.decode(prediction) == response[p_start:p_end]
            assert tokenizer.decode([t for t in labels if t != -100]) == text, spans
            # loss tokens never include the prompt
            n_prompt = len(tokenizer.encode(agent.prompt_text(tokenizer, ex["messages"]), add_special_tokens=False))
            assert all(t == -100 for t in labels[:n_prompt])


def test_a_conversation_carries_the_loss_of_each_of_its_turns(tiny):
    _, tokenizer = tiny
    episodes = agent.rollout(agent.random_policy(tokenizer, random.Random(3), "worldmodel"), tokenizer, "sokoban",
                             [7, 8], 2, instruction="short")
    grouped = sft.conversations(sft.examples_from_episodes(episodes))
    assert len(grouped) == 4 and max(len(turns) for turns in grouped) > 2
    for turns in grouped:
        assert [ex["turn"] for ex in turns] == sorted(ex["turn"] for ex in turns)
        for spans in sft.LOSS_SPANS:
            ids, labels, kinds = sft.encode_conversation(tokenizer, turns, spans)
            # the loss tokens of the conversation are those of its turns taken one by one, in order
            singles = [t for ex in turns for t in sft.encode_example(tokenizer, ex, spans)[1] if t != -100]
            assert [t for t in labels if t != -100] == singles
        ids, labels, kinds = sft.encode_conversation(tokenizer, turns, "all")
        assert tokenizer.decode([t for t in labels if t != -100]) == "".join(ex["response"] + "<|im_end|>"
                                                                              for ex in turns)
        assert sum(1 for a, b in zip(kinds, kinds[1:]) if a != sft.OBSERVATION and b == sft.OBSERVATION) == len(turns)


def test_shuffled_states_keep_the_form_and_say_nothing_about_the_puzzle(tiny):
    _, tokenizer = tiny
    episodes = agent.rollout(agent.random_policy(tokenizer, random.Random(4), "worldmodel"), tokenizer,
                             "frozenlake", list(range(20, 30)), 2, instruction="short")
    examples = sft.examples_from_episodes(episodes, thought_trace=True)
    shuffled = sft.shuffled_states(examples, random.Random(0))
    assert len(shuffled) == len(examples)
    pairs = []
    for ex, new in zip(examples, shuffled):
        parsed, original = agent.parse_response("<think>" + new["response"], "worldmodel"), ex["response"]
        assert parsed["format_valid"] and parsed["actions"] == agent.parse_actions(original)
        # everything outside the two state spans and the thought trace is unchanged
        strip = lambda r, trace: (r[:r.index("<observation>")]  # noqa: E731
                                  + r[r.index("</observation>"):r.index("<prediction>") - len(trace) - 1]
                                  + r[r.index("</prediction>"):])
        assert strip(new["response"], new["trace"]) == strip(original, ex["trace"])
        assert new["response"].index("<prediction>") - len(new["trace"]) - 1 == \
            new["response"].index(" " + new["trace"] + "<prediction>")
        # the truth stays in the fields evaluation scores against; the user messages are untouched
        assert (new["observation"], new["prediction"]) == (ex["observation"], ex["prediction"])
        assert [m for m in new["messages"] if m["role"] != "assistant"] == \
            [m for m in ex["messages"] if m["role"] != "assistant"]
        pairs.append((parsed["observation"], parsed["prediction"], new["trace"]))
    # earlier turns in a prompt read as those turns' shuffled responses, so a whole conversation is
    # one consistent text (--pack trains on exactly that)
    by_turn = {(ex["seed"], ex["sample"], ex["turn"]): ex for ex in shuffled}
    later = [ex for ex in shuffled if ex["turn"] > 1]
    assert later
    for ex in later:
        for turn in range(1, ex["turn"]):
            earlier = by_turn.get((ex["seed"], ex["sample"], turn))
            if earlier is not None:
                assert ex["messages"][2 * turn] == {"role": "assistant", "content": "<think>" + earlier["response"]}
    for turns in sft.conversations(shuffled):
        sft.encode_conversation(tokenizer, turns, "all")  # raises if the turns disagree
    # the states are a permutation of the examples' own (observation, prediction) pairs, moved around
    assert sorted(pairs) == sorted((ex["observation"], ex["prediction"], ex["trace"]) for ex in examples)
    assert sum(p[:2] == (ex["observation"], ex["prediction"]) for p, ex in zip(pairs, examples)) < len(examples) / 4
    assert sft.shuffled_states(examples, random.Random(0)) == shuffled  # seeded


def test_response_logits_are_the_models_logits(tiny):
    model, tokenizer = tiny
    episodes = agent.rollout(agent.random_policy(tokenizer, random.Random(4), "worldmodel"), tokenizer,
                             "frozenlake", [3], 2, instruction="short")
    encoded = [sft.encode_conversation(tokenizer, turns, "all")
               for turns in sft.conversations(sft.examples_from_episodes(episodes))]
    ids, mask, labels, kinds = sft.collate(encoded, list(range(len(encoded))), tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        logits, where = sft.response_logits(model, ids, mask, kinds)
        full = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    assert torch.allclose(logits, full[where], atol=1e-5)
    assert int(where.sum()) == sum(1 for e in encoded for k in e[2][1:] if k != sft.PROMPT)


def test_length_buckets_and_micro_batches():
    rng = random.Random(0)
    lengths = [rng.randint(50, 600) for _ in range(1000)]
    batches = sft.length_bucketed_batches(lengths, 16, random.Random(1))
    assert sorted(i for b in batches for i in b) == list(range(1000))
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert 1 - sum(lengths) / padded < 0.05  # bucketing keeps padding small
    assert batches != sft.length_bucketed_batches(lengths, 16, random.Random(2))
    assert batches == sft.length_bucketed_batches(lengths, 16, random.Random(1))
    for batch in batches[:20]:
        pieces = agent.micro_batches(batch, lengths, 2000)
        assert sorted(i for p in pieces for i in p) == sorted(batch)
        assert all(len(p) * max(lengths[i] for i in p) <= 2000 or len(p) == 1 for p in pieces)


def test_planned_steps_follow_epochs_and_the_token_budget():
    class Args:
        epochs, batch_size, seed, micro_batch_tokens, max_train_tokens = 2, 4, 0, 10_000, None
    lengths = [100] * 40
    assert sft.planned_steps(lengths, Args) == 20  # 10 batches of 4, twice
    Args.max_train_tokens = 1000  # each batch is 400 padded tokens: the budget runs out after 3
    assert sft.planned_steps(lengths, Args) == 3
    # how a batch is split into micro-batches (a memory setting, which a resume may change) does
    # not move the schedule
    lengths = [random.Random(i).randint(20, 400) for i in range(200)]
    Args.max_train_tokens = 30_000
    steps = set()
    for Args.micro_batch_tokens in (300, 1000, 10**7):
        steps.add(sft.planned_steps(lengths, Args))
    assert len(steps) == 1 and 0 < steps.pop() < 100


def test_learning_rate_schedule():
    class Args:
        lr, warmup, min_lr_ratio = 1e-3, 0.1, 0.0
    lrs = [sft.learning_rate(s, 100, Args) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3) and max(lrs) == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] < 1e-5


def test_cosine_decay_is_measured_from_the_end_of_warm_up():
    """The cosine phase starts at the peak on the first step after warm-up and is half-way down half-way
    through the remaining steps, to the floor min_lr_ratio * lr (progress counted from step 0
    instead would start it at ~0.98 lr and reach the floor early)."""
    class Args:
        lr, warmup, min_lr_ratio = 1e-3, 0.1, 0.1
    lrs = [sft.learning_rate(s, 100, Args) for s in range(100)]  # 10 warm-up steps, then 90 of cosine
    assert lrs[10] == pytest.approx(1e-3, rel=1e-9)
    assert lrs[55] == pytest.approx(1e-4 + 9e-4 * 0.5, rel=1e-9)  # progress 45 / 90
    assert lrs[99] == pytest.approx(1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi * 89 / 90)), rel=1e-9)
    assert min(lrs[10:]) > 1e-4  # the floor is approached, never passed


def test_presets_resolve_per_env_values_and_flags_win():
    lrs = {env: sft.parse_args(["--env", env, "--preset", "tiny", "--out", "x"]).lr for env in envs.ENVS}
    assert lrs == sft.PRESETS["tiny"]["lr"] and set(lrs) == set(envs.ENVS)
    args = sft.parse_args(["--env", "sokoban", "--preset", "tiny", "--out", "x", "--lr", "5e-4", "--epochs", "3"])
    assert (args.lr, args.epochs, args.batches) == (5e-4, 3, sft.PRESETS["tiny"]["batches"]["sokoban"])
    assert sft.parse_args(["--env", "sokoban", "--out", "x"]).lr == sft.PRESETS["paper"]["lr"]
    # the tiny preset packs the grid envs' episodes and not Sudoku's; the paper preset packs none; the flag wins
    tiny = {env: sft.parse_args(["--env", env, "--preset", "tiny", "--out", "x"]) for env in envs.ENVS}
    for env, args in tiny.items():
        assert (args.pack, args.batch_size, args.max_train_tokens, args.batches) == tuple(
            sft.PRESETS["tiny"][key][env] for key in ("pack", "batch_size", "max_train_tokens", "batches"))
    assert tiny["frozenlake"].pack is True and tiny["sokoban"].pack is True and tiny["sudoku"].pack is False
    assert tiny["frozenlake"].max_train_tokens is None  # two epochs end the run
    assert sft.parse_args(["--env", "frozenlake", "--preset", "tiny", "--out", "x", "--no-pack"]).pack is False
    assert sft.parse_args(["--env", "sudoku", "--preset", "tiny", "--out", "x", "--pack"]).pack is True
    assert sft.parse_args(["--env", "frozenlake", "--out", "x"]).pack is False
    # the thought trace: the tiny preset's scratchpad, off at paper scale (the model's own thoughts)
    assert all(args.thought_trace is True for args in tiny.values())
    assert sft.parse_args(["--env", "sokoban", "--out", "x"]).thought_trace is False
    assert sft.parse_args(["--env", "sokoban", "--preset", "tiny", "--out", "x", "--no-thought-trace"]).thought_trace \
        is False


def test_world_model_evaluation_scores_each_turn_exactly(tiny, monkeypatch):
    """evaluate_world_model's figures are issue 4's targets: exact values on hand-written responses."""
    model, tokenizer = tiny
    room = "######\n#P_XO#\n#____#\n######"
    (ep,) = play(tokenizer, "sokoban", [wm("Down")], {"room": room}, max_turns=1)
    (example,) = sft.examples_from_episodes([ep])
    start, after_down = example["observation"], example["prediction"]
    assert after_down == "######\n#__XO#\n#P___#\n######"
    responses = [wm("Down", observation=start, prediction=after_down),  # both right
                 wm("Up", observation="wrong", prediction=after_down),  # both wrong: Up hits the wall
                 wm("Jump", observation=start, prediction=room),  # both right: the env rejects Jump
                 wm("Down", answer=" ", observation=start, prediction=after_down)]  # no action: invalid
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def scripted_sample(model, prompts, *args, **kwargs):
        return [agent._encode(tokenizer, r) + [im_end] for r in responses[:len(prompts)]], None
    monkeypatch.setattr(agent, "sample", scripted_sample)
    summary, records = sft.evaluate_world_model(model, tokenizer, [example] * 4, 64)
    assert [(r["format_valid"], r["observation_exact"], r["prediction_exact"], r["prediction_bayes"])
            for r in records] == [(1, 1, 1, 1), (1, 0, 0, 1), (1, 1, 1, 1), (0, 1, 0, 1)]
    assert summary == {"observation_exact": 0.75, "prediction_exact": 0.5, "prediction_bayes": 1.0,
                       "format_valid": 0.75, "heldout_turns": 4}


def test_world_model_evaluation_prompts_are_the_training_sequences_prefix(qwen_style_tokenizer, monkeypatch):
    """A held-out turn's prompt is tokenised as its training sequence begins (agent.encode_chat),
    also with a tokenizer that merges across the prompt's end when given the text in one piece."""
    tokenizer = qwen_style_tokenizer
    episodes = agent.rollout(agent.random_policy(tokenizer, random.Random(4), "worldmodel"), tokenizer, "frozenlake",
                             [11, 12], 2, instruction="short")
    examples = [ex for ex in sft.examples_from_episodes(episodes) if ex["turn"] > 1][:4]  # prompts with responses
    assert examples
    seen = []

    def no_response(model, prompts, *args, **kwargs):
        seen.extend(prompts)
        return [[] for _ in prompts], None
    monkeypatch.setattr(agent, "sample", no_response)
    sft.evaluate_world_model(torch.nn.Linear(1, 1), tokenizer, examples, 8)
    for ex, prompt in zip(examples, seen):
        ids, _, kinds = sft.encode_example(tokenizer, ex, "all")
        assert prompt == ids[:kinds.index(sft.OTHER)]


def test_the_sft_step_is_the_same_in_any_micro_batches(tiny_dir):
    model, tokenizer = agent.load_model(tiny_dir, device="cpu")
    episodes = agent.rollout(agent.random_policy(tokenizer, random.Random(5), "worldmodel"), tokenizer, "sokoban",
                             [1, 2, 3], 2, instruction="short", max_turns=2)
    examples = sft.examples_from_episodes(episodes)[:6]
    encoded = [sft.encode_example(tokenizer, ex, "all") for ex in examples]
    lengths = [len(e[0]) for e in encoded]
    assert len(set(lengths)) > 1
    results = []
    for max_tokens in (10**6, 1):  # the whole batch at once; one sequence per micro-batch
        model, _ = agent.load_model(tiny_dir, device="cpu")
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # the step is the gradient
        loss, _, grad_norm = sft.train_step(model, optimizer, encoded, list(range(6)), lengths, tokenizer.pad_token_id,
                                            "cpu", torch.autocast("cpu", enabled=False), max_tokens, 1e9)
        results.append((loss, grad_norm, [p.detach().clone() for p in model.parameters()]))
    (loss_a, norm_a, params_a), (loss_b, norm_b, params_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5) and norm_a == pytest.approx(norm_b, rel=1e-4)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(params_a, params_b))


def test_a_few_steps_on_a_fixed_batch_drive_the_loss_down(tiny_dir):
    model, tokenizer = agent.load_model(tiny_dir, device="cpu")
    episodes = agent.rollout(agent.random_policy(tokenizer, random.Random(2), "worldmodel"), tokenizer, "frozenlake",
                             [1, 2], 2, instruction="short")
    examples = sft.examples_from_episodes(episodes)[:8]
    encoded = [sft.encode_example(tokenizer, ex, "all") for ex in examples]
    ids, mask, labels, kinds = sft.collate(encoded, list(range(len(encoded))), tokenizer.pad_token_id, "cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss_sum, count, _, _ = sft.token_losses(model, ids, mask, labels, kinds)
        (loss_sum / count).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss_sum.item() / count.item())
    assert losses[-1] < 0.5 * losses[0] and losses[-1] < min(losses[:5]), losses


# -----------------------------------------------------------------------------
# the script: resume, bad input, the CLI

SMALL = ["--env", "frozenlake", "--preset", "tiny", "--env-groups", "5", "--group-size", "2", "--batches", "1",
         "--epochs", "2", "--batch-size", "1", "--eval-turns", "4", "--max-response-tokens", "96"]  # packed episodes


def test_resume_continues_from_the_same_step_with_the_same_data_order(tmp_path, monkeypatch):
    straight = sft.main(SMALL + ["--out", str(tmp_path / "a")])
    rows_a = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]

    # the same run, interrupted after step 5 (last resumable save at step 4), then started again
    original = agent.append_jsonl

    def interrupt(path, *rows):
        original(path, *rows)
        if any(row.get("step") == 5 and "train/loss" in row for row in rows):
            raise KeyboardInterrupt
    monkeypatch.setattr(agent, "append_jsonl", interrupt)
    with pytest.raises(KeyboardInterrupt):
        sft.main(SMALL + ["--out", str(tmp_path / "b"), "--save-every", "2"])
    monkeypatch.setattr(agent, "append_jsonl", original)
    # the folder renamed before the resume: the fresh tiny model recorded inside it follows; and its
    # run_config.json lacks a flag, as one written before the flag existed: it was at its default.
    # Not so a flag a preset fills in (presets switch new features on): that run is refused
    shutil.move(tmp_path / "b", tmp_path / "renamed")
    recorded = json.load(open(tmp_path / "renamed" / "run_config.json"))
    (tmp_path / "renamed" / "run_config.json").write_text(json.dumps(
        {k: v for k, v in recorded.items() if k != "thought_trace"}))
    with pytest.raises(SystemExit, match=r"cannot continue \(thought_trace: None there, True now\)"):
        sft.main(SMALL + ["--out", str(tmp_path / "renamed"), "--save-every", "2"])
    del recorded["weight_decay"]
    (tmp_path / "renamed" / "run_config.json").write_text(json.dumps(recorded))
    resumed = sft.main(SMALL + ["--out", str(tmp_path / "renamed"), "--save-every", "2"])
    rows_b = [json.loads(line) for line in open(tmp_path / "renamed" / "metrics.jsonl")]

    def losses(rows):  # the last logged loss of every step
        return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    assert losses(rows_b) == losses(rows_a)
    assert [r["step"] for r in rows_b] == [r["step"] for r in rows_a]  # the redone steps are logged once
    assert [r for r in rows_b if "heldout/loss" in r] == [r for r in rows_a if "heldout/loss" in r]
    a = torch.load(tmp_path / "a" / "train_state.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "renamed" / "train_state.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight == resumed
    # finished: started again, nothing is trained, saved or evaluated again
    model_time = os.stat(tmp_path / "renamed" / "model" / "model.safetensors").st_mtime_ns
    monkeypatch.setattr(sft, "evaluate_world_model", lambda *a, **k: pytest.fail("evaluated again"))
    assert sft.main(SMALL + ["--out", str(tmp_path / "renamed"), "--save-every", "2"]) == resumed
    assert os.stat(tmp_path / "renamed" / "model" / "model.safetensors").st_mtime_ns == model_time
    assert [json.loads(line) for line in open(tmp_path / "renamed" / "metrics.jsonl")] == rows_b
    monkeypatch.undo()
    # another --eval-turns: evaluated again; the checkpoint is left as it is (evaluate.py keys a row
    # on its files' times, and would play a rewritten one again)
    again = sft.main(SMALL + ["--out", str(tmp_path / "renamed"), "--save-every", "2", "--eval-turns", "2"])
    assert again["eval_turns"] == 2 and again["heldout_turns"] == 2
    assert os.stat(tmp_path / "renamed" / "model" / "model.safetensors").st_mtime_ns == model_time
    # the same folder with other settings would train another run on this one's data and state
    with pytest.raises(SystemExit, match=r"cannot continue \(lr: 0.001 there, 0.002 now\)"):
        sft.main(SMALL + ["--out", str(tmp_path / "renamed"), "--save-every", "2", "--lr", "2e-3"])
    # nor may a flag the run did not record leave its default
    recorded = json.load(open(tmp_path / "renamed" / "run_config.json"))
    del recorded["weight_decay"]
    (tmp_path / "renamed" / "run_config.json").write_text(json.dumps(recorded))
    with pytest.raises(SystemExit, match=r"cannot continue \(weight_decay: not recorded \(taken as 0.01\) there, "
                                         r"0.1 now\)"):
        sft.main(SMALL + ["--out", str(tmp_path / "renamed"), "--save-every", "2", "--weight-decay", "0.1"])
    assert json.load(open(tmp_path / "renamed" / "run_config.json"))["lr"] == 1e-3


def test_interrupted_self_play_continues_with_its_batch_and_gives_the_same_dataset(tmp_path, tiny, monkeypatch):
    _, tokenizer = tiny

    def self_play(out):
        args = sft.parse_args(SMALL + ["--batches", "3", "--out", str(out)])
        os.makedirs(out, exist_ok=True)
        return sft.self_play(args, None, tokenizer, torch.device("cpu"), str(out / "dataset.jsonl"))
    straight = self_play(tmp_path / "a")
    batches = []
    rollout = agent.rollout

    def crash_in_the_third_batch(*args, **kwargs):
        batches.append(args[3][0])
        if len(batches) == 3:
            raise KeyboardInterrupt
        return rollout(*args, **kwargs)
    monkeypatch.setattr(agent, "rollout", crash_in_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        self_play(tmp_path / "b")
    monkeypatch.setattr(agent, "rollout", lambda *a, **k: batches.append(a[3][0]) or rollout(*a, **k))
    resumed = self_play(tmp_path / "b")
    assert batches == [10000, 10005, 10010, 10010]  # the first two batches were not played again
    assert (tmp_path / "b" / "dataset.jsonl").read_text() == (tmp_path / "a" / "dataset.jsonl").read_text()
    assert json.loads(json.dumps(resumed)) == json.loads(json.dumps(straight))
    assert sorted(os.listdir(tmp_path / "b")) == ["dataset.jsonl"]  # the partial file and its state are gone


def test_a_crash_after_an_epochs_heldout_line_logs_it_once_on_resume(tmp_path, monkeypatch):
    one_epoch = SMALL + ["--epochs", "1", "--save-every", "1"]
    # the crash lands after the held-out line, before the epoch's end is saved, while a line is half written
    original = agent.append_jsonl

    def crash(path, *rows):
        original(path, *rows)
        if any("heldout/loss" in row for row in rows):
            with open(path, "a") as f:
                f.write('{"step": 9')
            raise KeyboardInterrupt
    monkeypatch.setattr(agent, "append_jsonl", crash)
    with pytest.raises(KeyboardInterrupt):
        sft.main(one_epoch + ["--out", str(tmp_path / "b")])
    monkeypatch.setattr(agent, "append_jsonl", original)
    sft.main(one_epoch + ["--out", str(tmp_path / "b")])
    rows = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
    steps = len(rows) - 1
    assert [r["step"] for r in rows] == [*range(1, steps + 1), steps]  # every step once, then the held-out line
    assert ["heldout/loss" in r for r in rows] == [False] * steps + [True]
    # a line that is not JSON before the last one is not a crash's half line: a clear error
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write("garbage\n")
    with pytest.raises(SystemExit, match=r"line \d+ is not JSON; delete that line to keep the other rows"):
        agent.drop_metrics_after(str(tmp_path / "b" / "metrics.jsonl"), 1)


def test_bad_input_gives_clear_errors(tmp_path, tiny_dir, capsys):
    with pytest.raises(SystemExit):
        sft.main(SMALL + ["--out", str(tmp_path / "x"), "--data", str(tmp_path / "missing.jsonl")])
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "dataset.jsonl").write_text("")
    with pytest.raises(SystemExit):  # a run folder given for its dataset
        sft.main(SMALL + ["--out", str(tmp_path / "x"), "--data", str(tmp_path / "run")])
    assert f"is a folder; did you mean {tmp_path / 'run' / 'dataset.jsonl'}?" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt.jsonl"
    corrupt.write_text('{"env": "frozenlake"}\nnot json\n')
    with pytest.raises(SystemExit, match="lacks"):
        sft.main(SMALL + ["--out", str(tmp_path / "y"), "--data", str(corrupt)])
    corrupt.write_text("{\"env\": \n")
    with pytest.raises(SystemExit, match="not valid JSON"):
        sft.main(SMALL + ["--out", str(tmp_path / "y"), "--data", str(corrupt)])
    corrupt.write_text(json.dumps({**{key: "x" for key in sft.REQUIRED_KEYS}, "env": "sokoban", "split": "train",
                                   "trace": 5}) + "\n")
    with pytest.raises(SystemExit, match="thought trace is not a string"):
        sft.main(SMALL + ["--out", str(tmp_path / "y"), "--data", str(corrupt)])
    corrupt.write_text(json.dumps({**{key: "x" for key in sft.REQUIRED_KEYS}, "env": "frozenlake", "split": "train",
                                   "seed": 0, "sample": 0, "turn": 1, "history": []}) + "\n")
    with pytest.raises(SystemExit, match="messages of the wrong type"):
        sft.main(SMALL + ["--out", str(tmp_path / "y"), "--data", str(corrupt)])
    corrupt.write_text(json.dumps({**{key: "x" for key in sft.REQUIRED_KEYS}, "env": "frozenlake", "split": "train",
                                   "seed": 0, "sample": 0, "turn": 1, "history": [["Up"], "Down"], "messages": [],
                                   "env_overrides": []}) + "\n")
    with pytest.raises(SystemExit, match="history, env_overrides of the wrong type"):
        sft.main(SMALL + ["--out", str(tmp_path / "y"), "--data", str(corrupt)])
    sokoban = {**{key: "x" for key in sft.REQUIRED_KEYS}, "env": "sokoban", "split": "train", "seed": 0,
               "sample": 0, "turn": 1, "history": [], "messages": [{"role": "user", "content": "x"}]}
    corrupt.write_text(json.dumps(sokoban) + "\n")
    with pytest.raises(SystemExit, match="holds sokoban turns, not frozenlake"):
        sft.main(SMALL + ["--out", str(tmp_path / "y"), "--data", str(corrupt)])
    for flags, message in ((["--heldout-loss-turns", "-1"], "--heldout-loss-turns >= 0"),
                           (["--save-every", "0"], "--save-every >= 1"), (["--eval-turns", "0"], "--eval-turns >= 1"),
                           (["--grad-clip", "-1"], "--grad-clip > 0"),  # it would ascend the loss
                           (["--lr", "inf"], "must be a finite number"), (["--betas", "2", "2"], "0 <= --betas < 1"),
                           (["--env-groups", "3"], "--env-groups >= 5"), (["--group-size", "0"], "--group-size >= 1"),
                           (["--train-seed-start", "-5"], "--train-seed-start >= 0"),
                           (["--seed", str(2 ** 64)], "a seed is a whole number from 0 to 2**63 - 1"),
                           (["--env-overrides", '{"render_mode": "grid"}'], "set it with --render"),
                           (["--env-overrides", '{"slippery": "false"}'], "slippery must be true or false")):
        with pytest.raises(SystemExit):
            sft.main(SMALL + ["--out", str(tmp_path / "v"), *flags])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no training sequence fits in --max-length 10"):
        sft.main(SMALL + ["--out", str(tmp_path / "t"), "--max-length", "10"])
    warning = re.search(r"warning: (\d+) of (\d+) training turns are in sequences over --max-length 10 and are not "
                        r"trained on \(turn 1: (\d+)[^)]*\)", capsys.readouterr().err)
    assert warning and warning[1] == warning[2] and 0 < int(warning[3]) <= int(warning[1])
    # until training has saved a state, the self-play data can be trained on with other training
    # flags (here the learning rate; --max-length stays too small, so that nothing trains), not
    # with other self-play flags
    with pytest.raises(SystemExit, match="run again with a larger --max-length"):
        sft.main(SMALL + ["--out", str(tmp_path / "t"), "--max-length", "10", "--lr", "3e-3"])
    assert "dataset: " in capsys.readouterr().out  # read back, not played again
    with pytest.raises(SystemExit, match=r"cannot continue \(group_size: 2 there, 3 now"):
        sft.main(SMALL + ["--out", str(tmp_path / "t"), "--max-length", "10", "--group-size", "3"])
    with pytest.raises(SystemExit, match="no such folder"):
        sft.main(SMALL + ["--out", str(tmp_path / "z"), "--model", str(tmp_path / "no-model")])
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(tiny_dir, checkpoint)
    with pytest.raises(SystemExit, match="is a model checkpoint .* pass a new folder"):
        sft.main(SMALL + ["--out", str(checkpoint), "--model", str(checkpoint)])
    assert not (checkpoint / "dataset.jsonl").exists() and not (checkpoint / "model").exists()
    run = tmp_path / "w"
    run.mkdir()
    (run / "train_state.pt").write_bytes(b"truncated")
    with pytest.raises(SystemExit, match="no run_config.json there records its settings"):  # unknown settings
        sft.main(SMALL + ["--out", str(run)])
    with open(run / "run_config.json", "w") as f:  # the run's own settings: now the state itself is what is wrong
        json.dump(agent.run_config(sft.parse_args(SMALL + ["--out", str(run)])), f)
    with pytest.raises(SystemExit, match="cannot resume"):
        sft.main(SMALL + ["--out", str(run)])
    torch.save({"actor": {}, "step": 1}, run / "train_state.pt")  # rl.py's, say
    with pytest.raises(SystemExit, match="not a train state written by worldmodel_sft.py"):
        sft.main(SMALL + ["--out", str(run)])


def test_a_bad_dataset_row_is_found_before_training(tmp_path, tiny, monkeypatch):
    _, tokenizer = tiny
    episodes = agent.rollout(agent.random_policy(tokenizer, random.Random(0), "worldmodel"), tokenizer, "frozenlake",
                             list(range(5)), 2, instruction="short", max_turns=2)
    examples = sft.examples_from_episodes(episodes)
    heldout = next(i for i, ex in enumerate(examples) if ex["split"] == "heldout" and ex["turn"] == 2)
    path = tmp_path / "data.jsonl"

    def fails(change, message, row=heldout, before_the_model=True):
        rows = [dict(ex) for ex in examples]
        change(rows[row])
        agent.write_jsonl(str(path), rows)
        out = tmp_path / f"out{len(os.listdir(tmp_path))}"
        with monkeypatch.context() as patch:
            if before_the_model:  # a bad file fails in a second, not after a 1.5B model has loaded
                patch.setattr(agent, "load_model", lambda *a, **k: pytest.fail("the model was loaded first"))
            with pytest.raises(SystemExit, match=message):
                sft.main(SMALL + ["--data", str(path), "--out", str(out)])
        assert not (out / "metrics.jsonl").exists()  # nothing was trained
    # a held-out turn the evaluation after training could not replay: found now, not after training
    fails(lambda ex: ex.update(observation="P___"), "does not replay")
    fails(lambda ex: ex.update(env_overrides={"colour": 1}), "does not replay")
    fails(lambda ex: ex.update(history=ex["history"] + [["Up"]] * 20), "does not replay")
    fails(lambda ex: ex.update(seed=-3), r"seed -3 \(puzzle seeds are >= 0\)")
    fails(lambda ex: ex.update(seed=True), "seed of the wrong type")
    fails(lambda ex: ex.update(response=ex["response"].replace("<observation>", "")),
          "data.jsonl: frozenlake seed 0 turn 1: ", row=0, before_the_model=False)  # found by the tokenizer
    agent.write_jsonl(str(path), [{**ex, "split": "train"} for ex in examples])
    monkeypatch.setattr(agent, "load_model", lambda *a, **k: pytest.fail("the model was loaded first"))
    with pytest.raises(SystemExit, match="no held-out turns"):
        sft.main(SMALL + ["--data", str(path), "--out", str(tmp_path / "none-held-out")])
    agent.write_jsonl(str(path), examples)
    path.write_bytes(path.read_bytes() + b'{"env": "\xff"}\n')
    with pytest.raises(SystemExit, match=r"data.jsonl:\d+ is not UTF-8 text"):
        sft.main(SMALL + ["--data", str(path), "--out", str(tmp_path / "utf")])


def test_successful_episodes_alone_train_when_asked_and_a_dataset_must_say_which_they_are(tmp_path, tiny,
                                                                                            monkeypatch, capsys):
    """--episodes successful: every example records its episode's outcome, and training takes the
    training turns of the successful episodes -- all of them, and nothing else -- while the held-out
    turns stay whole. A dataset that cannot say which episodes succeeded is refused before the model loads."""
    _, tokenizer = tiny
    episodes = agent.rollout(agent.random_policy(tokenizer, random.Random(0), "worldmodel"), tokenizer, "frozenlake",
                             list(range(100, 110)), 4, instruction="short", env_overrides={"slippery": False})
    outcome = {(ep.seed, ep.sample): ep.success for ep in episodes}
    examples = sft.examples_from_episodes(episodes)
    assert all(ex["episode_success"] is outcome[(ex["seed"], ex["sample"])] for ex in examples)
    won_train = [ex for ex in examples if ex["split"] == "train" and ex["episode_success"]]
    assert won_train and len(won_train) < sum(ex["split"] == "train" for ex in examples)  # both kinds in the data
    path = tmp_path / "data.jsonl"
    agent.write_jsonl(str(path), examples)
    trained, original = [], sft.conversations
    monkeypatch.setattr(sft, "conversations", lambda turns: trained.extend(turns) or original(turns))
    summary = sft.main(SMALL + ["--data", str(path), "--episodes", "successful", "--epochs", "1",
                                "--out", str(tmp_path / "won")])
    key = lambda ex: (ex["seed"], ex["sample"], ex["turn"])  # noqa: E731
    assert sorted(map(key, trained)) == sorted(map(key, won_train))
    assert summary["heldout_turns"] == min(4, sum(ex["split"] == "heldout" for ex in examples))
    won_episodes = len({(ex["seed"], ex["sample"]) for ex in won_train})
    assert f"training turns, from {won_episodes} episodes" in capsys.readouterr().out
    monkeypatch.setattr(agent, "load_model", lambda *a, **k: pytest.fail("the model was loaded first"))
    for change, message in ((lambda ex: ex.pop("episode_success"), "do not record whether their episode succeeded"),
                            (lambda ex: ex.update(episode_success=False), "no training turn comes from an episode"),
                            (lambda ex: ex.update(episode_success="yes"), "episode_success of the wrong type")):
        rows = [dict(ex) for ex in examples]
        for row in rows:
            change(row)
        agent.write_jsonl(str(path), rows)
        with pytest.raises(SystemExit, match=message):
            sft.main(SMALL + ["--data", str(path), "--episodes", "successful", "--out", str(tmp_path / "bad")])


def test_cli_help_and_a_small_run(tmp_path):
    help_text = subprocess.run([sys.executable, "worldmodel_sft.py", "--help"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout
    assert "--loss-spans" in help_text and "--preset" in help_text
    # defaults that depend on --env are shown per env
    assert "(paper: 0.0001; tiny: frozenlake 0.001, sokoban 0.001, sudoku 0.002)" in " ".join(help_text.split())
    # no --out: the run folder is runs/sft-ENV below the working folder
    out = subprocess.run([sys.executable, os.path.join(ROOT, "worldmodel_sft.py"), *SMALL, "--epochs", "1"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600, check=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("observation_exact", "prediction_exact", "prediction_bayes", "format_valid"):
        assert 0.0 <= summary[key] <= 1.0
    run = tmp_path / "runs" / "sft-frozenlake"
    for name in ("dataset.jsonl", "metrics.jsonl", "run_config.json", "eval.json", "train_state.pt"):
        assert (run / name).is_file(), name
    model, tokenizer = agent.load_model(str(run / "model"))
    assert json.loads((run / "model" / "run_config.json").read_text())["env"] == "frozenlake"
