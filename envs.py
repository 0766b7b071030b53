"""
The three puzzles of SPA, written from scratch: Sokoban, FrozenLake and 4x4 Sudoku.

Every stage (self-play, PPO, evaluation) and every test talks to them through one small
interface (SPEC §2):

    import envs
    env = envs.make("sokoban")                    # or "frozenlake", "sudoku"; overrides as kwargs
    text = env.reset(seed)                        # same int seed -> same puzzle, every time
    text, reward, done, info = env.step("Up")     # ONE action, a string
    # info == {"success": bool, "action_is_valid": bool, "action_is_effective": bool}
    env.render("grid")                            # the symbol grid
    env.render("coords")                          # grid + "\\n" + a sentence with object coordinates

`env.render()` with no argument uses the env's `render_mode` (an override, default "grid"). The
coordinate sentence is SPA's *state representation*: the model is taught to write it in
`<observation>`, so it names every object with its (row,col) position, zero-indexed, top-left
(0,0). Sudoku is the exception: its cells and actions are 1-indexed, as its action format is.

An action the env does not understand (`""`, `"Upward"`, `"9,9,9"`, `None`, 10 kB of text)
never raises: it returns the current text, reward 0, done False, `action_is_valid=False`,
changes nothing and does not use up the action budget. `step` after the episode ended raises.

Besides the rules, each env carries what evaluation needs for context: Sokoban's BFS solver,
Sudoku's solver, and for FrozenLake the exact transition model with the best achievable success
probability (an "oracle" computed by dynamic programming), the random-action policy's, and the
outcome distribution of any action sequence.

Puzzle generation is a pure function of (parameters, seed) and is memoised, because a rollout
plays every puzzle `group_size` times (SPEC §3): only the first reset of a seed pays for it.
Hand-written puzzles for tests and demos: `make("sokoban", room=...)`, `make("frozenlake",
desc=...)`, `make("sudoku", puzzle=...)`.
"""
import copy
import functools
import random
import re
from collections import deque

import numpy as np

ENVS = ("sokoban", "frozenlake", "sudoku")
RENDER_MODES = ("grid", "coords")

# Upper bounds on the settings, far above SPEC §2's defaults (6x6 Sokoban and 4x4 FrozenLake with 10
# actions, Sudoku with 50) and above any budget a rollout can use (5 turns of 5 actions): past them a
# typo such as size=3000 or max_steps=10**6 would make each reset run for seconds to minutes. Within
# them FrozenLake's exact oracle (evaluate.py's oracle row; a reset does not compute it) can still
# take long: about 0.5 s a map at 8x8 with 10 actions, 7 s at 16x16, 14 s at 8x8 with 200 actions,
# and at 16x16 with 200 actions minutes and most of a GB.
MAX_SIDE = 16  # rows or columns of a Sokoban room or a FrozenLake map, hand-written or generated
MAX_STEPS = 200  # the action budget of every env
MAX_BOXES = 6  # boxes of a Sokoban, generated or hand-written (the paper uses 1)


def make(name, **overrides):
    """Build an environment by name; keyword overrides replace its defaults (see each class)."""
    constructors = {"sokoban": Sokoban, "frozenlake": FrozenLake, "sudoku": Sudoku}
    if not isinstance(name, str) or name not in constructors:
        raise ValueError(f"unknown env {name!r}: choose one of {', '.join(ENVS)}")
    return constructors[name](**overrides)


# -----------------------------------------------------------------------------
# Helpers shared by the three envs

def _info(valid, effective=False, success=False):
    return {"success": success, "action_is_valid": valid, "action_is_effective": effective}


def _check_render_mode(mode):
    if mode not in RENDER_MODES:
        raise ValueError(f"unknown render mode {mode!r}: choose one of {', '.join(RENDER_MODES)}")
    return mode


def _check_seed(seed):
    # bool is an int subclass, but reset(True) is almost certainly a bug
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"reset(seed) needs an int seed, got {seed!r}")
    if seed < 0:  # random.Random(-s) is random.Random(s): two seeds would share a puzzle
        raise ValueError(f"reset(seed) needs a non-negative seed, got {seed}")
    return int(seed)


def _whole(name, value, low, high):
    """An int setting (num_boxes, max_steps, ...) as an int in low..high: "2" or 6.7 is a bug, not
    a 2 or a 6."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a whole number, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in {low}..{high}, got {value}")
    return int(value)


def _flag(name, value):
    """A yes/no setting as a bool: bool("false") is True, so a string or a number is refused."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be true or false (JSON booleans), got {value!r}")
    return bool(value)


def _check_reset(env):
    if env._state is None:
        raise RuntimeError(f"{type(env).__name__}: call reset(seed) first")


def _check_can_step(env):
    _check_reset(env)
    if env.done:
        raise RuntimeError(f"{type(env).__name__}: the episode is over; call reset(seed) to start a new one")


def _join_positions(positions):
    """[(0,1), (1,0), (2,2)] -> '(0,1), (1,0) and (2,2)' (SPEC's FrozenLake sentence style)."""
    parts = [f"({r},{c})" for r, c in positions]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _parse_grid(text, allowed, what):
    """A hand-written symbol grid (rows joined by newlines or given as a list) -> list of rows."""
    rows = text.split("\n") if isinstance(text, str) else text
    if not isinstance(rows, (list, tuple)) or not all(isinstance(row, str) for row in rows):
        raise TypeError(f"{what} must be a list of row strings or one string with newlines, got {text!r}")
    rows = [row.strip() for row in rows if row.strip()]
    if not rows or len({len(row) for row in rows}) != 1:
        raise ValueError(f"{what}: rows must be non-empty and all the same length, got {rows!r}")
    if len(rows) > MAX_SIDE or len(rows[0]) > MAX_SIDE:
        raise ValueError(f"{what}: at most {MAX_SIDE}x{MAX_SIDE} cells, got {len(rows)}x{len(rows[0])}")
    unknown = set("".join(rows)) - set(allowed)
    if unknown:
        raise ValueError(f"{what}: unknown symbols {sorted(unknown)}; allowed: {allowed}")
    return rows


# The four moves: name -> (row delta, col delta).
MOVES = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}


# -----------------------------------------------------------------------------
# Sokoban
#
# Symbols (as RAGEN): # wall, _ empty, O target, X box, √ box on target, P player, S player on
# target. Rewards (as gym-sokoban): -0.1 per step, +1 box onto a target, -1 box off a target,
# +10 when every box is on a target (episode ends, success).
#
# Cells are flat indices r * W + c so that a move is one addition: up = -W, down = +W, left = -1,
# right = +1. Every room is enclosed by walls, so a move never leaves the board.

SOKOBAN_STEP_PENALTY = -0.1
SOKOBAN_BOX_ON_TARGET = 1.0
SOKOBAN_BOX_OFF_TARGET = -1.0
SOKOBAN_FINISHED = 10.0

# Carving patterns for the random room walk: offsets around the walker (always including itself,
# which keeps the carved floor connected).
_CARVE_PATTERNS = (
    ((0, 0),),
    ((0, 0), (0, 1)),
    ((0, 0), (1, 0)),
    ((0, 0), (0, -1), (0, 1)),
    ((0, 0), (-1, 0), (1, 0)),
    ((0, 0), (0, 1), (1, 0)),
    ((0, 0), (0, 1), (1, 0), (1, 1)),
)


def _random_room_walls(rng, height, width):
    """Room topology by a random walk that carves floor out of solid wall (border stays wall)."""
    floor = [False] * (height * width)
    r, c = rng.randrange(1, height - 1), rng.randrange(1, width - 1)
    dr, dc = rng.choice(tuple(MOVES.values()))
    for _ in range(int(1.5 * (height + width))):
        if rng.random() < 0.35:
            dr, dc = rng.choice(tuple(MOVES.values()))
        if not 1 <= r + dr <= height - 2:  # bounce off the border rather than stall against it
            dr = -dr
        if not 1 <= c + dc <= width - 2:
            dc = -dc
        r = min(max(r + dr, 1), height - 2)
        c = min(max(c + dc, 1), width - 2)
        for pr, pc in rng.choice(_CARVE_PATTERNS):
            rr, cc = r + pr, c + pc
            if 1 <= rr <= height - 2 and 1 <= cc <= width - 2:
                floor[rr * width + cc] = True
    return tuple(not f for f in floor)


def sokoban_solve(walls, width, targets, boxes, player, max_depth=None, max_states=1_000_000):
    """Breadth-first search for a shortest action list that puts every box on a target.

    walls: tuple of bools over flat cells; targets, boxes: sets of flat cells; player: flat cell.
    Returns a list of action names ([] if already solved), or None if no solution exists within
    max_depth actions (or the search visited max_states states without finding one).
    """
    targets = frozenset(targets)
    start = (player, tuple(sorted(boxes)))
    if targets.issuperset(start[1]):
        return []
    deltas = (("Up", -width), ("Down", width), ("Left", -1), ("Right", 1))
    parent = {start: None}
    frontier = [start]
    depth = 0
    while frontier and (max_depth is None or depth < max_depth):
        depth += 1
        next_frontier = []
        for state in frontier:
            p, bxs = state
            for name, d in deltas:
                q = p + d
                if walls[q]:
                    continue
                if q in bxs:
                    beyond = q + d
                    if walls[beyond] or beyond in bxs:
                        continue
                    new_boxes = tuple(sorted(beyond if b == q else b for b in bxs))
                else:
                    new_boxes = bxs
                child = (q, new_boxes)
                if child in parent:
                    continue
                parent[child] = (state, name)
                if targets.issuperset(new_boxes):
                    plan = []
                    while parent[child] is not None:
                        child, name = parent[child]
                        plan.append(name)
                    return plan[::-1]
                next_frontier.append(child)
        if len(parent) > max_states:
            return None
        frontier = next_frontier
    return None


# Reverse plays tried per room; the puzzle is the one whose optimal solution is longest. One random
# reverse play gives short puzzles (about half of them 1-2 moves); the longest of 8 spreads optimal
# lengths over 1..10
# (see benchmarks/bench_envs.py for the histogram), as gym-sokoban's "highest room score" does.
SOKOBAN_REVERSE_PLAYS = 8


@functools.lru_cache(maxsize=4096)
def _generate_sokoban(seed, height, width, num_boxes, max_steps):
    """Reverse play from a solved room, as gym-sokoban does, until a puzzle fits the budget.

    Start with every box on its target and walk the player randomly; stepping away from an
    adjacent box pulls it along (the exact reverse of a push), so the final state is solvable by
    construction. The BFS solver measures the optimal solution of each reverse play; a puzzle
    qualifies only if it is not already solved and its optimal solution fits the action budget,
    and the qualifying play with the longest solution is kept.
    Returns (walls, targets, boxes, player, optimal_plan).
    """
    rng = random.Random(seed)
    deltas = (-width, width, -1, 1)
    for _ in range(10_000):
        walls = _random_room_walls(rng, height, width)
        floor = [i for i, w in enumerate(walls) if not w]
        if len(floor) < 2 * num_boxes + 4:
            continue
        targets = frozenset(rng.sample(floor, num_boxes))
        best = None
        for _ in range(SOKOBAN_REVERSE_PLAYS):
            boxes = set(targets)
            player = rng.choice([i for i in floor if i not in boxes])
            for _ in range(rng.randint(2, 4 * max_steps)):
                d = rng.choice(deltas)
                new = player + d
                if walls[new] or new in boxes:
                    continue
                if player - d in boxes:  # pull the box behind the player into its old cell
                    boxes.remove(player - d)
                    boxes.add(player)
                player = new
            if boxes == targets:
                continue  # no box left its target: already solved
            plan = sokoban_solve(walls, width, targets, boxes, player, max_depth=max_steps)
            if plan and (best is None or len(plan) > len(best[2])):
                best = (frozenset(boxes), player, tuple(plan))
        if best is not None:
            return (walls, targets) + best
    raise RuntimeError(f"could not generate a {height}x{width} Sokoban with {num_boxes} boxes "
                       f"solvable in {max_steps} actions (seed {seed})")


def _dim_room(value):
    """dim_room as (rows, cols), each 3..MAX_SIDE (a JSON override arrives as a list)."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise TypeError(f"dim_room must be [rows, cols], got {value!r}")
    return tuple(_whole("dim_room", x, 3, MAX_SIDE) for x in value)


@functools.lru_cache(maxsize=256)
def _solve_room(walls, width, targets, boxes, player, max_steps):
    """The optimal plan of a hand-written room as a tuple, or None if none fits max_steps actions;
    memoised because a rollout builds a fresh env for every episode."""
    plan = sokoban_solve(walls, width, targets, boxes, player, max_depth=max_steps)
    return None if plan is None else tuple(plan)


class Sokoban:
    """Push every box (X) onto a target (O). Actions: Up, Down, Left, Right (case-insensitive).

    Overrides: dim_room=(rows, cols) (default (6, 6), each 3..16), num_boxes (1, at most 6),
    max_steps (10, at most 200: the action budget per episode), render_mode ("grid" or "coords"),
    room (a hand-written symbol grid of at most 16x16, enclosed by walls, used instead of generated
    puzzles; like a generated one it must be solvable within max_steps actions, and dim_room and
    num_boxes, if given, must be its size and its boxes). The puzzle a seed gives depends on
    dim_room, num_boxes and max_steps too (the generator keeps puzzles that fit the budget).
    """

    ACTIONS = ("Up", "Down", "Left", "Right")
    SYMBOLS = {"wall": "#", "empty": "_", "target": "O", "box": "X", "box_on_target": "√",
               "player": "P", "player_on_target": "S"}

    def __init__(self, dim_room=None, num_boxes=None, max_steps=10, render_mode="grid", room=None):
        self.num_boxes = _whole("num_boxes", 1 if num_boxes is None else num_boxes, 1, MAX_BOXES)
        self.max_steps = _whole("max_steps", max_steps, 1, MAX_STEPS)
        self.render_mode = _check_render_mode(render_mode)
        if room is None:
            self.height, self.width = _dim_room((6, 6) if dim_room is None else dim_room)
            # the generator needs 2 * num_boxes + 4 floor cells inside the walls
            if (self.height - 2) * (self.width - 2) < 2 * self.num_boxes + 4:
                raise ValueError(f"dim_room {[self.height, self.width]} is too small for {self.num_boxes} box(es): "
                                 f"the room inside the walls needs at least {2 * self.num_boxes + 4} cells")
            self._fixed = None
        else:
            self._fixed = self._parse_room(room)  # sets height, width and num_boxes
            if dim_room is not None and _dim_room(dim_room) != (self.height, self.width):
                raise ValueError(f"dim_room {list(dim_room)} disagrees with the room, which is "
                                 f"{self.height}x{self.width}: leave dim_room out")
            if num_boxes is not None and num_boxes != self.num_boxes:
                raise ValueError(f"num_boxes {num_boxes} disagrees with the room, which has {self.num_boxes}: "
                                 f"leave num_boxes out")
        self._deltas = {"up": -self.width, "down": self.width, "left": -1, "right": 1}
        self._state = None
        self.done = False
        self.actions_left = self.max_steps

    def _parse_room(self, room):
        rows = _parse_grid(room, "#_OX√PS", "Sokoban room")
        self.height, self.width = len(rows), len(rows[0])
        cells = "".join(rows)
        border = rows[0] + rows[-1] + "".join(row[0] + row[-1] for row in rows)
        if set(border) != {"#"}:
            raise ValueError("Sokoban room: the outer ring must be walls (#)")
        players = [i for i, ch in enumerate(cells) if ch in "PS"]
        boxes = frozenset(i for i, ch in enumerate(cells) if ch in "X√")
        targets = frozenset(i for i, ch in enumerate(cells) if ch in "O√S")
        if len(players) != 1 or not boxes or len(boxes) != len(targets):
            raise ValueError("Sokoban room: needs one player and as many targets as boxes (>= 1)")
        if len(boxes) > MAX_BOXES:
            raise ValueError(f"Sokoban room: at most {MAX_BOXES} boxes, got {len(boxes)}")
        if boxes == targets:
            raise ValueError("Sokoban room: every box is already on a target (a solved puzzle)")
        self.num_boxes = len(boxes)
        walls = tuple(ch == "#" for ch in cells)
        # SPEC §2 holds generated puzzles to an optimal solution within the budget; a hand-written one
        # too, or the evaluation oracle (which plays that solution) would have no move to make
        plan = _solve_room(walls, self.width, targets, boxes, players[0], self.max_steps)
        if plan is None:
            raise ValueError(f"Sokoban room: no solution within max_steps={self.max_steps} actions (or none found "
                             f"in the solver's search limit)")
        return walls, targets, boxes, players[0], plan

    def reset(self, seed):
        seed = _check_seed(seed)
        if self._fixed is not None:
            walls, targets, boxes, player, _ = self._fixed
        else:
            walls, targets, boxes, player, _ = _generate_sokoban(
                seed, self.height, self.width, self.num_boxes, self.max_steps)
        self._walls, self._targets = walls, targets
        self._boxes, self._player = set(boxes), player
        # the static layer of the picture, copied and overdrawn by render()
        self._background = ["#" if w else ("O" if i in targets else "_") for i, w in enumerate(walls)]
        self._state = seed
        self.done = False
        self.actions_left = self.max_steps
        return self.render()

    def step(self, action):
        _check_can_step(self)
        d = self._deltas.get(action.strip().lower()) if isinstance(action, str) else None
        if d is None:
            return self.render(), 0.0, False, _info(valid=False)
        self.actions_left -= 1
        reward = SOKOBAN_STEP_PENALTY
        boxes, targets = self._boxes, self._targets
        p = self._player
        q = p + d
        effective = False
        if not self._walls[q]:
            if q not in boxes:
                self._player, effective = q, True
            elif not self._walls[q + d] and q + d not in boxes:  # push: the box moves one cell
                boxes.remove(q)
                boxes.add(q + d)
                self._player, effective = q, True
                if q in targets:
                    reward += SOKOBAN_BOX_OFF_TARGET
                if q + d in targets:
                    reward += SOKOBAN_BOX_ON_TARGET
        success = targets.issuperset(boxes)
        if success:
            reward += SOKOBAN_FINISHED
        self.done = success or self.actions_left == 0
        return self.render(), reward, self.done, _info(True, effective, success)

    def render(self, mode=None):
        _check_reset(self)
        mode = self.render_mode if mode is None else _check_render_mode(mode)
        cells = self._background[:]
        for b in self._boxes:
            cells[b] = "√" if b in self._targets else "X"
        cells[self._player] = "S" if self._player in self._targets else "P"
        w = self.width
        grid = "\n".join("".join(cells[i:i + w]) for i in range(0, len(cells), w))
        if mode == "grid":
            return grid
        return grid + "\n" + self._coords_sentence()

    def pieces(self):
        """Where the movable pieces are, as (row, col): {"player": (r, c), "boxes": [(r, c), ...]}."""
        _check_reset(self)
        return {"player": divmod(self._player, self.width), "boxes": sorted(divmod(b, self.width) for b in self._boxes)}

    def _coords_sentence(self):
        def where(cells):
            return ", ".join(f"({i // self.width},{i % self.width})" for i in sorted(cells))
        p = self._player
        box = "boxes (X) are at" if len(self._boxes) > 1 else "box (X) is at"
        target = "targets (O) are at" if len(self._targets) > 1 else "target (O) is at"
        return (f"Player (P) is at ({p // self.width},{p % self.width}); "
                f"{box} {where(self._boxes)}; {target} {where(self._targets)}.")

    def solve(self, max_depth=None):
        """Optimal (shortest) action list from the current state; None if the boxes are stuck,
        or if no solution is found within max_depth moves (or the solver's state limit)."""
        _check_reset(self)
        return sokoban_solve(self._walls, self.width, self._targets, self._boxes, self._player,
                             max_depth=max_depth)


# -----------------------------------------------------------------------------
# FrozenLake
#
# Symbols: P player, _ frozen, O hole, G goal, X player in a hole, √ player on the goal.
# Slippery (default): the intended move with probability 1/3 and each of the two perpendicular
# moves with 1/3, never the opposite one; a move off the board leaves the player where it is.
# Reward +1 on the goal (done, success); a hole ends the episode with 0; every other step 0.
#
# Actions are numbered as in gym's FrozenLake: 0 Left, 1 Down, 2 Right, 3 Up, so that the two
# perpendicular moves of action a are (a - 1) % 4 and (a + 1) % 4.

FROZENLAKE_ACTIONS = ("Left", "Down", "Right", "Up")
_FROZENLAKE_INDEX = {name.lower(): i for i, name in enumerate(FROZENLAKE_ACTIONS)}


@functools.lru_cache(maxsize=64)
def _neighbours(size):
    """next_cell[cell][action] on a size x size board; a move off the board stays in place."""
    table = []
    for cell in range(size * size):
        r, c = divmod(cell, size)
        moves = ((r, c - 1), (r + 1, c), (r, c + 1), (r - 1, c))  # Left Down Right Up
        table.append(tuple(rr * size + cc if 0 <= rr < size and 0 <= cc < size else cell
                           for rr, cc in moves))
    return tuple(table)


def _shortest_path(size, holes, start, goal):
    """Breadth-first search over non-hole cells; a shortest action list, or None."""
    nxt = _neighbours(size)
    parent = {start: None}
    queue = deque([start])
    while queue:
        cell = queue.popleft()
        if cell == goal:
            plan = []
            while parent[cell] is not None:
                cell, a = parent[cell]
                plan.append(FROZENLAKE_ACTIONS[a])
            return plan[::-1]
        for a, new in enumerate(nxt[cell]):
            if new not in parent and new not in holes:
                parent[new] = (cell, a)
                queue.append(new)
    return None


@functools.lru_cache(maxsize=4096)
def _generate_frozenlake(seed, size, hole_prob, max_steps):
    """A random map: random start and goal, each other cell a hole with probability hole_prob,
    redrawn until the goal is reachable in at most max_steps moves (so a non-slippery agent can
    always solve it, and a slippery one has a positive chance). Returns (holes, start, goal)."""
    rng = random.Random(seed)
    cells = range(size * size)
    for _ in range(100_000):
        start, goal = rng.sample(cells, 2)
        holes = frozenset(c for c in cells if c != start and c != goal and rng.random() < hole_prob)
        path = _shortest_path(size, holes, start, goal)
        if path is not None and len(path) <= max_steps:
            return holes, start, goal
    raise RuntimeError(f"could not generate a {size}x{size} FrozenLake with a path of at most "
                       f"{max_steps} moves (hole_prob {hole_prob}, seed {seed})")


class FrozenLake:
    """Walk from the start to the goal (G) without falling into a hole (O) on slippery ice.

    Overrides: size (4, at most 16), hole_prob (0.2, in [0, 1)), slippery (True), max_steps (10, at
    most 200: the action budget), render_mode ("grid" or "coords"), desc (a hand-written map of at
    most 16x16 using P for the start, G, O, _; like a generated map it needs a path from P to G
    within max_steps moves, and size, if given, must be its size).
    With the same seed, the map and the slips for a given action sequence are the same (as with
    Gymnasium's FrozenLake reset with a seed): the samples of one puzzle in a PPO group, or in
    Pass@k, share their slips and differ only where their actions do.
    """

    ACTIONS = FROZENLAKE_ACTIONS
    SYMBOLS = {"player": "P", "frozen": "_", "hole": "O", "goal": "G", "player_in_hole": "X",
               "player_on_goal": "√"}

    def __init__(self, size=None, hole_prob=0.2, slippery=True, max_steps=10, render_mode="grid",
                 desc=None):
        if isinstance(hole_prob, bool) or not isinstance(hole_prob, (int, float, np.integer, np.floating)):
            raise TypeError(f"hole_prob must be a number in [0, 1), got {hole_prob!r}")
        if not 0.0 <= hole_prob < 1.0:  # also refuses nan
            raise ValueError(f"hole_prob must be a number in [0, 1), got {hole_prob!r}")
        self.hole_prob, self.slippery = float(hole_prob), _flag("slippery", slippery)
        self.max_steps = _whole("max_steps", max_steps, 1, MAX_STEPS)
        self.render_mode = _check_render_mode(render_mode)
        self.size = 4 if size is None else _whole("size", size, 2, MAX_SIDE)
        self._fixed = None if desc is None else self._parse_desc(desc)
        if desc is not None and size is not None and size != self.size:
            raise ValueError(f"size {size} disagrees with desc, a {self.size}x{self.size} map: leave size out")
        self._state = None
        self.done = False
        self.actions_left = self.max_steps

    def _parse_desc(self, desc):
        rows = _parse_grid(desc, "P_OG", "FrozenLake desc")
        if len(rows) != len(rows[0]):
            raise ValueError("FrozenLake desc: the map must be square")
        self.size = len(rows)
        cells = "".join(rows)
        if cells.count("P") != 1 or cells.count("G") != 1:
            raise ValueError("FrozenLake desc: needs exactly one P (start) and one G (goal)")
        holes = frozenset(i for i, ch in enumerate(cells) if ch == "O")
        start, goal = cells.index("P"), cells.index("G")
        # the generator's rule (SPEC §2 guarantees a path from start to goal; it keeps one within the budget)
        path = _shortest_path(self.size, holes, start, goal)
        if path is None or len(path) > self.max_steps:
            raise ValueError(f"FrozenLake desc: no path from P to G within max_steps={self.max_steps} moves"
                             + ("" if path is None else f" (the shortest takes {len(path)})"))
        return holes, start, goal

    def reset(self, seed):
        seed = _check_seed(seed)
        if self._fixed is not None:
            self._holes, self._start, self._goal = self._fixed
        else:
            self._holes, self._start, self._goal = _generate_frozenlake(
                seed, self.size, self.hole_prob, self.max_steps)
        self._next = _neighbours(self.size)
        self._player = self._start
        # The slips have their own generator, seeded by the puzzle seed: the same seed and the
        # same action sequence always give the same trajectory (string seeds are hashed with
        # SHA-512 by `random`, so this does not depend on PYTHONHASHSEED).
        self._slip_rng = random.Random(f"frozenlake-slips-{seed}")
        self._state = seed
        self.done = False
        self.actions_left = self.max_steps
        return self.render()

    def step(self, action):
        _check_can_step(self)
        a = _FROZENLAKE_INDEX.get(action.strip().lower()) if isinstance(action, str) else None
        if a is None:
            return self.render(), 0.0, False, _info(valid=False)
        self.actions_left -= 1
        if self.slippery:  # -1, 0, +1 with probability 1/3 each: perpendicular, intended, perpendicular
            a = (a + int(self._slip_rng.random() * 3) - 1) % 4
        new = self._next[self._player][a]
        effective = new != self._player
        self._player = new
        success = new == self._goal
        self.done = success or new in self._holes or self.actions_left == 0
        return self.render(), 1.0 if success else 0.0, self.done, _info(True, effective, success)

    def render(self, mode=None):
        _check_reset(self)
        mode = self.render_mode if mode is None else _check_render_mode(mode)
        n, p = self.size, self._player
        grid = self._grid_with_player_at(p)
        if mode == "grid":
            return grid
        holes = [divmod(h, n) for h in sorted(self._holes)]
        holes_text = ("no holes" if not holes else
                      ("hole at " if len(holes) == 1 else "holes at ") + _join_positions(holes))
        return (grid + "\n" + f"Player ({p // n},{p % n}); {holes_text}; "
                f"goal at ({self._goal // n},{self._goal % n}).")

    def pieces(self):
        """Where the movable pieces are, as (row, col): {"player": (r, c)}."""
        _check_reset(self)
        return {"player": divmod(self._player, self.size)}

    def _grid_with_player_at(self, p):
        n = self.size
        cells = ["O" if i in self._holes else "_" for i in range(n * n)]
        cells[self._goal] = "G"
        cells[p] = "X" if p in self._holes else ("√" if p == self._goal else "P")
        return "\n".join("".join(cells[i:i + n]) for i in range(0, n * n, n))

    # -- the exact model, for evaluation ------------------------------------------------------

    def shortest_path(self):
        """Shortest action list from the current cell to the goal ignoring slips (None if none)."""
        _check_reset(self)
        return _shortest_path(self.size, self._holes, self._player, self._goal)

    def _key(self):
        _check_reset(self)
        return self.size, self._holes, self._goal, self.slippery

    def transition_matrices(self):
        """T[a, s, s'] = P(next cell s' | cell s, action a), holes and goal absorbing. (4, S, S)"""
        return _frozenlake_transitions(*self._key())

    def outcome_distribution(self, actions, position=None, actions_left=None):
        """Distribution of the final cell after playing `actions` in order, exactly as step()
        would: unknown actions are skipped, a hole or the goal ends the sequence, and at most
        `actions_left` actions run. position (row, col) and actions_left default to the current
        state. Returns {(row, col): probability} over cells with probability > 0; a hole cell
        means the player fell in, the goal cell that it arrived."""
        T = self.transition_matrices()
        n = self.size
        if position is None:
            start = self._player
        elif len(position) == 2 and all(0 <= int(x) < n for x in position):
            start = int(position[0]) * n + int(position[1])
        else:
            raise ValueError(f"position must be (row, col) on the {n}x{n} board, got {position!r}")
        budget = self.actions_left if actions_left is None else actions_left
        dist = np.zeros(n * n)
        dist[start] = 1.0
        for action in actions:
            a = _FROZENLAKE_INDEX.get(action.strip().lower()) if isinstance(action, str) else None
            if a is None:
                continue
            if budget <= 0:
                break
            budget -= 1
            dist = dist @ T[a]
        return {divmod(int(s), n): float(dist[s]) for s in np.flatnonzero(dist > 1e-12)}

    def oracle(self, *, max_turns=5, max_actions_per_turn=5):
        """Best achievable success probability from the start cell with the full budget.

        "turn_success": under the structure the agent plays in -- it sees the state only between
        turns and commits to 1..max_actions_per_turn actions per turn, at most max_turns turns
        and max_steps actions in all. "closed_loop_success": the same action budget with the
        state seen after every single action (an upper bound on turn_success).
        """
        key = self._key()
        W, _, _ = _frozenlake_turn_dp(*key, self.max_steps, max_turns, max_actions_per_turn)
        V = _frozenlake_closed_loop(*key, self.max_steps)
        return {"turn_success": float(W[max_turns, self.max_steps, self._start]),
                "closed_loop_success": float(V[self._start])}

    def oracle_actions(self, turns_left, *, max_turns=5, max_actions_per_turn=5):
        """The optimal next turn's actions from the current state with turns_left turns and
        self.actions_left actions left (the open-loop plan the turn-structured oracle commits to).
        Returns [] when nothing can help (no turns or actions left, or the episode is over)."""
        if turns_left <= 0 or self.actions_left <= 0 or self.done:
            return []
        turns_left = min(turns_left, max_turns)
        _, best_len, best_seq = _frozenlake_turn_dp(*self._key(), self.max_steps, max_turns,
                                                    max_actions_per_turn)
        where = (turns_left, self.actions_left, self._player)
        length, index = int(best_len[where]), int(best_seq[where])
        return [FROZENLAKE_ACTIONS[index // 4 ** (length - 1 - i) % 4] for i in range(length)]

    def random_success(self, plan_lengths, *, max_turns=5):
        """Success probability from the start cell with the full budget of the random-action
        policy: each turn it commits to L uniformly random actions with probability
        plan_lengths[L - 1], at most max_turns turns and max_steps actions in all (a turn cut
        short by the budget runs what is left). Exact: the oracle's turn recursion with the max
        over sequences replaced by the expectation over the random plan (see _frozenlake_random_dp)."""
        _check_reset(self)
        probs = tuple(float(p) for p in plan_lengths)
        if not probs or min(probs) < 0 or abs(sum(probs) - 1.0) > 1e-9:
            raise ValueError(f"plan_lengths must be probabilities of lengths 1, 2, ... summing to 1, "
                             f"got {plan_lengths!r}")
        R = _frozenlake_random_dp(*self._key(), self.max_steps, max_turns, probs)
        return float(R[max_turns, self.max_steps, self._start])


@functools.lru_cache(maxsize=1024)
def _frozenlake_transitions(size, holes, goal, slippery):
    nxt = _neighbours(size)
    S = size * size
    T = np.zeros((4, S, S))
    for s in range(S):
        for a in range(4):
            if s in holes or s == goal:
                T[a, s, s] = 1.0  # absorbing: the episode is over
            elif slippery:
                for slip in (-1, 0, 1):
                    T[a, s, nxt[s][(a + slip) % 4]] += 1.0 / 3.0
            else:
                T[a, s, nxt[s][a]] = 1.0
    T.setflags(write=False)
    return T


@functools.lru_cache(maxsize=1024)
def _frozenlake_closed_loop(size, holes, goal, slippery, budget):
    """Value iteration with a budget: V_k(s) = max_a sum_s' T[a,s,s'] V_{k-1}(s'), V_0 = 1{goal}.
    Holes and goal are absorbing, so V(goal) stays 1 and V(hole) stays 0. Returns V_budget (S,)."""
    T = _frozenlake_transitions(size, holes, goal, slippery)
    V = np.zeros(size * size)
    V[goal] = 1.0
    for _ in range(budget):
        V = (T @ V).max(axis=0)  # (4, S) -> (S,)
    return V


@functools.lru_cache(maxsize=1024)
def _frozenlake_turn_dp(size, holes, goal, slippery, budget, max_turns, max_actions_per_turn):
    """Dynamic programming over the agent's turn structure.

    W[t, b, s] = best success probability from cell s with t turns and b actions left, where a
    turn commits to an open-loop sequence of 1..max_actions_per_turn actions (the agent only
    sees the state between turns). With D_seq = T[a_1] @ ... @ T[a_L] the distribution after a
    sequence (terminal cells absorb, so the rest of a sequence is ignored after a hole or the
    goal, exactly as in the env):
        W[t, b, s] = max over L <= min(K, b), seq in A^L of  sum_s' D_seq[s, s'] W[t-1, b-L, s']
    with W[0, b] = W[t, 0] = 1{goal}. All 4 + 16 + ... + 4^K sequence matrices are built once.
    Returns W (max_turns+1, budget+1, S) and, for the arg-max plan of each (t, b, s), its length
    and its index among the 4^L sequences in base 4 (first action = most significant digit); among
    plans of equal value the one that wins in fewer turns (in expectation, discounted), then the
    shortest.
    """
    T = _frozenlake_transitions(size, holes, goal, slippery)
    S = size * size
    seq_mats = [T]  # per length L: the (4^L, S, S) matrices of all sequences, in base-4 order
    for _ in range(max_actions_per_turn - 1):
        seq_mats.append((seq_mats[-1][:, None] @ T[None]).reshape(-1, S, S))  # (4^L, 4, S, S)
    W = np.zeros((max_turns + 1, budget + 1, S))
    W[:, :, goal] = 1.0
    W_fast = W.copy()  # the chosen plans' success discounted by 1/2 per turn: the tie-break among plans of equal W
    best_len = np.zeros((max_turns + 1, budget + 1, S), dtype=np.int64)  # arg-max sequence length
    best_seq = np.zeros((max_turns + 1, budget + 1, S), dtype=np.int64)  # and its base-4 index
    terminal = [goal, *holes]
    for t in range(1, max_turns + 1):
        for b in range(1, budget + 1):
            best, best_soon = np.full(S, -1.0), np.full(S, -1.0)
            for L in range(1, min(max_actions_per_turn, b) + 1):
                values = seq_mats[L - 1] @ W[t - 1, b - L]  # (4^L, S)
                soon = seq_mats[L - 1] @ W_fast[t - 1, b - L]
                # among the sequences of best value, the one that wins in the fewest turns: with turns
                # to spare a detour is worth as much, and an oracle that dawdles is a poor reference
                top = values.max(axis=0)
                idx = np.where(values >= top - 1e-12, soon, -1.0).argmax(axis=0)  # (S,)
                top_soon = soon[idx, np.arange(S)]
                # ties (in value, then in speed) go to the shorter sequence
                better = (top > best + 1e-12) | ((top > best - 1e-12) & (top_soon > best_soon + 1e-12))
                best, best_soon = np.where(better, top, best), np.where(better, top_soon, best_soon)
                best_len[t, b] = np.where(better, L, best_len[t, b])
                best_seq[t, b] = np.where(better, idx, best_seq[t, b])
            best[terminal] = W[t, b, terminal]
            W[t, b] = best
            W_fast[t, b] = np.where(np.isin(np.arange(S), terminal), W_fast[t, b], 0.5 * best_soon)
    for table in (W, best_len, best_seq):
        table.setflags(write=False)
    return W, best_len, best_seq


@functools.lru_cache(maxsize=1024)
def _frozenlake_random_dp(size, holes, goal, slippery, budget, max_turns, plan_lengths):
    """The turn recursion of _frozenlake_turn_dp for a policy that plays uniformly random actions:
    with M = mean_a T[a] (one random action) and p_L = plan_lengths[L - 1],
        R[t, b, s] = sum_L p_L sum_s' (M^min(L, b))[s, s'] R[t-1, b-min(L, b), s']
    with R[0, b] = R[t, 0] = 1{goal}; terminal cells absorb, as in the env. Returns R
    (max_turns+1, budget+1, S)."""
    T = _frozenlake_transitions(size, holes, goal, slippery)
    S = size * size
    M = T.mean(axis=0)  # (S, S)
    powers = [np.eye(S)]  # powers[k] = M^k
    for _ in range(min(len(plan_lengths), budget)):
        powers.append(powers[-1] @ M)
    R = np.zeros((max_turns + 1, budget + 1, S))
    R[:, :, goal] = 1.0
    for t in range(1, max_turns + 1):
        for b in range(1, budget + 1):
            R[t, b] = sum(p * powers[min(L, b)] @ R[t - 1, b - min(L, b)]
                          for L, p in enumerate(plan_lengths, start=1))
    R.setflags(write=False)
    return R


# -----------------------------------------------------------------------------
# Sudoku 4x4
#
# Digits 1-4; every row, column and 2x2 box holds each digit once. An action "r,c,v" (1-indexed,
# spaces allowed) writes v at row r, column c. It is invalid (not applied) if out of range, the
# cell is a given or already filled, or v already appears in the row, column or box.
# Reward +1 when the grid is complete (done, success), 0 otherwise.
# Rendering: four lines of space-separated digits with "." for an empty cell, e.g.
#     . . 1 4
#     1 4 . 3
#     4 2 . .
#     . 1 4 2
# The coordinate sentence lists the empty cells, 1-indexed like the actions.

_SUDOKU_ACTION = re.compile(r"\s*([0-9]{1,3})\s*,\s*([0-9]{1,3})\s*,\s*([0-9]{1,3})\s*")
_BOX = tuple((r // 2) * 2 + c // 2 for r in range(4) for c in range(4))  # 2x2 box of each cell


def _all_sudoku_solutions():
    """All 288 complete 4x4 Sudoku grids, as tuples of 16 digits (row-major)."""
    grids = []

    def fill(grid, cell):
        if cell == 16:
            grids.append(tuple(grid))
            return
        r, c = divmod(cell, 4)
        for v in range(1, 5):
            if all(grid[i] != v for i in range(16) if i < cell and
                   (i // 4 == r or i % 4 == c or _BOX[i] == _BOX[cell])):
                grid[cell] = v
                fill(grid, cell + 1)
        grid[cell] = 0

    fill([0] * 16, 0)
    return tuple(grids)


SUDOKU_SOLUTIONS = _all_sudoku_solutions()
# _SOLUTION_MASKS[cell][v] is a bit set over SUDOKU_SOLUTIONS: bit i is set if solution i has
# digit v at cell. The solutions consistent with some givens are the AND of their masks, which
# makes "is this puzzle unique?" a handful of integer operations.
_SOLUTION_MASKS = [[sum(1 << i for i, g in enumerate(SUDOKU_SOLUTIONS) if g[cell] == v)
                    for v in range(5)] for cell in range(16)]
_ALL_SOLUTIONS_MASK = (1 << len(SUDOKU_SOLUTIONS)) - 1


def sudoku_solutions(grid):
    """All complete grids consistent with the filled cells of `grid` (16 ints, 0 = empty)."""
    mask = _ALL_SOLUTIONS_MASK
    for cell, v in enumerate(grid):
        if v:
            mask &= _SOLUTION_MASKS[cell][v]
    return [g for i, g in enumerate(SUDOKU_SOLUTIONS) if mask >> i & 1]


@functools.lru_cache(maxsize=4096)
def _generate_sudoku(seed, num_blanks):
    """A random complete grid, then cells blanked in random order while the solution stays
    unique, until num_blanks cells are empty (redrawn if a removal order gets stuck)."""
    rng = random.Random(seed)
    for _ in range(10_000):
        solution = list(rng.choice(SUDOKU_SOLUTIONS))
        puzzle = solution[:]
        blanks = 0
        for cell in rng.sample(range(16), 16):
            if blanks == num_blanks:
                break
            puzzle[cell] = 0
            if len(sudoku_solutions(puzzle)) == 1:
                blanks += 1
            else:
                puzzle[cell] = solution[cell]
        if blanks == num_blanks:
            return tuple(puzzle)
    raise RuntimeError(f"could not generate a unique 4x4 Sudoku with {num_blanks} blanks")


class Sudoku:
    """Fill the empty cells of a 4x4 Sudoku. Action: "row,col,value", 1-indexed.

    Overrides: num_blanks (6, at most 12: a unique 4x4 puzzle needs at least 4 givens),
    max_steps (50, at most 200: the action budget; at least num_blanks, as every valid move fills one
    cell, so within that the budget never runs out), render_mode ("grid" or "coords"), puzzle (16
    digits 0-4 or '.', row-major, whitespace and '|' ignored; must have exactly one solution; num_blanks,
    if given, must be its empty cells).
    A legal but wrong digit can leave no legal move at all: every action is then invalid (using no
    budget) and the episode goes on until the agent loop's turn limit ends it.
    """

    def __init__(self, num_blanks=None, max_steps=50, render_mode="grid", puzzle=None):
        self.num_blanks = _whole("num_blanks", 6 if num_blanks is None else num_blanks, 1, 12)
        self.max_steps = _whole("max_steps", max_steps, 1, MAX_STEPS)
        self.render_mode = _check_render_mode(render_mode)
        self._fixed = None if puzzle is None else self._parse_puzzle(puzzle)
        if puzzle is not None and num_blanks is not None and num_blanks != self.num_blanks:
            raise ValueError(f"num_blanks {num_blanks} disagrees with the puzzle, which has {self.num_blanks} "
                             f"empty cells: leave num_blanks out")
        if self.max_steps < self.num_blanks:
            raise ValueError(f"max_steps={self.max_steps} is below the {self.num_blanks} empty cells: every valid "
                             f"move fills one, so no episode could finish")
        self._state = None
        self.done = False
        self.actions_left = self.max_steps

    def _parse_puzzle(self, puzzle):
        digits = [ch for ch in str(puzzle) if not ch.isspace() and ch != "|"]
        if len(digits) != 16 or any(ch not in "01234." for ch in digits):
            raise ValueError(f"Sudoku puzzle must be 16 cells of 1-4, 0 or '.', got {puzzle!r}")
        grid = tuple(0 if ch in "0." else int(ch) for ch in digits)
        if len(sudoku_solutions(grid)) != 1 or all(grid):
            raise ValueError("Sudoku puzzle must have empty cells and exactly one solution")
        self.num_blanks = grid.count(0)
        return grid

    def reset(self, seed):
        seed = _check_seed(seed)
        puzzle = self._fixed if self._fixed is not None else _generate_sudoku(seed, self.num_blanks)
        self._grid = list(puzzle)
        self._state = seed
        self.done = False
        self.actions_left = self.max_steps
        return self.render()

    def step(self, action):
        _check_can_step(self)
        match = _SUDOKU_ACTION.fullmatch(action) if isinstance(action, str) else None
        cell, v = self._legal_move(match)
        if cell is None:
            return self.render(), 0.0, False, _info(valid=False)
        self._grid[cell] = v
        self.actions_left -= 1
        success = 0 not in self._grid
        self.done = success or self.actions_left == 0
        return self.render(), 1.0 if success else 0.0, self.done, _info(True, True, success)

    def _legal_move(self, match):
        """(cell, value) if the parsed move may be written now, else (None, None)."""
        if match is None:
            return None, None
        r, c, v = (int(x) for x in match.groups())
        if not (1 <= r <= 4 and 1 <= c <= 4 and 1 <= v <= 4):
            return None, None
        cell = (r - 1) * 4 + (c - 1)
        g = self._grid
        if g[cell]:
            return None, None
        for i in range(16):
            if g[i] == v and (i // 4 == r - 1 or i % 4 == c - 1 or _BOX[i] == _BOX[cell]):
                return None, None
        return cell, v

    def render(self, mode=None):
        _check_reset(self)
        mode = self.render_mode if mode is None else _check_render_mode(mode)
        g = self._grid
        grid = "\n".join(" ".join(str(v) if v else "." for v in g[i:i + 4]) for i in range(0, 16, 4))
        if mode == "grid":
            return grid
        empty = [f"({i // 4 + 1},{i % 4 + 1})" for i in range(16) if not g[i]]
        sentence = ("Empty positions to be filled are at " + ", ".join(empty) + "."
                    if empty else "No empty positions are left.")
        return grid + "\n" + sentence

    def pieces(self):
        """Sudoku has no movable pieces: {} (the grid is the whole state)."""
        _check_reset(self)
        return {}

    def solve(self):
        """Actions that complete the grid from the current state (None if it can no longer be
        completed, e.g. after a legal but wrong digit)."""
        _check_reset(self)
        solutions = sudoku_solutions(self._grid)
        if not solutions:
            return None
        return [f"{i // 4 + 1},{i % 4 + 1},{solutions[0][i]}" for i in range(16) if not self._grid[i]]


# -----------------------------------------------------------------------------
# For evaluating world models

def next_grid_distribution(env, actions):
    """{grid render: probability} of the state after playing `actions` from the env's current
    state exactly as step() would (unknown actions skipped; play stops when the episode ends).
    One outcome for the deterministic envs; for slippery FrozenLake the exact distribution. The
    env itself is not changed. A world model's prediction of that grid is right with the returned
    probability, and no predictor does better than the largest one."""
    if isinstance(env, FrozenLake) and env.slippery:
        n = env.size
        return {env._grid_with_player_at(r * n + c): p for (r, c), p in env.outcome_distribution(actions).items()}
    sim = copy.deepcopy(env)
    for action in actions:
        if sim.done:
            break
        sim.step(action)
    return {sim.render("grid"): 1.0}
