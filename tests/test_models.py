"""Loading checkpoints, the tiny preset (tokenizer + model), random-init real shapes, saving."""
import argparse
import json
import os
import re
import runpy
import shutil
import socket

import pytest
import torch

import agent
import envs


def test_tiny_preset_is_a_small_qwen2_that_reloads_identically(tiny_dir, tiny):
    model, tokenizer = tiny
    assert model.config.model_type == "qwen2" and not model.training
    n_params = sum(p.numel() for p in model.parameters())
    assert 1e6 < n_params < 5e6
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped-query attention
    for name in ("config.json", "model.safetensors", "tokenizer.json", "run_config.json"):
        assert os.path.isfile(os.path.join(tiny_dir, name))
    again, tokenizer2 = agent.load_model(tiny_dir, device="cpu")
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    text = agent.prompt_text(tokenizer, [{"role": "system", "content": agent.SYSTEM_PROMPT},
                                         {"role": "user", "content": "Turn 1:\nState:\n#_P#"}])
    assert tokenizer.encode(text) == tokenizer2.encode(text)


def test_fresh_tiny_model_builds_grid_line_embeddings_from_cells(tiny):
    """A grid line's embedding starts as the sum of its cells' vectors: the player moving one cell
    right is the same vector wherever it happens, and a FrozenLake line shares its columns with a
    Sokoban one."""
    model, tokenizer = tiny
    assert not model.config.tie_word_embeddings  # the input embeddings are not the softmax's (README)
    input_embeddings, output_embeddings = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert input_embeddings.data_ptr() != output_embeddings.data_ptr()

    def move(matrix, before, after):
        ids = [tokenizer.encode(line) for line in (before, after)]
        assert all(len(i) == 1 for i in ids), (before, after)
        return (matrix[ids[1][0]] - matrix[ids[0][0]]) * len(before) ** 0.5

    for matrix in (input_embeddings, output_embeddings):
        step = move(matrix, "#_P__#", "#__P_#")
        assert torch.allclose(step, move(matrix, "##P__#", "##_P_#"), atol=1e-6)
        assert torch.allclose(step, move(matrix, "__P_", "___P"), atol=1e-6)  # columns 2 -> 3 again
        assert torch.allclose(move(matrix, "_P__", "__P_"), move(matrix, "OP__", "O_P_"), atol=1e-6)
        assert not torch.allclose(step, move(matrix, "_P__", "__P_"), atol=1e-3)  # columns 1 -> 2
    is_line = [bool(re.fullmatch(agent.GRID_LINE, tokenizer.decode([i]))) for i in range(len(tokenizer))]
    lines = [i for i, line in enumerate(is_line) if line]
    others = [i for i, line in enumerate(is_line) if not line]
    assert len(lines) > 300
    norms = input_embeddings.norm(dim=-1)
    assert 0.8 < norms[lines].mean() / norms[others].mean() < 1.25  # composed, not rescaled


def test_tiny_preset_build_is_deterministic(tmp_path, tiny_dir):
    other = agent.build_tiny_model(str(tmp_path / "again"), seed=0)
    for name in ("tokenizer.json", "config.json"):
        with open(os.path.join(tiny_dir, name)) as f, open(os.path.join(other, name)) as g:
            assert f.read() == g.read(), name
    a, _ = agent.load_model(tiny_dir, device="cpu")
    b, _ = agent.load_model(other, device="cpu")
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_tiny_tokenizer_units(tiny):
    """Every line of a Sokoban/FrozenLake grid, every Sudoku cell, every coordinate and every tag
    is one token; the fixed sentences are few."""
    _, tokenizer = tiny

    def pieces(text):
        return [tokenizer.decode([t]) for t in tokenizer.encode(text, add_special_tokens=False)]

    whole_lines = []
    for name in envs.ENVS:
        env = envs.make(name)
        for seed in range(20):
            env.reset(seed)
            grid = env.render("grid")
            lines = [pieces(line) for line in grid.split("\n")]
            assert pieces(grid) == [p for i, line in enumerate(lines) for p in (["\n"] if i else []) + line]
            if name == "sudoku":  # each cell with its leading space
                assert lines == [re.findall(r" ?[^ ]", line) for line in grid.split("\n")], grid
            else:  # a line the tokenizer never saw splits into pieces, but never merges with the next
                whole_lines += [len(line) == 1 for line in lines]
            sentence = env.render("coords").split("\n")[-1]
            for coordinate in re.findall(r"\(\d+,\d+\)", sentence):
                assert coordinate in pieces(sentence)
    assert sum(whole_lines) >= 0.97 * len(whole_lines)
    for tag in agent.TAGS:
        assert pieces(tag) == [tag]
    for r, c, v in ((1, 1, 1), (2, 4, 3), (4, 4, 4)):  # every Sudoku move is one token
        assert pieces(f"I will try {r},{c},{v} || 1,2,3.") [1:4] == [f"{r},{c},{v}", " || ", "1,2,3"]
    # moves never merge with each other and take no leading space, so a plan is the same tokens in the
    # thoughts and in the answer: writing the answer is copying the plan
    plan = ["Down", " || ", "Left", " || ", "Down"]
    assert pieces("<answer>Down || Left || Down</answer>") == ["<answer>", *plan, "</answer>"]
    assert pieces("</observation>I will try Down || Left || Down.<prediction>")[2:7] == plan
    fixed = agent.turn_text(1, "", 10, "worldmodel", 128).replace("Turn 1:\nState:\n\n", "")
    assert len(pieces(fixed)) <= 25  # the whole format instruction
    for name in envs.ENVS:
        assert len(pieces(agent.INSTRUCTIONS["short"][name])) <= 18  # moves and the spaces between them stay apart
    # FrozenLake without slips drops a clause of the wording the tokenizer learnt: two tokens more, not dozens
    steady = agent.env_instruction("short", "frozenlake", envs.make("frozenlake", slippery=False))
    assert len(pieces(steady)) <= len(pieces(agent.INSTRUCTIONS["short"]["frozenlake"])) + 2


def test_tiny_tokenizer_round_trips_any_text(tiny):
    _, tokenizer = tiny
    for text in ["Player (P) is at (2,3); box (X) is at (1,1).", "ünïcödé ✓ 上 \x00 \t tabs", "#__√S#\n1 . 3 4",
                 "<think> <answer> Up || 1,2,3 </answer>", ""]:
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_load_errors_are_clear(tmp_path, tiny_dir):
    with pytest.raises(agent.ModelLoadError, match="no such folder"):
        agent.load_model(str(tmp_path / "missing"))
    with pytest.raises(agent.ModelLoadError, match="Hugging Face Hub could not provide it"):
        agent.load_model("Qwen/Qwen2.5-1.5B-Instruct")  # tests run with HF_HUB_OFFLINE=1
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_dir, corrupt)
    with open(corrupt / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(agent.ModelLoadError, match="corrupt"):
        agent.load_model(str(corrupt))
    no_template = tmp_path / "no_template"
    shutil.copytree(tiny_dir, no_template)
    os.remove(no_template / "chat_template.jinja")
    config_path = no_template / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))
    with pytest.raises(agent.ModelLoadError, match="chat template"):
        agent.load_model(str(no_template))
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(tiny_dir, no_tokenizer)
    os.remove(no_tokenizer / "tokenizer.json")
    with pytest.raises(agent.ModelLoadError, match="backend tokenizer from one of: .1. a `tokenizers` library"):
        agent.load_model(str(no_tokenizer))  # the message goes on past transformers' first line
    os.remove(no_tokenizer / "tokenizer_config.json")  # now the class comes from config.json: Qwen2's, empty
    with pytest.raises(agent.ModelLoadError, match="holds no vocabulary, only 1 special tokens: are its tokenizer"):
        agent.load_model(str(no_tokenizer))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(agent.ModelLoadError, match="cannot load"):
        agent.load_model(str(empty))
    # a run folder given for its model, a file given for a folder: said so
    shutil.copytree(tiny_dir, tmp_path / "run" / "model")
    with pytest.raises(agent.ModelLoadError, match=f"did you mean {tmp_path / 'run'}/model"):
        agent.load_model(str(tmp_path / "run"))
    with pytest.raises(agent.ModelLoadError, match="is a file, not a checkpoint folder"):
        agent.load_model(str(corrupt / "config.json"))
    # a tokenizer whose ids run past the model's embedding table would fail mid-run: refused at load
    small_vocab = tmp_path / "small_vocab"
    shutil.copytree(tiny_dir, small_vocab)
    model, tokenizer = agent.load_model(tiny_dir, device="cpu")
    model.resize_token_embeddings(len(tokenizer) - 10)
    model.save_pretrained(small_vocab)
    with pytest.raises(agent.ModelLoadError, match=f"has {len(tokenizer)} tokens and the model's vocabulary"):
        agent.load_model(str(small_vocab))
    # a file that parses but holds NaNs (corrupt bytes, or a diverged run's save) would fail mid-run in
    # the sampler: refused at load, naming a tensor
    not_finite = tmp_path / "not_finite"
    shutil.copytree(tiny_dir, not_finite)
    model, _ = agent.load_model(tiny_dir, device="cpu")
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight[3, 5] = float("nan")
    model.save_pretrained(not_finite)
    with pytest.raises(agent.ModelLoadError, match="not all finite: 1 tensors hold NaN or inf, model.layers.2.mlp"):
        agent.load_model(str(not_finite))


def test_a_model_id_fails_fast_when_the_hub_cannot_be_reached(monkeypatch, tmp_path):
    # the Hub client retries for about a minute offline; we ask whether it answers first, and
    # without an answer only the local cache is tried
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
        assert agent.hub_reachable()
        assert not agent._local_files_only("org/model")
    # the same port, closed now: refused
    assert not agent.hub_reachable()
    assert agent._local_files_only("org/model") and agent._local_files_only(str(tmp_path))
    seen = []
    monkeypatch.setattr(agent, "hub_reachable", lambda timeout=3.0: seen.append(timeout) or False)
    with pytest.raises(agent.ModelLoadError, match="Hugging Face Hub could not provide it"):
        agent.load_model("org/not-in-the-cache")
    assert seen


def test_random_models_have_the_real_shapes():
    for arch, billions in (("qwen2.5-0.5b", 0.494), ("qwen2.5-1.5b", 1.544)):
        model = agent.random_model(arch, device="meta")  # shapes only, no memory
        n = sum(p.numel() for p in model.parameters())
        assert abs(n / 1e9 - billions) < 0.001, (arch, n)
        assert model.config.num_key_value_heads == 2 and model.config.vocab_size == 151936
        assert model.config.tie_word_embeddings
    with pytest.raises(ValueError, match="unknown architecture"):
        agent.random_model("gpt-5")


def test_save_checkpoint_is_atomic_and_replaces(tmp_path, tiny):
    model, tokenizer = tiny
    out = tmp_path / "ckpt"
    agent.save_checkpoint(model, tokenizer, str(out), run_config={"step": 1})
    agent.save_checkpoint(model, tokenizer, str(out), run_config={"step": 2})
    assert json.loads((out / "run_config.json").read_text()) == {"step": 2}
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary or old folders left behind
    umask = os.umask(0o022)
    os.umask(umask)
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~umask)  # not mkdtemp's private 0o700
    assert {oct(f.stat().st_mode & 0o777) for f in out.iterdir()} == {oct(0o666 & ~umask)}

    class Exploding(torch.nn.Module):
        def save_pretrained(self, path, **kwargs):
            open(os.path.join(path, "partial"), "w").close()
            raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        agent.save_checkpoint(Exploding(), tokenizer, str(out))
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    assert json.loads((out / "run_config.json").read_text()) == {"step": 2}  # the old one is intact
    # what a save killed mid-way leaves (SIGKILL runs no cleanup) goes with the next save
    os.rename(out, tmp_path / "ckpt.old")
    shutil.copytree(tmp_path / "ckpt.old", tmp_path / ".tmp-ckpt-x1y2")
    agent.save_checkpoint(model, tokenizer, str(out), run_config={"step": 3})
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_argument_types_and_the_run_folder_fail_with_one_line(tmp_path):
    assert agent.json_object('{"slippery": false}') == {"slippery": False}
    for text, message in (("{bad", "not valid JSON"), ("[1]", "a JSON object"), ("null", "a JSON object")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            agent.json_object(text)
    assert agent.finite_float("1e-3") == 1e-3
    for text, message in (("nan", "finite"), ("inf", "finite"), ("-inf", "finite"), ("x", "not a number")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            agent.finite_float(text)
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match="--out .*file.*: File exists; pass a folder path"):
        agent.make_run_dir(str(tmp_path / "file"))
    agent.make_run_dir(str(tmp_path / "a" / "b"))
    assert (tmp_path / "a" / "b").is_dir()


def test_a_diverged_gradient_stops_the_run_before_the_optimiser_step():
    layer = torch.nn.Linear(2, 1)
    (layer(torch.ones(1, 2)) * float("nan")).sum().backward()
    with pytest.raises(SystemExit, match="gradient norm is nan"):
        agent.clip_gradients(layer, 1.0)
    layer.zero_grad()
    (layer(torch.ones(1, 2)) * 100).sum().backward()
    assert agent.clip_gradients(layer, 1.0) == pytest.approx(100 * 3 ** 0.5)  # the norm before clipping
    assert torch.cat([p.grad.flatten() for p in layer.parameters()]).norm() == pytest.approx(1.0)


def test_resume_train_state_refuses_bad_states_and_keeps_code_bugs_visible(tmp_path):
    path = str(tmp_path / "train_state.pt")
    layer = torch.nn.Linear(2, 1)
    agent.save_train_state(path, {"model": layer.state_dict(), "step": 3})
    state = agent.resume_train_state(path, ("model", "step"), lambda s: layer.load_state_dict(s["model"]), "x")
    assert state["step"] == 3
    with pytest.raises(SystemExit, match=r"cannot resume from .*not a train state written by x.py"):
        agent.resume_train_state(path, ("model", "optimizer"), lambda s: None, "x.py")
    with pytest.raises(SystemExit, match=r"cannot resume from .*RuntimeError.*size mismatch.*delete it"):
        agent.resume_train_state(path, ("model",), lambda s: torch.nn.Linear(3, 1).load_state_dict(s["model"]), "x")
    (tmp_path / "train_state.pt").write_bytes(b"truncated")
    with pytest.raises(SystemExit, match="cannot resume from"):
        agent.resume_train_state(path, ("model",), lambda s: None, "x")

    def buggy_restore(state):
        return undefined_name  # noqa: F821 -- a bug in the caller, not in the state
    agent.save_train_state(path, {"model": layer.state_dict()})
    with pytest.raises(NameError):  # a traceback, not "delete it to start over"
        agent.resume_train_state(path, ("model",), buggy_restore, "x")


def test_a_save_that_fails_midway_leaves_the_old_file(tmp_path):
    """write_atomically writes beside the file and renames: a save that dies partway (disk full, an
    object that cannot be pickled) leaves the previous train state whole, not a truncated one."""
    path = str(tmp_path / "train_state.pt")
    layer = torch.nn.Linear(2, 1)
    agent.save_train_state(path, {"model": layer.state_dict(), "step": 3})
    good = (tmp_path / "train_state.pt").read_bytes()

    def write_half(f):
        f.write(good[:len(good) // 2])
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        agent.write_atomically(path, write_half)
    assert (tmp_path / "train_state.pt").read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_state.pt"]  # and no half-written file beside it

    class Unpicklable:
        def __reduce__(self):
            raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        agent.save_train_state(path, {"model": layer.state_dict(), "step": 4, "extra": Unpicklable()})
    assert (tmp_path / "train_state.pt").read_bytes() == good
    state = agent.resume_train_state(path, ("model", "step"), lambda s: layer.load_state_dict(s["model"]), "x")
    assert state["step"] == 3


def test_a_script_interrupted_says_how_to_continue(capsys):
    def interrupted_main(argv):
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as exit_info:
        agent.run_script(interrupted_main, "Run the same command to continue.")
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.strip() == "interrupted. Run the same command to continue."


@pytest.mark.parametrize("script", ["worldmodel_sft.py", "rl.py", "evaluate.py", "benchmarks/bench_learning.py"])
def test_every_resumable_script_runs_its_main_through_run_script(script, monkeypatch):
    calls = []  # run as a script, with run_script recording what it is given instead of running it
    monkeypatch.setattr(agent, "run_script", lambda main, on_interrupt: calls.append((main, on_interrupt)))
    namespace = runpy.run_path(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), script),
                               run_name="__main__")
    assert len(calls) == 1 and calls[0][0] is namespace["main"] and "the same command" in calls[0][1]
