"""Prompts, response parsing and the multi-turn rollout (SPEC §3), with scripted policies."""
import random

import pytest
import torch

import agent
import envs

FORMAT_WM = ("<think> <observation> [current state] </observation> [Your thoughts] <prediction> [next state]"
             "</prediction> </think> <answer> [your answer] </answer>")


def scripted(tokenizer, responses):
    """A policy that answers turn t of every episode with responses[t - 1]."""
    return agent.text_policy(tokenizer, lambda ep: responses[len(ep.turns)])


# -----------------------------------------------------------------------------
# prompts

def test_prompts_for_a_hand_written_history_character_for_character(tiny):
    _, tokenizer = tiny
    responses = [" <observation> P__ </observation> right <prediction> _P_ </prediction> </think> "
                 "<answer> Right </answer>",
                 " <observation> _P_ </observation> on <prediction> __√ </prediction> </think> "
                 "<answer> Right || Down || Down </answer>"]
    (ep,) = agent.rollout(scripted(tokenizer, responses), tokenizer, "frozenlake", [0], 1, mode="worldmodel",
                          render="coords", instruction="short", max_response_tokens=128,
                          env_overrides={"desc": ["P__", "_O_", "__G"], "slippery": False})
    expected = (
        "<|im_start|>system\nYou're a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n"
        "FrozenLake: reach the goal G, avoid holes O. _ ice, P you, X you in a "  # no slips: no slip clause
        "hole, √ you on G. (row,col) from 0. Actions Left Down Right Up, e.g. <answer>Down || Right</answer>\n"
        "Turn 1:\nState:\nP__\n_O_\n__G\nPlayer (0,0); hole at (1,1); goal at (2,2).\n"
        f"You have 10 actions left. Always output: {FORMAT_WM} with no extra text. Strictly follow this format. "
        "Max response length: 128 words (tokens).<|im_end|>\n"
        "<|im_start|>assistant\n<think>" + responses[0] + "<|im_end|>\n"
        "<|im_start|>user\nReward:\n0\n"
        "Turn 2:\nState:\n_P_\n_O_\n__G\nPlayer (0,1); hole at (1,1); goal at (2,2).\n"
        f"You have 9 actions left. Always output: {FORMAT_WM} with no extra text. Strictly follow this format. "
        "Max response length: 128 words (tokens).<|im_end|>\n"
        "<|im_start|>assistant\n<think>" + responses[1] + "<|im_end|>")
    assert tokenizer.decode(ep.tokens) == expected
    # the chat template renders the same conversation from the messages
    assert tokenizer.apply_chat_template(ep.messages, tokenize=False) == expected + "\n"
    # and the prompt of turn 2 is exactly what prompt_text builds from the history
    turn2_prompt = agent.prompt_text(tokenizer, ep.messages[:4])
    assert expected.startswith(turn2_prompt) and turn2_prompt.endswith("<|im_start|>assistant\n<think>")
    assert ep.success and ep.score == pytest.approx(1.0) and ep.end_reason == "env"
    assert [t["executed"] for t in ep.turns] == [["Right"], ["Right", "Down", "Down"]]


def test_base_mode_turn_text_and_reward_formatting():
    text = agent.user_message(3, "P_\n_G", 7, "base", 400, reward=-0.30000000000000004)
    assert text == ("Reward:\n-0.3\nTurn 3:\nState:\nP_\n_G\nYou have 7 actions left. Always output: <think> "
                    "[Your thoughts] </think> <answer> [your answer] </answer> with no extra text. Strictly "
                    "follow this format. Max response length: 400 words (tokens).")
    rewards = (-0.0, 0.0, 1.0, 10.9, -1.1, 0.1 + 0.2)
    assert [agent.format_reward(r) for r in rewards] == ["0", "0", "1", "10.9", "-1.1", "0.3"]


def test_instructions_name_every_symbol_and_action_of_their_env():
    for style in ("full", "short"):
        for name in ("sokoban", "frozenlake"):
            text = agent.INSTRUCTIONS[style][name]
            symbols = envs.make(name).SYMBOLS.values()
            assert all(s in text for s in symbols), (style, name)
            assert all(a in text for a in envs.make(name).ACTIONS), (style, name)
        assert "<answer>" in agent.INSTRUCTIONS[style]["sudoku"] and "row,col" in agent.INSTRUCTIONS[style]["sudoku"]


def test_frozenlake_without_slips_is_told_so():
    for style in ("full", "short"):
        slippery = agent.INSTRUCTIONS[style]["frozenlake"]
        assert "slip" in slippery
        assert agent.env_instruction(style, "frozenlake", envs.make("frozenlake")) == slippery
        steady = agent.env_instruction(style, "frozenlake", envs.make("frozenlake", slippery=False))
        assert "slip" not in steady.replace("does not slip", ""), style  # the clause was found and replaced
        assert all(s in steady for s in envs.make("frozenlake").SYMBOLS.values()), style
        for name in ("sokoban", "sudoku"):
            assert agent.env_instruction(style, name, envs.make(name)) == agent.INSTRUCTIONS[style][name]
    assert agent.env_instruction("full", "frozenlake", envs.make("frozenlake", slippery=False)).count(
        "The ice does not slip: every move goes where you meant it to.") == 1


def test_the_rollout_tells_each_episode_about_its_own_ice(tiny):
    _, tokenizer = tiny
    for overrides, clause in (({}, "; the ice may slip you sideways."), ({"slippery": False}, "avoid holes O. _ ice")):
        (ep,) = agent.rollout(scripted(tokenizer, [answer("Up")]), tokenizer, "frozenlake", [0], 1, mode="base",
                              instruction="short", max_turns=1, env_overrides=overrides)
        assert clause in ep.messages[1]["content"] and clause in tokenizer.decode(ep.tokens)


# -----------------------------------------------------------------------------
# parsing

WM_OK = "<think> <observation> P_ </observation> hm <prediction> _P </prediction> </think> <answer> Right </answer>"


@pytest.mark.parametrize("response, mode, valid, actions", [
    (WM_OK, "worldmodel", True, ["Right"]),
    (WM_OK, "base", True, ["Right"]),  # base mode does not forbid state spans
    ("<think> go </think> <answer> Up || Left </answer>", "base", True, ["Up", "Left"]),
    ("<think> go </think> <answer> Up || Left </answer>", "worldmodel", False, []),  # no states
    ("  <think>\ngo\n</think>\n<answer>Up</answer>\n ", "base", True, ["Up"]),  # whitespace around is fine
    ("<think> go </think> <answer> a||b||c||d||e||f </answer>", "base", True, ["a", "b", "c", "d", "e"]),
    ("<think> go </think> <answer> Up", "base", False, []),  # truncated
    ("<think> go </think>", "base", False, []),  # missing answer
    ("<think> go </think> <answer>  </answer>", "base", False, []),  # empty answer
    ("<think> go </think> <answer> Up </answer> and more", "base", False, []),  # extra text
    ("<think> go </think> <answer> Up </answer><answer> Down </answer>", "base", False, []),  # duplicated
    ("<think> a <think> b </think> </think> <answer> Up </answer>", "base", False, []),  # nested think
    ("<think> go </think> <answer> <answer> Up </answer> </answer>", "base", False, []),  # nested answer
    ("<think> <prediction> x </prediction> <observation> y </observation> </think> <answer> Up </answer>",
     "worldmodel", False, []),  # wrong order
    ("<think> <observation> a </observation> <observation> b </observation> <prediction> c </prediction> "
     "</think> <answer> Up </answer>", "worldmodel", False, []),  # duplicated observation
    ("<think> <observation> a </observation> <prediction> c </think> <answer> Up </answer>",
     "worldmodel", False, []),  # unclosed prediction
    ("<think> 思考 ✓ </think> <answer> 上 || Ｕｐ </answer>", "base", True, ["上", "Ｕｐ"]),  # non-ASCII
    ("<think> go </think> <answer> Up <prediction> x </prediction> </answer>", "base", False, []),  # tag in answer
    ("<think> go </think> x <answer> Up </answer>", "base", False, []),  # text between think and answer
    ("<answer> Up </answer> <think> go </think>", "base", False, []),  # swapped
    ("", "base", False, []),
    ("no tags at all", "worldmodel", False, []),
])
def test_parse_response(response, mode, valid, actions):
    parsed = agent.parse_response(response, mode)
    assert parsed["format_valid"] == valid
    assert parsed["actions"] == actions


def test_parse_time_is_linear_on_adversarial_junk():
    """Repeated tags once made a regex backtrack for minutes; 2 s is a bound against that, not a
    performance target (it takes milliseconds)."""
    import time
    for text in ("<think>" + "<observation> a </observation> <prediction> b " * 3000 + "</think><answer>Up</answer>",
                 "<think>" + "<observation>" * 3000 + "</observation>" * 3000 + "<prediction>" * 3000,
                 "<think></think><answer>" * 5000, "<answer>" * 20000):
        start = time.perf_counter()
        assert agent.parse_response(text, "worldmodel")["format_valid"] is False
        agent.parse_actions(text)
        assert time.perf_counter() - start < 2.0


def test_parse_response_spans_and_junk():
    parsed = agent.parse_response(WM_OK, "worldmodel")
    assert (parsed["observation"], parsed["prediction"], parsed["answer"]) == ("P_", "_P", "Right")
    for junk in (None, 7, b"<think></think>"):
        assert agent.parse_response(junk, "base")["format_valid"] is False
    with pytest.raises(ValueError, match="mode must be one of"):  # a caller's typo is not an invalid turn
        agent.parse_response(WM_OK, "WORLDMODEL")
    rng = random.Random(0)
    pieces = ["<think>", "</think>", "<answer>", "</answer>", "<observation>", "</observation>",
              "<prediction>", "</prediction>", "Up", "||", " ", "\n", "é", "\x00"]
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 25)))
        parsed = agent.parse_response(text, rng.choice(agent.MODES))
        assert len(parsed["actions"]) <= 5 and (parsed["format_valid"] or parsed["actions"] == [])


# -----------------------------------------------------------------------------
# the rollout's rules, with scripted policies

def answer(*actions):
    return f" go </think> <answer> {' || '.join(actions)} </answer>"


def test_rollout_action_cap_budget_and_turn_limit(tiny):
    _, tokenizer = tiny
    room = "#######\n#P____#\n#___XO#\n#######"
    # turn 1: 7 actions, only 5 kept; turn 2: 5 more, 10 in all: the episode ends after turn 2 with
    # the budget spent
    responses = [answer("Left", "Up", "Up", "Left", "Up", "Right", "Right"), answer(*["Up"] * 5), answer("Down")]
    (ep,) = agent.rollout(scripted(tokenizer, responses), tokenizer, "sokoban", [0], 1, mode="base",
                          render="grid", env_overrides={"room": room})
    assert [t["executed"] for t in ep.turns] == [["Left", "Up", "Up", "Left", "Up"], ["Up"] * 5]
    assert ep.env.actions_left == 0 and ep.end_reason == "env" and not ep.success
    assert ep.turn_rewards == pytest.approx([-0.5, -0.5]) and ep.score == pytest.approx(-1.0)
    # 4 + 3 + 5: the third turn runs only the 3 actions the budget still allows
    responses = [answer(*["Up"] * 4), answer(*["Up"] * 3), answer(*["Up"] * 5)]
    (ep,) = agent.rollout(scripted(tokenizer, responses), tokenizer, "sokoban", [0], 1, mode="base",
                          render="grid", env_overrides={"room": room})
    assert [len(t["executed"]) for t in ep.turns] == [4, 3, 3] and ep.env.actions_left == 0
    # the turn limit: 5 turns of one wall-bump each, then the episode ends
    (ep,) = agent.rollout(scripted(tokenizer, [answer("Up")] * 6), tokenizer, "sokoban", [0], 1, mode="base",
                          render="grid", env_overrides={"room": room})
    assert len(ep.turns) == 5 and ep.end_reason == "turns" and ep.env.actions_left == 5
    (ep,) = agent.rollout(scripted(tokenizer, [answer("Up")] * 6), tokenizer, "sokoban", [0], 1, mode="base",
                          render="grid", max_turns=2, env_overrides={"room": room})
    assert len(ep.turns) == 2 and ep.end_reason == "turns"
    # the per-turn cap and the format penalty are the rollout's arguments, not fixed numbers
    (ep,) = agent.rollout(scripted(tokenizer, [answer("Left", "Up", "Up"), answer("Jump")]), tokenizer, "sokoban",
                          [0], 1, mode="base", render="grid", max_turns=2, max_actions_per_turn=2,
                          format_penalty=-0.5, env_overrides={"room": room})
    assert [t["executed"] for t in ep.turns] == [["Left", "Up"], []]
    assert ep.turn_rewards == pytest.approx([-0.2, -0.5])


def test_rollout_success_ends_mid_turn_and_rewards(tiny):
    _, tokenizer = tiny
    room = "######\n#P_XO#\n#____#\n######"
    (ep,) = agent.rollout(scripted(tokenizer, [answer("Right", "Right", "Left", "Left")]), tokenizer, "sokoban",
                          [0], 1, mode="base", render="grid", env_overrides={"room": room})
    assert ep.success and ep.end_reason == "env" and ep.turns[0]["executed"] == ["Right", "Right"]
    assert ep.score == pytest.approx(-0.2 + 1 + 10)
    assert ep.turns[0]["state_before"] == "######\n#P_XO#\n#____#\n######"
    assert ep.turns[0]["state_after"] == "######\n#__P√#\n#____#\n######"
    # an action after the end is not run, so not judged: no format penalty for it
    (ep,) = agent.rollout(scripted(tokenizer, [answer("Right", "Right", "Jump")]), tokenizer, "sokoban",
                          [0], 1, mode="base", render="grid", env_overrides={"room": room})
    assert ep.success and ep.turns[0]["invalid_actions"] == [] and ep.turns[0]["penalty"] == 0.0


def test_rollout_format_penalty(tiny):
    _, tokenizer = tiny
    room = "######\n#P_XO#\n#____#\n######"
    responses = [" no answer here </think>",  # missing answer: penalty, nothing runs
                 answer("Down", "Jump", "Up"),  # an action the env rejects: penalty, the valid ones run
                 " <observation> x </observation> <prediction> y </prediction> </think> <answer> Down </answer>"]
    (ep,) = agent.rollout(scripted(tokenizer, responses), tokenizer, "sokoban", [0], 1, mode="base",
                          render="grid", max_turns=3, env_overrides={"room": room})
    t1, t2, t3 = ep.turns
    assert not t1["format_valid"] and t1["executed"] == [] and t1["reward"] == pytest.approx(-0.1)
    assert t2["format_valid"] and t2["executed"] == ["Down", "Up"] and t2["invalid_actions"] == ["Jump"]
    assert t2["reward"] == pytest.approx(-0.2 - 0.1)
    assert t3["format_valid"] and t3["penalty"] == 0.0  # base mode tolerates state spans
    assert ep.score == pytest.approx(sum(ep.turn_rewards)) and ep.score == pytest.approx(-0.1 - 0.3 - 0.1)
    # world-model mode requires the observation and prediction
    (ep,) = agent.rollout(scripted(tokenizer, [answer("Down")]), tokenizer, "sokoban", [0], 1, mode="worldmodel",
                          render="grid", max_turns=1, env_overrides={"room": room})
    assert not ep.turns[0]["format_valid"] and ep.turns[0]["executed"] == [] and ep.score == pytest.approx(-0.1)


def test_the_next_prompt_reports_the_env_reward_without_the_format_penalty(tiny):
    """The "Reward:" line of the next user message is what the env said; the format penalty is a
    training signal and stays out of it (a penalised turn must not read as an env reward of -0.1)."""
    _, tokenizer = tiny
    room = "######\n#P_XO#\n#____#\n######"
    responses = [" no answer here </think>",  # format penalty -0.1, nothing runs: the env said 0
                 answer("Down", "Jump", "Up"),  # two steps of -0.1 from the env, and the penalty -0.1
                 answer("Down")]
    (ep,) = agent.rollout(scripted(tokenizer, responses), tokenizer, "sokoban", [0], 1, mode="base",
                          render="grid", max_turns=3, env_overrides={"room": room})
    t1, t2, _ = ep.turns
    assert (t1["env_reward"], t1["reward"]) == (0.0, pytest.approx(-0.1))
    assert (t2["env_reward"], t2["reward"]) == (pytest.approx(-0.2), pytest.approx(-0.3))
    assert [m["role"] for m in ep.messages[3:6:2]] == ["user", "user"]
    assert ep.messages[3]["content"].startswith("Reward:\n0\nTurn 2:")
    assert ep.messages[5]["content"].startswith("Reward:\n-0.2\nTurn 3:")


def test_rollout_tokens_masks_and_truncated_responses(tiny):
    _, tokenizer = tiny
    long = answer("Up") + " and then a very long ramble" * 40
    responses = [answer("Down"), long, answer("Up")]
    episodes = agent.rollout(scripted(tokenizer, responses), tokenizer, "frozenlake", [3, 4], 2, mode="base",
                             render="grid", max_response_tokens=30, max_turns=3,
                             env_overrides={"desc": ["P___", "____", "____", "___G"], "slippery": False})
    assert [ep.group for ep in episodes] == [0, 0, 1, 1] and [ep.seed for ep in episodes] == [3, 3, 4, 4]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for ep in episodes:
        assert len(ep.tokens) == len(ep.assistant_mask) == len(ep.logprobs)
        assert len(ep.turn_ends) == len(ep.turns) == 3
        # the generated spans are exactly the responses; turn_ends point at each span's last token
        spans, current = [], []
        for i, (token, m) in enumerate(zip(ep.tokens, ep.assistant_mask)):
            if m:
                current.append(token)
                if i + 1 == len(ep.tokens) or not ep.assistant_mask[i + 1]:
                    spans.append((i, current))
                    current = []
        assert [end for end, _ in spans] == ep.turn_ends
        assert spans[0][1][-1] == im_end and len(spans[1][1]) == 30 and spans[1][1][-1] != im_end
        # cut at the budget: not stopped, and the text after </answer> makes it format-invalid
        assert not ep.turns[1]["stopped"] and not ep.turns[1]["format_valid"]
        # the template's <|im_end|> still closes the truncated message, as a prompt token
        assert ep.tokens[ep.turn_ends[1] + 1] == im_end and ep.assistant_mask[ep.turn_ends[1] + 1] == 0
        assert tokenizer.apply_chat_template(ep.messages, tokenize=False) == tokenizer.decode(ep.tokens) + "\n"


@pytest.mark.parametrize("which", ["tiny", "qwen_style_tokenizer"])
@pytest.mark.parametrize("mode, budget", [("worldmodel", agent.MAX_RESPONSE_TOKENS), ("base", 6)])
def test_encode_chat_tokenises_a_conversation_as_the_rollout_built_it(which, mode, budget, request):
    """SFT tokenises the rendered conversations it trains on with agent.encode_chat: it must give the
    rollout's tokens, response by response, also where tokenising the text in one piece would not
    (and with responses cut short by the budget, which have no <|im_end|>)."""
    tokenizer = request.getfixturevalue(which)[1] if which == "tiny" else request.getfixturevalue(which)
    episodes = agent.rollout(agent.random_policy(tokenizer, random.Random(3), mode), tokenizer, "sokoban",
                             [7, 8], 2, mode=mode, instruction="short", max_response_tokens=budget)
    joined_differs = cut_short = False
    for ep in episodes:
        last = ep.messages[-1]["content"][len(agent.THINK_START):]
        text = agent.prompt_text(tokenizer, ep.messages[:-1]) + last + ("<|im_end|>" if ep.turns[-1]["stopped"] else "")
        ids, offsets = agent.encode_chat(tokenizer, text)
        assert ids == ep.tokens
        assert "".join(text[start:end] for start, end in offsets) == text
        joined_differs |= tokenizer.encode(text, add_special_tokens=False) != ep.tokens
        cut_short |= not all(turn["stopped"] for turn in ep.turns)
    # the tiny tokenizer keeps every tag a token, so one piece is the same; Qwen2's split merges '><'
    assert joined_differs == (which == "qwen_style_tokenizer")
    assert cut_short == (budget == 6)


def test_rollout_context_limit(tiny):
    _, tokenizer = tiny
    responses = [answer("Down") + " padding" * 30] * 5
    inner, budgets_seen = scripted(tokenizer, responses), []

    def policy(prompts, episodes, budgets):
        budgets_seen.extend(budgets)
        return inner(prompts, episodes, budgets)

    kwargs = dict(mode="base", render="grid", instruction="short", max_response_tokens=100,
                  env_overrides={"desc": ["P___", "____", "____", "___G"], "slippery": False})
    (ep,) = agent.rollout(policy, tokenizer, "frozenlake", [1], 1, max_context_tokens=260, **kwargs)
    assert ep.end_reason == "context" and 1 <= len(ep.turns) < 5
    # every turn got its full response budget, and the conversation stays within the limit
    assert budgets_seen == [100] * len(ep.turns) and len(ep.tokens) <= 260
    # it ends on the last answered turn: the next user message and a full response would not fit
    assert ep.messages[-1]["role"] == "assistant" and ep.turn_ends[-1] == len(ep.tokens) - 1
    (longer,) = agent.rollout(scripted(tokenizer, responses), tokenizer, "frozenlake", [1], 1,
                              max_context_tokens=10_000, **kwargs)
    assert longer.tokens[:len(ep.tokens)] == ep.tokens and len(longer.turns) > len(ep.turns)
    starts = [i for i in range(1, len(longer.tokens)) if longer.assistant_mask[i] and not longer.assistant_mask[i - 1]]
    assert starts[len(ep.turns)] + 100 > 260 >= starts[len(ep.turns) - 1] + 100
    # a first prompt that leaves no room for a full response plays no turn
    (none,) = agent.rollout(scripted(tokenizer, responses), tokenizer, "frozenlake", [1], 1,
                            max_context_tokens=starts[0] + 99, **kwargs)
    assert none.end_reason == "context" and none.turns == [] and none.tokens == longer.tokens[:starts[0]]


def test_rollout_plays_a_turn_that_exactly_fills_the_context(tiny):
    """The context check's boundary: a next prompt plus a full response that fill max_context_tokens
    exactly still fit (the limit is inclusive), at the first turn and at a later one."""
    _, tokenizer = tiny
    responses = [answer("Down") + " padding" * 30] * 5
    kwargs = dict(mode="base", render="grid", instruction="short", max_response_tokens=100,
                  env_overrides={"desc": ["P___", "____", "____", "___G"], "slippery": False})
    (longer,) = agent.rollout(scripted(tokenizer, responses), tokenizer, "frozenlake", [1], 1,
                              max_context_tokens=10_000, **kwargs)
    starts = [i for i in range(1, len(longer.tokens)) if longer.assistant_mask[i] and not longer.assistant_mask[i - 1]]
    assert len(starts) >= 3
    for turns in (1, 2):  # the limit leaves room for exactly `turns` prompts and full responses
        limit = starts[turns - 1] + 100
        (ep,) = agent.rollout(scripted(tokenizer, responses), tokenizer, "frozenlake", [1], 1,
                              max_context_tokens=limit, **kwargs)
        assert len(ep.turns) == turns and ep.end_reason == "context"
        assert len(ep.tokens) <= limit and ep.tokens == longer.tokens[:len(ep.tokens)]


def test_rollout_with_the_model_is_reproducible(tiny):
    model, tokenizer = tiny

    def run(seed):
        policy = agent.model_policy(model, tokenizer, generator=torch.Generator().manual_seed(seed))
        return agent.rollout(policy, tokenizer, "sokoban", [10, 11], 2, instruction="short", max_turns=2,
                             max_response_tokens=12)
    a, b, c = run(0), run(0), run(1)
    assert [ep.tokens for ep in a] == [ep.tokens for ep in b]
    assert [ep.logprobs for ep in a] == [ep.logprobs for ep in b]
    assert [ep.tokens for ep in a] != [ep.tokens for ep in c]
    for ep in a:
        assert all(lp < 0 for lp, m in zip(ep.logprobs, ep.assistant_mask) if m)
        assert ep.score == pytest.approx(sum(ep.turn_rewards))


def test_random_policy_plays_every_env(tiny):
    _, tokenizer = tiny
    for name in envs.ENVS:
        episodes = agent.rollout(agent.random_policy(tokenizer, random.Random(0), "worldmodel"), tokenizer, name,
                                 [0, 1], 2, instruction="short", max_response_tokens=200)
        assert len(episodes) == 4
        for ep in episodes:
            assert ep.done and all(t["format_valid"] for t in ep.turns)
            assert all(1 <= len(t["actions"]) <= 5 for t in ep.turns)
            assert all(t["observation"] == t["coords_before"] for t in ep.turns)


def test_random_actions_plan_short():
    env = envs.make("sokoban")
    env.reset(0)
    rng = random.Random(0)
    counts = [len(agent.random_actions(env, rng)) for _ in range(20_000)]
    for n, p in ((1, 0.6), (2, 0.24), (3, 0.096)):
        assert abs(counts.count(n) / len(counts) - p) < 0.02
    assert max(counts) == 5 and all(a in env.ACTIONS for a in agent.random_actions(env, rng))
    sudoku = envs.make("sudoku")
    sudoku.reset(0)
    empty = {(i // 4 + 1, i % 4 + 1) for i, v in enumerate(sudoku.render().split()) if v == "."}
    for action in agent.random_actions(sudoku, rng, 5):
        r, c, v = map(int, action.split(","))
        assert (r, c) in empty and 1 <= v <= 4


def test_rollout_rejects_bad_arguments(tiny):
    _, tokenizer = tiny
    policy = scripted(tokenizer, [answer("Up")])
    with pytest.raises(ValueError, match="unknown env"):
        agent.rollout(policy, tokenizer, "chess", [0], 1)
    with pytest.raises(ValueError, match="unknown mode"):
        agent.rollout(policy, tokenizer, "sokoban", [0], 1, mode="wm")
    with pytest.raises(ValueError, match="unknown instruction"):
        agent.rollout(policy, tokenizer, "sokoban", [0], 1, instruction="long")


def test_a_response_that_stops_on_another_end_token_is_still_closed_by_the_template(tiny_dir):
    # a base (non-instruct) Qwen tokenizer's EOS is <|endoftext|>: a response may stop on it, and
    # the template's <|im_end|> must still close the message before the next user turn
    tokenizer = agent.load_tokenizer(tiny_dir)
    end_of_text, im_end = (tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>"))
    assert tokenizer.eos_token == "<|im_end|>"  # as Qwen2.5-Instruct's; its generation config also stops on
    assert set(agent.stop_token_ids(tokenizer)) == {end_of_text, im_end}  # <|endoftext|>, and so do we
    tokenizer.eos_token = "<|endoftext|>"
    assert set(agent.stop_token_ids(tokenizer)) == {end_of_text, im_end}

    def policy(prompts, episodes, budgets):
        return [(agent._encode(tokenizer, answer("Up")) + [end_of_text], None) for _ in episodes]

    (ep,) = agent.rollout(policy, tokenizer, "sokoban", [10_000], 1, mode="base", max_turns=2)
    assert [turn["stopped"] for turn in ep.turns] == [True, True]
    first_end = ep.turn_ends[0]
    assert ep.tokens[first_end] == end_of_text and ep.tokens[first_end + 1] == im_end
    assert ep.assistant_mask[first_end] == 1 and ep.assistant_mask[first_end + 1] == 0
    assert "<|endoftext|><|im_end|>\n<|im_start|>user" in tokenizer.decode(ep.tokens)


@pytest.mark.parametrize("change, message", [
    (lambda t: t.replace("message['content']", "message['content'] + message['content']"), "verbatim"),
    (lambda t: t.replace("message['content'] + '<|im_end|>'",
                         "message['content'] + (' END' if message['role'] == 'assistant' else '<|im_end|>')"),
     "must end an assistant message with a special token"),
])
def test_a_chat_template_incremental_prompts_cannot_follow_is_refused(tmp_path, tiny_dir, change, message):
    """The rollout builds prompts piece by piece from the template, and SFT cuts responses where the
    rollout does: a template that renders contents other than verbatim, or ends an assistant message
    with plain text a response's last token could merge with, is an error, not silently other tokens
    -- when the tokenizer loads (every stage stops with one line), and in the rollout itself."""
    tokenizer = agent.load_tokenizer(tiny_dir)
    assert agent.encode_chat(tokenizer, "x")[0]  # the project's own template passes
    tokenizer.chat_template = change(agent.CHAT_TEMPLATE)  # the pieces cached on it are the old template's
    assert tokenizer.chat_template != agent.CHAT_TEMPLATE
    with pytest.raises(ValueError, match=message):
        agent.encode_chat(tokenizer, "x")
    with pytest.raises(ValueError, match=message):
        agent.rollout(scripted(tokenizer, ["Up"]), tokenizer, "frozenlake", [0], 1)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(agent.ModelLoadError, match=f"chat template of .* cannot be used: .*{message}"):
        agent.load_tokenizer(str(tmp_path))
