"""Our FrozenLake against an independent implementation: Gymnasium's FrozenLake-v1.

envs.py is written by hand so that it can be read; Gymnasium's is the reference implementation
its rules come from (SPEC §2: the intended move with probability 1/3, each perpendicular move
with 1/3, a move off the board stays in place, holes and the goal end the episode, reward 1 on
the goal). The two agree if, on the same maps, they have the same transition model, play the
same trajectories without slips, and our oracle's closed-loop optimum equals value iteration on
Gymnasium's model. Gymnasium is a test-only dependency (requirements.txt); our maps (random start
and goal) are handed to it as a `desc`, since its own map generator draws other maps."""
import random

import numpy as np
import pytest

import envs

gymnasium = pytest.importorskip("gymnasium", reason="test-only dependency (requirements.txt)")

SEEDS = range(40)


def gymnasium_lake(env, slippery):
    """Gymnasium's FrozenLake-v1 on the map our env was reset to (S start, F frozen, H hole, G goal)."""
    desc = [row.replace("P", "S").replace("_", "F").replace("O", "H") for row in env.render("grid").split("\n")]
    return gymnasium.make("FrozenLake-v1", desc=desc, is_slippery=slippery).unwrapped


def gymnasium_transitions(lake):
    """T[a, s, s'] and the reward / terminated of each (s, a, s') from Gymnasium's model P."""
    S, A = lake.observation_space.n, lake.action_space.n
    T, reward, terminated = np.zeros((A, S, S)), np.zeros((A, S, S)), np.zeros((A, S, S), dtype=bool)
    for s in range(S):
        for a in range(A):
            for probability, s_next, r, done in lake.P[s][a]:
                T[a, s, s_next] += probability
                reward[a, s, s_next], terminated[a, s, s_next] = r, done
    return T, reward, terminated


@pytest.mark.parametrize("slippery", [True, False])
def test_transition_model_equals_gymnasium(slippery):
    for seed in SEEDS:
        env = envs.make("frozenlake", slippery=slippery)
        env.reset(seed)
        lake = gymnasium_lake(env, slippery)
        T, reward, terminated = gymnasium_transitions(lake)
        assert [a.lower() for a in envs.FrozenLake.ACTIONS] == ["left", "down", "right", "up"]  # Gymnasium's 0..3
        np.testing.assert_allclose(env.transition_matrices(), T, atol=1e-12, err_msg=f"seed {seed}")
        # rewards and ends on every reachable move: 1 exactly on arriving at the goal, the end on a hole or the goal
        cells = lake.desc.flatten()
        live = np.array([c in b"SF" for c in cells])
        for a, s, s_next in zip(*np.nonzero(T)):
            if live[s]:
                assert reward[a, s, s_next] == float(cells[s_next] == b"G")
                assert terminated[a, s, s_next] == (cells[s_next] in b"HG")


def test_trajectories_without_slips_equal_gymnasium():
    rng = random.Random(0)
    for seed in SEEDS:
        env = envs.make("frozenlake", slippery=False, max_steps=50)
        env.reset(seed)
        lake = gymnasium_lake(env, slippery=False)
        state, _ = lake.reset(seed=seed)
        for _ in range(50):
            a = rng.randrange(4)
            state, reward, terminated, _, _ = lake.step(a)
            _, our_reward, done, info = env.step(envs.FrozenLake.ACTIONS[a])
            assert divmod(int(state), env.size) == env.pieces()["player"]
            assert (our_reward, info["success"]) == (reward, reward == 1.0)
            if terminated:
                assert done
                break
            assert not done


def test_slips_follow_gymnasiums_probabilities():
    """Our slips come from our own generator, so trajectories differ from Gymnasium's; their
    frequencies must match its model: 3000 first moves from the start of each of 5 maps, each
    action (a hand-given map, so that the seed draws only the slips)."""
    for map_seed in range(5):
        env = envs.make("frozenlake")
        env.reset(map_seed)
        T, _, _ = gymnasium_transitions(gymnasium_lake(env, slippery=True))
        r, c = env.pieces()["player"]
        fixed_map = envs.make("frozenlake", desc=env.render("grid").split("\n"))
        for a, action in enumerate(envs.FrozenLake.ACTIONS):
            counts = np.zeros(env.size ** 2)
            for trial in range(3000):
                fixed_map.reset(trial)
                fixed_map.step(action)
                r_next, c_next = fixed_map.pieces()["player"]
                counts[r_next * env.size + c_next] += 1
            # the binomial standard error at p = 1/3 over 3000 draws is 0.0086: 5 of them
            np.testing.assert_allclose(counts / 3000, T[a, r * env.size + c], atol=0.043,
                                       err_msg=f"map {map_seed}, {action}")


def test_closed_loop_optimum_equals_value_iteration_on_gymnasiums_model():
    for seed in SEEDS:
        env = envs.make("frozenlake")
        env.reset(seed)
        lake = gymnasium_lake(env, slippery=True)
        T, reward, terminated = gymnasium_transitions(lake)
        # V_k(s) = max_a sum_s' T[a,s,s'] (reward + V_{k-1}(s') if not terminated), V_0 = 0: success within k moves
        V = np.zeros(T.shape[1])
        live = np.array([c in b"SF" for c in lake.desc.flatten()])
        for _ in range(env.max_steps):
            V = np.where(live, (T * (reward + np.where(terminated, 0.0, V[None, None, :]))).sum(-1).max(0), 0.0)
        start = int(lake.reset(seed=0)[0])
        assert env.oracle()["closed_loop_success"] == pytest.approx(V[start], abs=1e-12), f"seed {seed}"
