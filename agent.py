"""
The LLM side of SPA, shared by self-play, PPO and evaluation (SPEC §3).

This file holds how a model's response is read: the actions are the text between
`<answer>` and `</answer>`, split on `||`, stripped, at most 5 per turn.
"""
import re

MAX_ACTIONS_PER_TURN = 5
ACTION_SEPARATOR = "||"
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def parse_actions(response, max_actions=MAX_ACTIONS_PER_TURN):
    """The actions of one response: the first <answer>...</answer> split on '||', stripped,
    empty pieces dropped, at most max_actions kept. [] when there is no complete answer.

    Never raises on text: whether an action is one the env understands is the env's call
    (an unknown action comes back with action_is_valid=False), so junk passes through as a string.
    """
    if not isinstance(response, str):
        return []
    match = _ANSWER.search(response)
    if match is None:
        return []
    actions = [a.strip() for a in match.group(1).split(ACTION_SEPARATOR)]
    return [a for a in actions if a][:max_actions]
