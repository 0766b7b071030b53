"""Every rule of SPEC §2, checked through the public interface of envs.py."""
import itertools
import math
import random

import pytest

import envs

JUNK_ACTIONS = ["", " ", "Upward", "9,9,9", "None", "null", "NaN", "undefined", "<answer>Up</answer>",
                "Up Down", "up||down", "↑", "上", "Ｕｐ", "\x00", "1,1", "1,1,1,1", "-1,2,3",
                "x" * 10_000, "Up" * 5_000, " ,,, ", None, 3, 1.5, b"Up", ["Up"], object()]


def snapshot(env):
    """Everything observable about an env's state, plus FrozenLake's slip generator."""
    state = (env.render("coords"), env.actions_left, env.done)
    if isinstance(env, envs.FrozenLake):
        state += (env._slip_rng.getstate(),)
    return state


def play(env, actions):
    total, info, done = 0.0, None, False
    for a in actions:
        _, reward, done, info = env.step(a)
        total += reward
    return total, done, info


# -----------------------------------------------------------------------------
# the common interface

def test_make_names_and_errors():
    assert envs.ENVS == ("sokoban", "frozenlake", "sudoku")
    for name in envs.ENVS:
        env = envs.make(name)
        text = env.reset(0)
        assert isinstance(text, str) and text == env.render() == env.render("grid")
        assert env.render("coords").startswith(text + "\n")
    with pytest.raises(ValueError, match="unknown env"):
        envs.make("sokoban2")
    with pytest.raises(TypeError):
        envs.make("sokoban", no_such_option=1)
    env = envs.make("sudoku")
    env.reset(0)
    with pytest.raises(ValueError, match="render mode"):
        env.render("ascii")


@pytest.mark.parametrize("name", envs.ENVS)
def test_render_mode_override(name):
    env = envs.make(name, render_mode="coords")
    assert env.reset(1) == env.render("coords")
    with pytest.raises(ValueError, match="render mode"):
        envs.make(name, render_mode="pixels")


@pytest.mark.parametrize("name", envs.ENVS)
def test_step_before_reset_after_done_and_bad_seed(name):
    env = envs.make(name)
    with pytest.raises(RuntimeError, match="reset"):
        env.step("Up")
    with pytest.raises(RuntimeError, match="reset"):
        env.render()
    for bad in (None, "3", 1.0, True):
        with pytest.raises(TypeError, match="int seed"):
            env.reset(bad)
    with pytest.raises(ValueError, match="non-negative"):
        env.reset(-5)
    env.reset(0)
    env.done = True  # any finished episode; the rule-specific tests finish them for real
    with pytest.raises(RuntimeError, match="over"):
        env.step("Up")


@pytest.mark.parametrize("name", envs.ENVS)
def test_junk_actions_are_invalid_and_change_nothing(name):
    env = envs.make(name)
    env.reset(7)
    before = snapshot(env)
    text = env.render()
    for junk in JUNK_ACTIONS:
        out, reward, done, info = env.step(junk)
        assert (out, reward, done) == (text, 0.0, False)
        assert info == {"success": False, "action_is_valid": False, "action_is_effective": False}
        assert snapshot(env) == before


@pytest.mark.parametrize("name", envs.ENVS)
def test_same_seed_same_puzzle_fresh_env(name):
    a, b = envs.make(name), envs.make(name)
    for seed in (0, 1, 12345, 10_000):
        assert a.reset(seed) == b.reset(seed)
        assert a.render("coords") == b.render("coords")


# the first validation puzzle of every env: the README's figures were measured on these
FIRST_VALIDATION_PUZZLE = {"sokoban": "######\n##___#\n#__S##\n##_X##\n##___#\n######",
                           "frozenlake": "OP_O\nG_O_\n__O_\n__O_",
                           "sudoku": "1 . 2 4\n. 4 . 3\n. 1 3 2\n. 2 . 1"}


@pytest.mark.parametrize("name", envs.ENVS)
def test_the_seed_alone_makes_the_puzzle(name):
    # the generators are memoised: without clearing them a second reset would only read the cache
    generators = (envs._generate_sokoban, envs._generate_frozenlake, envs._generate_sudoku)
    for generator in generators:
        generator.cache_clear()
    random.seed(1)  # the global random state has no say
    first = envs.make(name).reset(123)
    for generator in generators:
        generator.cache_clear()
    random.seed(2)
    assert envs.make(name).reset(123) == first == FIRST_VALIDATION_PUZZLE[name]


@pytest.mark.parametrize("name", envs.ENVS)
def test_pieces_say_where_the_grid_draws_them(name):
    rng = random.Random(0)
    env = envs.make(name)
    with pytest.raises(RuntimeError):
        env.pieces()
    player = {"sokoban": "PS", "frozenlake": "PX√"}.get(name)
    for seed in range(30):
        env.reset(seed)
        for _ in range(20):
            pieces = env.pieces()
            grid = env.render("grid").split("\n")
            if name == "sudoku":
                assert pieces == {}
            else:
                r, c = pieces["player"]
                assert grid[r][c] in player and sum(ch in player for row in grid for ch in row) == 1
                if name == "sokoban":
                    assert sorted(pieces["boxes"]) == pieces["boxes"] and len(pieces["boxes"]) == env.num_boxes
                    assert all(grid[r][c] in "X√" for r, c in pieces["boxes"])
            if env.done:
                break
            env.step(rng.choice(env.ACTIONS) if name != "sudoku" else f"{rng.randint(1, 4)},{rng.randint(1, 4)},"
                     f"{rng.randint(1, 4)}")


# -----------------------------------------------------------------------------
# Sokoban

ROOM = """\
#######
#_P___#
#__OX_#
#_____#
#######"""


def test_sokoban_every_symbol_and_sentences():
    room = "#######\n#_____#\n#_X_S_#\n#√__XO#\n#######"  # wall, empty, box, box on target, player on target, target
    env = envs.make("sokoban", room=room)
    assert env.reset(0) == room
    assert env.render("coords") == room + (
        "\nPlayer (P) is at (2,4); boxes (X) are at (2,2), (3,1), (3,4); targets (O) are at (2,4), (3,1), (3,5).")
    env.step("Right")  # the player leaves its target: S -> O, and shows as P
    assert env.render() == "#######\n#_____#\n#_X_OP#\n#√__XO#\n#######"
    env = envs.make("sokoban", room=ROOM)
    env.reset(0)
    assert env.render("coords") == ROOM + "\nPlayer (P) is at (1,2); box (X) is at (2,4); target (O) is at (2,3)."


def test_sokoban_bad_rooms():
    with pytest.raises(ValueError, match="one player"):
        envs.make("sokoban", room="######\n#PX_P#\n#_O__#\n######")
    with pytest.raises(ValueError, match="as many targets"):
        envs.make("sokoban", room="#####\n#PXO#\n#_O_#\n#####")
    with pytest.raises(ValueError, match="outer ring"):
        envs.make("sokoban", room="#####\n_PXO#\n#####")
    with pytest.raises(ValueError, match="unknown symbols"):
        envs.make("sokoban", room="#####\n#PXO#\n#_?_#\n#####")
    with pytest.raises(ValueError, match="same length"):
        envs.make("sokoban", room="#####\n#PXO#\n####")
    with pytest.raises(ValueError, match="already on a target"):  # its first action would pay +10
        envs.make("sokoban", room="#####\n#P√_#\n#####")
    env = envs.make("sokoban", room="#####\n#PXO#\n#####", dim_room=(3, 5))  # a room has its own size
    env.reset(0)
    assert env.step("Right")[2] is True


@pytest.mark.parametrize("name, overrides, error, message", [
    ("sokoban", {"num_boxes": "2"}, TypeError, "num_boxes must be a whole number"),
    ("sokoban", {"max_steps": 9.5}, TypeError, "max_steps must be a whole number"),
    ("sokoban", {"dim_room": (4, 4)}, ValueError, "too small for 1 box"),  # could never be generated
    ("frozenlake", {"size": 4.9}, TypeError, "size must be a whole number"),
    ("sudoku", {"num_blanks": 6.7}, TypeError, "num_blanks must be a whole number"),
    ("sudoku", {"num_blanks": 13}, ValueError, "num_blanks must be in 1..12"),
    # settings that could never give a finished episode, or that the given puzzle contradicts
    ("sudoku", {"num_blanks": 8, "max_steps": 7}, ValueError, "max_steps=7 is below the 8 empty cells"),
    ("sudoku", {"puzzle": "1.34 34.2 2.4. .321", "max_steps": 4}, ValueError, "below the 5 empty cells"),
    ("sudoku", {"puzzle": "1.34 34.2 2.4. .321", "num_blanks": 6}, ValueError, "num_blanks 6 disagrees"),
    ("sokoban", {"room": "#####\n#PXO#\n#####", "num_boxes": 2}, ValueError, "num_boxes 2 disagrees"),
    (["sokoban"], {}, ValueError, "unknown env"),
])
def test_bad_overrides_are_refused_not_rounded(name, overrides, error, message):
    with pytest.raises(error, match=message):
        envs.make(name, **overrides)


# what a JSON --env-overrides can hold by mistake: each is refused by name, not with a Python internal
@pytest.mark.parametrize("name, overrides, error, message", [
    ("frozenlake", {"slippery": "false"}, TypeError, "slippery must be true or false"),  # bool("false") is True
    ("frozenlake", {"slippery": 0.5}, TypeError, "slippery must be true or false"),
    ("frozenlake", {"slippery": 0}, TypeError, "slippery must be true or false"),
    ("frozenlake", {"hole_prob": "0.5"}, TypeError, r"hole_prob must be a number in \[0, 1\)"),
    ("frozenlake", {"hole_prob": True}, TypeError, r"hole_prob must be a number in \[0, 1\)"),
    ("frozenlake", {"hole_prob": 1}, ValueError, r"hole_prob must be a number in \[0, 1\)"),
    ("frozenlake", {"hole_prob": float("nan")}, ValueError, r"hole_prob must be a number in \[0, 1\)"),
    ("sokoban", {"dim_room": 6}, TypeError, r"dim_room must be \[rows, cols\]"),
    ("sokoban", {"dim_room": [6, 6, 6]}, TypeError, r"dim_room must be \[rows, cols\]"),
    ("sokoban", {"dim_room": "66"}, TypeError, r"dim_room must be \[rows, cols\]"),
    ("sokoban", {"dim_room": [6, "6"]}, TypeError, "dim_room must be a whole number"),
    ("frozenlake", {"desc": 5}, TypeError, "FrozenLake desc must be a list of row strings or one string with newlines"),
    ("frozenlake", {"desc": ["P_", 5]}, TypeError, "FrozenLake desc must be a list of row strings"),
    ("sokoban", {"room": 5}, TypeError, "Sokoban room must be a list of row strings or one string with newlines"),
])
def test_bad_override_types_name_the_setting(name, overrides, error, message):
    with pytest.raises(error, match=message):
        envs.make(name, **overrides)


def test_bool_and_list_overrides_as_json_gives_them():
    assert envs.make("frozenlake", slippery=False).slippery is False
    assert envs.make("frozenlake", slippery=True).slippery is True
    env = envs.make("sokoban", dim_room=[7, 8])  # a JSON array
    assert len(env.reset(0).split("\n")) == 7
    assert envs.make("frozenlake", hole_prob=0).hole_prob == 0.0  # an int is a number too


# upper bounds far above any real use, so that a typo is an error and not a reset that runs for minutes
@pytest.mark.parametrize("name, overrides, message", [
    ("frozenlake", {"size": 3000}, r"size must be in 2\.\.16, got 3000"),
    ("frozenlake", {"size": 1}, r"size must be in 2\.\.16, got 1"),
    ("frozenlake", {"max_steps": 201}, r"max_steps must be in 1\.\.200, got 201"),
    ("sokoban", {"max_steps": 10**6}, r"max_steps must be in 1\.\.200, got 1000000"),
    ("sokoban", {"max_steps": 0}, r"max_steps must be in 1\.\.200, got 0"),
    ("sokoban", {"dim_room": [300, 300]}, r"dim_room must be in 3\.\.16, got 300"),
    ("sokoban", {"dim_room": [-5, -5]}, r"dim_room must be in 3\.\.16, got -5"),  # once crashed in reset
    ("sokoban", {"num_boxes": 7}, r"num_boxes must be in 1\.\.6, got 7"),
    ("sudoku", {"max_steps": 201}, r"max_steps must be in 1\.\.200, got 201"),
    ("frozenlake", {"desc": ["P" + "_" * 16] + ["_" * 17] * 15 + ["_" * 16 + "G"]}, "at most 16x16 cells, got 17x17"),
    ("sokoban", {"room": ["#" * 11, "#P" + "_" * 8 + "#", "#_" + "X" * 7 + "_#", "#_" + "O" * 7 + "_#", "#" * 11]},
     "at most 6 boxes, got 7"),
    ("sokoban", {"room": "#" * 17 + "\n#PXO" + "_" * 12 + "#\n" + "#" * 17}, "at most 16x16 cells, got 3x17"),
])
def test_sizes_are_bounded(name, overrides, message):
    with pytest.raises(ValueError, match=message):
        envs.make(name, **overrides)


def test_size_bounds_admit_their_extremes():
    for name, overrides in (("frozenlake", {"size": 16, "max_steps": 200}),
                            ("sokoban", {"dim_room": (16, 16), "num_boxes": 6, "max_steps": 200}),
                            ("sudoku", {"max_steps": 200})):
        env = envs.make(name, **overrides)
        env.reset(0)
        assert env.actions_left == 200


def test_sokoban_room_must_be_solvable_within_budget():
    # SPEC §2: a generated puzzle's optimal solution fits the budget; the evaluation oracle plays it
    with pytest.raises(ValueError, match="Sokoban room: no solution within max_steps=10 actions"):
        envs.make("sokoban", room="######\n#X__O#\n#_P__#\n######")  # the box is in a corner
    with pytest.raises(ValueError, match="Sokoban room: no solution within max_steps=4 actions"):
        envs.make("sokoban", room=ROOM, max_steps=4)  # its optimal solution takes 5
    env = envs.make("sokoban", room=ROOM, max_steps=5)
    env.reset(0)
    assert len(env.solve()) == 5


def test_sokoban_dim_room_must_agree_with_a_room():
    envs.make("sokoban", room=ROOM, dim_room=[5, 7])
    with pytest.raises(ValueError, match=r"dim_room \[6, 6\] disagrees with the room, which is 5x7"):
        envs.make("sokoban", room=ROOM, dim_room=[6, 6])


def test_sokoban_moves_walls_and_step_penalty():
    env = envs.make("sokoban", room=ROOM)
    env.reset(0)
    text, reward, done, info = env.step("Left")
    assert reward == pytest.approx(-0.1) and not done
    assert info == {"success": False, "action_is_valid": True, "action_is_effective": True}
    assert text.split("\n")[1] == "#P____#"
    text, reward, done, info = env.step("left")  # into the wall: nothing moves, still a step
    assert reward == pytest.approx(-0.1) and info["action_is_valid"] and not info["action_is_effective"]
    assert text.split("\n")[1] == "#P____#"
    _, _, _, info = env.step("  UP ")  # case and surrounding spaces do not matter; wall above too
    assert info["action_is_valid"] and not info["action_is_effective"] and env.actions_left == 7


def test_sokoban_push_onto_target_finishes():
    env = envs.make("sokoban", room="#####\n#_P_#\n#_X_#\n#_O_#\n#####")
    env.reset(0)
    text, reward, done, info = env.step("Down")
    assert reward == pytest.approx(-0.1 + 1 + 10) and done
    assert info == {"success": True, "action_is_valid": True, "action_is_effective": True}
    assert text == "#####\n#___#\n#_P_#\n#_√_#\n#####"
    with pytest.raises(RuntimeError, match="over"):
        env.step("Down")


def test_sokoban_box_off_target_and_target_to_target():
    # two boxes, one on a target: pushing it off costs -1 on top of the step penalty
    env = envs.make("sokoban", room="#######\n#P√___#\n#___XO#\n#_____#\n#######")
    env.reset(0)
    text, reward, done, info = env.step("Right")
    assert reward == pytest.approx(-0.1 - 1.0) and not done and info["action_is_effective"]
    assert text == "#######\n#_SX__#\n#___XO#\n#_____#\n#######"
    # pushed from one target straight onto another: -1 + 1
    env = envs.make("sokoban", room="######\n#P√O_#\n#_X__#\n#____#\n######")
    env.reset(0)
    text, reward, _, _ = env.step("Right")
    assert reward == pytest.approx(-0.1) and text.split("\n")[1] == "#_S√_#"


def test_sokoban_box_into_box_and_box_into_wall():
    room = "######\n#____#\n#PXXO#\n#__O_#\n######"
    env = envs.make("sokoban", room=room)
    env.reset(0)
    text, reward, done, info = env.step("Right")
    assert text == room and reward == pytest.approx(-0.1) and not done
    assert info["action_is_valid"] and not info["action_is_effective"]
    room = "####\n#__#\n#PX#\n#_O#\n####"
    env = envs.make("sokoban", room=room)
    env.reset(0)
    text, reward, _, info = env.step("Right")
    assert text == room and reward == pytest.approx(-0.1) and not info["action_is_effective"]


def test_sokoban_budget_exhaustion_and_invalid_actions_free():
    env = envs.make("sokoban", room=ROOM)
    env.reset(0)
    for _ in range(3):
        env.step("Dance")
    assert env.actions_left == 10
    for i in range(9):
        assert not env.step("Up" if i % 2 else "Down")[2]
    _, reward, done, info = env.step("Up")
    assert done and not info["success"] and env.actions_left == 0
    with pytest.raises(RuntimeError, match="over"):
        env.step("Up")


def test_sokoban_budget_override_bounds_generated_puzzles():
    env = envs.make("sokoban", max_steps=3)
    for seed in range(50):
        env.reset(seed)
        assert 1 <= len(env.solve()) <= 3
    env = envs.make("sokoban", dim_room=(7, 8), num_boxes=2, max_steps=10)
    for seed in range(20):
        text = env.reset(seed)
        assert len(text.split("\n")) == 7 and len(text.split("\n")[0]) == 8
        assert text.count("X") + text.count("√") == 2 and "X" in text
        total, done, info = play(env, env.solve())
        assert done and info["success"]


def test_sokoban_1000_seeds_unsolved_distinct_and_solvable():
    env = envs.make("sokoban")
    puzzles = set()
    for seed in range(1000):
        text = env.reset(seed)
        puzzles.add(text)
        assert "X" in text, "already solved"
        plan = env.solve()
        assert 1 <= len(plan) <= env.max_steps
        total, done, info = play(env, plan)
        assert done and info["success"]
        assert total == pytest.approx(-0.1 * len(plan) + 1 + 10)
    assert len(puzzles) >= 950


def test_sokoban_solver_is_optimal():
    env = envs.make("sokoban", room="#######\n#__X_O#\n#_P___#\n#######")
    env.reset(0)
    assert env.solve() == ["Up", "Right", "Right"]
    # the player must walk around the box to push it left
    env = envs.make("sokoban", room="#######\n#O_XP_#\n#_____#\n#######")
    env.reset(0)
    assert env.solve() == ["Left", "Left"]
    env = envs.make("sokoban", room="#######\n#O_X__#\n#___P_#\n#######")
    env.reset(0)
    assert env.solve() == ["Up", "Left", "Left"]
    env = envs.make("sokoban", room=ROOM)
    env.reset(0)
    play(env, ["Right", "Right", "Down"])  # the box, pushed against the bottom wall, can never come back up
    assert env.solve() is None


# -----------------------------------------------------------------------------
# FrozenLake

def test_frozenlake_symbols_and_sentences():
    desc = ["P_O_", "____", "_O__", "___G"]
    env = envs.make("frozenlake", desc=desc, slippery=False)
    assert env.reset(0) == "\n".join(desc)
    assert env.render("coords") == "\n".join(desc) + "\nPlayer (0,0); holes at (0,2) and (2,1); goal at (3,3)."
    for desc, sentence in [(["P_", "OG"], "Player (0,0); hole at (1,0); goal at (1,1)."),
                           (["P_", "_G"], "Player (0,0); no holes; goal at (1,1)."),
                           (["P_O", "O__", "O_G"], "Player (0,0); holes at (0,2), (1,0) and (2,0); goal at (2,2).")]:
        env = envs.make("frozenlake", desc=desc)
        env.reset(0)
        assert env.render("coords").split("\n")[-1] == sentence
    for bad in (["P_", "__"], ["P_G", "___"], ["PP", "_G"], ["P?", "_G"]):
        with pytest.raises(ValueError):
            envs.make("frozenlake", desc=bad)


def test_frozenlake_desc_needs_a_path_and_agrees_with_size():
    # SPEC §2 guarantees generated maps a path from start to goal (within the budget): hand-written ones too
    with pytest.raises(ValueError, match="FrozenLake desc: no path from P to G within max_steps=10 moves$"):
        envs.make("frozenlake", desc=["P_O", "_O_", "O_G"])
    with pytest.raises(ValueError, match=r"no path from P to G within max_steps=5 moves \(the shortest takes 6\)"):
        envs.make("frozenlake", desc=["P___", "____", "____", "___G"], max_steps=5)
    assert envs.make("frozenlake", desc=["P___", "____", "____", "___G"], max_steps=6).size == 4
    with pytest.raises(ValueError, match="size 7 disagrees with desc, a 3x3 map"):
        envs.make("frozenlake", desc=["P__", "___", "__G"], size=7)
    assert envs.make("frozenlake", desc=["P__", "___", "__G"], size=3).size == 3


def test_frozenlake_hole_goal_edges_non_slippery():
    desc = ["P_O_", "____", "_O__", "___G"]
    env = envs.make("frozenlake", desc=desc, slippery=False)
    env.reset(0)
    text, reward, done, info = env.step("Up")  # off the board: stays, a valid step
    assert text == env.render() and (reward, done) == (0.0, False)
    assert info == {"success": False, "action_is_valid": True, "action_is_effective": False}
    assert env.actions_left == 9
    env.step("Left")
    env.step("right")
    text, reward, done, info = env.step("RIGHT")  # into the hole
    assert text == "__X_\n____\n_O__\n___G"
    assert (reward, done, info["success"]) == (0.0, True, False)
    with pytest.raises(RuntimeError):
        env.step("Down")
    env.reset(0)
    total, done, info = play(env, ["Down", "Down", "Down", "Right", "Right", "Right"])
    assert done and info["success"] and total == 1.0
    assert env.render() == "__O_\n____\n_O__\n___√"


def test_frozenlake_budget_exhaustion():
    env = envs.make("frozenlake", desc=["P___", "____", "____", "___G"], slippery=False)
    env.reset(0)
    env.step("nope")
    for _ in range(9):
        assert not env.step("Left")[2]
    _, reward, done, info = env.step("Up")
    assert done and reward == 0.0 and not info["success"]


def test_frozenlake_hole_probability_and_budget_shape_the_maps():
    cells = 50 * (36 - 2)  # 50 maps of 6x6, less start and goal
    assert sum(envs.make("frozenlake", size=6, hole_prob=0).reset(seed).count("O") for seed in range(50)) == 0
    share = sum(envs.make("frozenlake", size=6, hole_prob=0.5).reset(seed).count("O") for seed in range(50)) / cells
    assert 0.4 < share < 0.55  # a little under 0.5: maps without a short enough path are drawn again
    env = envs.make("frozenlake", size=6, max_steps=2)  # the goal within the budget, on every map
    assert {len(env.reset(seed) and env.shortest_path()) for seed in range(200)} == {1, 2}


def test_frozenlake_1000_seeds():
    env = envs.make("frozenlake")
    flat = envs.make("frozenlake", slippery=False)
    maps = set()
    for seed in range(1000):
        text = env.reset(seed)
        maps.add(text)
        assert text.count("P") == 1 and text.count("G") == 1, "start on the goal or in a hole"
        path = env.shortest_path()
        assert path and len(path) <= env.max_steps
        assert env.oracle()["turn_success"] > 0
        assert flat.reset(seed) == text
        total, done, info = play(flat, flat.shortest_path())
        assert done and info["success"] and total == 1.0
    assert len(maps) >= 950


def test_frozenlake_slip_frequencies():
    # an open 5x5 board, player in the middle: each action's outcome is visible as a displacement
    desc = ["_____", "_____", "__P__", "_____", "____G"]
    env = envs.make("frozenlake", desc=desc)
    deltas = {"Left": (0, -1), "Down": (1, 0), "Right": (0, 1), "Up": (-1, 0)}
    perpendicular = {"Left": ("Down", "Up"), "Right": ("Down", "Up"), "Up": ("Left", "Right"),
                     "Down": ("Left", "Right")}
    n = 3000
    for action in deltas:
        counts = {k: 0 for k in deltas}
        for seed in range(n):
            env.reset(seed)
            text, *_ = env.step(action)
            r, c = next((i, row.index("P")) for i, row in enumerate(text.split("\n")) if "P" in row)
            moved = next(k for k, d in deltas.items() if d == (r - 2, c - 2))
            counts[moved] += 1
        opposite = {"Left": "Right", "Right": "Left", "Up": "Down", "Down": "Up"}[action]
        assert counts[opposite] == 0
        tolerance = 5 * math.sqrt((1 / 3) * (2 / 3) / n)
        for k in (action,) + perpendicular[action]:
            assert abs(counts[k] / n - 1 / 3) < tolerance, (action, counts)


def test_frozenlake_same_seed_same_slips():
    env = envs.make("frozenlake")
    rng = random.Random(0)
    actions = [rng.choice(envs.FrozenLake.ACTIONS) for _ in range(10)]
    trajectories = []
    for _ in range(2):
        env.reset(42)
        trajectories.append([env.step(a)[0] for a in actions if not env.done])
    assert trajectories[0] == trajectories[1]
    # junk between the actions does not shift the slips
    env.reset(42)
    with_junk = []
    for a in actions:
        if env.done:
            break
        env.step("junk")
        with_junk.append(env.step(a)[0])
    assert with_junk == trajectories[0]


def brute_force_turn_value(env, pos, turns, budget, k):
    """Expectimax over every turn plan by plain recursion (no matrices): the reference for the DP."""
    n = env.size
    holes, goal = env._holes, env._goal

    def outcomes(cell, seq):  # {cell: prob} after an open-loop sequence, terminals absorbing
        dist = {cell: 1.0}
        for a in seq:
            new = {}
            for s, p in dist.items():
                if s in holes or s == goal:
                    new[s] = new.get(s, 0) + p
                    continue
                for slip in ((-1, 0, 1) if env.slippery else (0,)):
                    d = (a + slip) % 4
                    r, c = divmod(s, n)
                    rr, cc = [(r, c - 1), (r + 1, c), (r, c + 1), (r - 1, c)][d]
                    t = rr * n + cc if 0 <= rr < n and 0 <= cc < n else s
                    new[t] = new.get(t, 0) + p / (3 if env.slippery else 1)
            dist = new
        return dist

    def value(cell, t, b):
        if cell == goal:
            return 1.0
        if cell in holes or t == 0 or b == 0:
            return 0.0
        best = 0.0
        for L in range(1, min(k, b) + 1):
            for seq in itertools.product(range(4), repeat=L):
                best = max(best, sum(p * value(s, t - 1, b - L) for s, p in outcomes(cell, seq).items()))
        return best

    return value(pos, turns, budget)


def test_frozenlake_oracle_matches_brute_force():
    desc = ["P_O", "___", "O_G"]
    for slippery in (True, False):
        env = envs.make("frozenlake", desc=desc, slippery=slippery, max_steps=4)
        env.reset(0)
        result = env.oracle(max_turns=2, max_actions_per_turn=3)
        expected = brute_force_turn_value(env, 0, turns=2, budget=4, k=3)
        assert result["turn_success"] == pytest.approx(expected, abs=1e-12)
        # one action per turn and enough turns = closed loop
        closed = brute_force_turn_value(env, 0, turns=4, budget=4, k=1)
        assert result["closed_loop_success"] == pytest.approx(closed, abs=1e-12)
        assert result["turn_success"] <= result["closed_loop_success"] + 1e-12
        assert (result["turn_success"] == 1.0) == (not slippery)


def test_frozenlake_oracle_policy_achieves_its_probability():
    desc = ["P__O", "_O__", "____", "O__G"]
    env = envs.make("frozenlake", desc=desc)
    env.reset(0)
    exact = env.oracle()["turn_success"]
    n = 3000
    wins = 0
    for seed in range(n):
        env.reset(seed)
        info = {"success": False}
        for turns_left in range(5, 0, -1):
            for a in env.oracle_actions(turns_left):
                if not env.done:
                    info = env.step(a)[3]
        wins += info["success"]
    assert abs(wins / n - exact) < 5 * math.sqrt(exact * (1 - exact) / n)


def test_frozenlake_oracle_takes_the_direct_route_among_equal_plans():
    # with turns to spare a detour is worth as much as the direct move; the oracle must not dawdle
    env = envs.make("frozenlake", desc=["____", "_PG_", "____", "____"], slippery=False)
    env.reset(0)
    assert env.oracle_actions(5) == ["Right"]
    env = envs.make("frozenlake", desc=["____", "____", "POOG", "___O"], slippery=False)
    env.reset(0)
    assert env.oracle_actions(5) == ["Up", "Right", "Right", "Right", "Down"]
    # shortest optimal plans everywhere on non-slippery maps: the oracle's actions = BFS distance
    for seed in range(50):
        env = envs.make("frozenlake", slippery=False)
        env.reset(seed)
        shortest, actions = len(env.shortest_path()), 0
        for turns_left in range(5, 0, -1):
            for a in env.oracle_actions(turns_left):
                if not env.done:
                    env.step(a)
                    actions += 1
        assert env.done and actions == shortest, seed


def test_frozenlake_outcome_distribution():
    desc = ["P__O", "_O__", "____", "O__G"]
    env = envs.make("frozenlake", desc=desc)
    env.reset(0)
    # one step Right from (0,0): right (0,1), down (1,0), up = off board (0,0)
    dist = env.outcome_distribution(["Right"])
    assert dist == pytest.approx({(0, 1): 1 / 3, (1, 0): 1 / 3, (0, 0): 1 / 3})
    # junk is skipped; probabilities sum to one; a start inside a hole stays there
    dist = env.outcome_distribution(["Right", "junk", "Down", "Down"])
    assert sum(dist.values()) == pytest.approx(1.0)
    assert env.outcome_distribution(["Down"], position=(1, 1)) == {(1, 1): 1.0}
    for bad in ((0, 4), (-1, 0), (9, 9), (1,)):
        with pytest.raises(ValueError, match="position"):
            env.outcome_distribution(["Down"], position=bad)
    # the budget: with 1 action left only the first action runs
    assert env.outcome_distribution(["Right", "Right"], actions_left=1) == pytest.approx(
        env.outcome_distribution(["Right"]))
    # Monte Carlo through step() agrees
    actions = ["Right", "Down", "Right", "Down"]
    dist = env.outcome_distribution(actions)
    counts, n = {}, 6000
    for seed in range(n):
        env.reset(seed)
        for a in actions:
            if not env.done:
                env.step(a)
        counts[divmod(env._player, 4)] = counts.get(divmod(env._player, 4), 0) + 1
    assert set(counts) <= set(dist)
    for cell, p in dist.items():
        assert abs(counts.get(cell, 0) / n - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-9


# -----------------------------------------------------------------------------
# Sudoku

PUZZLE = "1.34 34.2 2.4. .321"  # unique solution 1234 3412 2143 4321


def test_sudoku_render_and_sentence():
    env = envs.make("sudoku", puzzle=PUZZLE)
    text = env.reset(0)
    assert text == "1 . 3 4\n3 4 . 2\n2 . 4 .\n. 3 2 1"
    assert env.render("coords") == text + "\nEmpty positions to be filled are at (1,2), (2,3), (3,2), (3,4), (4,1)."
    for bad in ("1.34 34.2 2.4. .32", "1.34 34.2 2.4. .325", "1234 3412 2143 4321", "....|....|....|...."):
        with pytest.raises(ValueError):
            envs.make("sudoku", puzzle=bad)


def conflicts(grid, r, c, v):
    """Which units (row / column / box) already hold v -- written independently of envs.py."""
    row = any(grid[r * 4 + j] == v for j in range(4))
    col = any(grid[i * 4 + c] == v for i in range(4))
    box = any(grid[i * 4 + j] == v for i in range(r // 2 * 2, r // 2 * 2 + 2)
              for j in range(c // 2 * 2, c // 2 * 2 + 2))
    return row, col, box


def test_sudoku_invalid_moves_every_cell_and_digit():
    env = envs.make("sudoku", num_blanks=10)
    seen = set()  # which single-unit conflicts were exercised
    for seed in range(20):
        env.reset(seed)
        grid = [0 if ch == "." else int(ch) for ch in env.render().split()]
        before = snapshot(env)
        for r, c, v in itertools.product(range(4), range(4), range(1, 5)):
            hits = conflicts(grid, r, c, v)
            expect_valid = grid[r * 4 + c] == 0 and not any(hits)
            if grid[r * 4 + c] == 0 and sum(hits) == 1:
                seen.add(hits)
            _, reward, done, info = env.step(f"{r + 1},{c + 1},{v}")
            assert info["action_is_valid"] == expect_valid, (seed, r, c, v, hits)
            if expect_valid:
                env.reset(seed)  # undo
            assert snapshot(env) == before
    assert seen == {(True, False, False), (False, True, False), (False, False, True)}


def test_sudoku_move_syntax():
    env = envs.make("sudoku", puzzle=PUZZLE)
    env.reset(0)
    before = snapshot(env)
    for move in ["1,1,1", "0,2,2", "5,2,2", "1,0,2", "1,5,2", "1,2,0", "1,2,5", "01,02,5",
                 "1;2;2", "1,2", "1,2,2,", "r1c2=2", "(1,2,2)", "1 2 2", "１,２,２"]:
        _, reward, done, info = env.step(move)
        assert not info["action_is_valid"] and reward == 0.0 and not done, move
        assert snapshot(env) == before, move
    _, reward, done, info = env.step(" 1 , 2 , 2 ")  # spaces allowed
    assert info == {"success": False, "action_is_valid": True, "action_is_effective": True}
    assert reward == 0.0 and env.render().split("\n")[0] == "1 2 3 4" and env.actions_left == 49
    assert not env.step("1,2,2")[3]["action_is_valid"]  # now filled


def test_sudoku_completion_reward():
    env = envs.make("sudoku", puzzle=PUZZLE)
    env.reset(0)
    plan = env.solve()
    assert sorted(plan) == ["1,2,2", "2,3,1", "3,2,1", "3,4,3", "4,1,4"]
    total, done, info = play(env, plan)
    assert done and info["success"] and total == 1.0
    assert env.render() == "1 2 3 4\n3 4 1 2\n2 1 4 3\n4 3 2 1"
    assert env.render("coords").endswith("No empty positions are left.")
    with pytest.raises(RuntimeError, match="over"):
        env.step("1,1,1")


def test_sudoku_budget_and_dead_end():
    # the budget can be exactly the empty cells: the last one filled on the last action succeeds
    env = envs.make("sudoku", max_steps=5, puzzle=PUZZLE)
    env.reset(0)
    rewards = [env.step(move)[1:] for move in env.solve()]
    assert [(r, d) for r, d, _ in rewards] == [(0.0, False)] * 4 + [(1.0, True)] and rewards[-1][2]["success"]
    # a legal but wrong digit: the grid can no longer be completed, and the solver says so
    env = envs.make("sudoku", num_blanks=10)
    for seed in range(100):
        env.reset(seed)
        right = set(env.solve())
        for move in (f"{r},{c},{v}" for r in range(1, 5) for c in range(1, 5) for v in range(1, 5)):
            if move not in right and env.step(move)[3]["action_is_valid"]:
                assert env.solve() is None
                return
    pytest.fail("no legal wrong move found in 100 puzzles")


@pytest.mark.parametrize("blanks", [1, 6, 10, 12])
def test_sudoku_blanks_parameter_and_uniqueness(blanks):
    env = envs.make("sudoku", num_blanks=blanks)
    for seed in range(30):
        text = env.reset(seed)
        assert text.count(".") == blanks
        grid = [0 if ch == "." else int(ch) for ch in text.split()]
        assert len(envs.sudoku_solutions(grid)) == 1
    with pytest.raises(ValueError):
        envs.make("sudoku", num_blanks=13)


def test_sudoku_1000_seeds():
    env = envs.make("sudoku")
    puzzles = set()
    for seed in range(1000):
        text = env.reset(seed)
        puzzles.add(text)
        assert text.count(".") == 6
        plan = env.solve()
        total, done, info = play(env, plan)
        assert done and info["success"] and total == 1.0 and len(plan) == 6
    assert len(puzzles) >= 950


def test_all_sudoku_solutions_are_valid():
    assert len(envs.SUDOKU_SOLUTIONS) == 288
    for g in envs.SUDOKU_SOLUTIONS:
        rows = [g[r * 4:r * 4 + 4] for r in range(4)]
        cols = [g[c::4] for c in range(4)]
        boxes = [[g[r * 4 + c] for r in (br, br + 1) for c in (bc, bc + 1)] for br in (0, 2) for bc in (0, 2)]
        assert all(sorted(unit) == [1, 2, 3, 4] for unit in rows + cols + boxes)


def test_readme_example_is_what_the_code_prints():
    env = envs.make("frozenlake")
    assert env.reset(seed=10_000) == "G___\n_O__\nOP__\nO__O"
    text, reward, done, info = env.step("Right")
    assert (reward, done, info) == (0.0, False, {"success": False, "action_is_valid": True,
                                                 "action_is_effective": True})
    assert env.render("coords") == ("G___\n_O__\nO_P_\nO__O\n"
                                    "Player (2,2); holes at (1,1), (2,0), (3,0) and (3,3); goal at (0,0).")
