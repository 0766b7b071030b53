"""agent.parse_actions: from any response text to the list of action strings (SPEC §3)."""
import random

import pytest

import agent
import envs


@pytest.mark.parametrize("response, expected", [
    ("<think>go</think> <answer>Up</answer>", ["Up"]),
    ("<answer> Up || Left ||Down</answer>", ["Up", "Left", "Down"]),
    ("<answer>1,2,3 || 4, 4, 1</answer>", ["1,2,3", "4, 4, 1"]),
    ("<answer>Up || || Left ||</answer>", ["Up", "Left"]),  # empty pieces are not actions
    ("<answer>a||b||c||d||e||f||g</answer>", ["a", "b", "c", "d", "e"]),  # at most 5 kept
    ("<answer>\nUp\n||\nRight\n</answer>", ["Up", "Right"]),  # newlines inside
    ("<answer>Up</answer> then <answer>Down</answer>", ["Up"]),  # the first answer counts
    ("<answer>Up || Upward</answer>", ["Up", "Upward"]),  # junk passes through: the env rejects it
    ("<answer>左 || ↑ || Ｕｐ</answer>", ["左", "↑", "Ｕｐ"]),
    ("<answer><answer>Up</answer></answer>", ["<answer>Up"]),  # nested: the env will reject it
    ("<answer></answer>", []),
    ("<answer>   </answer>", []),
    ("<answer>Up", []),  # truncated: no complete answer
    ("Up</answer>", []),
    ("<ANSWER>Up</ANSWER>", []),  # tags are case-sensitive, as the format says
    ("", []),
    ("Up || Down", []),
])
def test_parse_actions(response, expected):
    assert agent.parse_actions(response) == expected


def test_parse_actions_limit_and_non_text():
    assert agent.parse_actions("<answer>a||b||c</answer>", max_actions=2) == ["a", "b"]
    for junk in (None, 3, b"<answer>Up</answer>", ["<answer>Up</answer>"]):
        assert agent.parse_actions(junk) == []


def test_parse_actions_never_raises_on_random_text():
    rng = random.Random(0)
    alphabet = ["<answer>", "</answer>", "||", "|", "Up", "1,2,3", " ", "\n", "<", ">", "é", "\x00"]
    env = envs.make("sokoban")
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        actions = agent.parse_actions(text)
        assert isinstance(actions, list) and len(actions) <= 5
        assert all(isinstance(a, str) and a == a.strip() and a for a in actions)
        env.reset(0)
        for a in actions:  # whatever comes out, the env takes it without raising
            if not env.done:
                env.step(a)
    long = "<answer>" + "Up||" * 10_000 + "</answer>"
    assert agent.parse_actions(long) == ["Up"] * 5
