"""
The LLM side of SPA, shared by self-play SFT, PPO and evaluation (SPEC §3, §8).

Read top to bottom:
  1. prompts       -- the system prompt, per-env instructions, the turn template, both modes
  2. parsing       -- response text -> actions, observation, prediction, format validity
  3. models        -- loading a Hugging Face checkpoint (and saving one); random-init models of real shapes
  4. tiny preset   -- a from-scratch tokenizer and Qwen2 model that run on a laptop CPU
  5. sampler       -- batched generation with a KV cache, written by hand
  6. rollout       -- env_groups x group_size multi-turn episodes, every live episode's next
                      turn generated in one batch; the policies that play them
  7. small pieces  -- what the stage scripts share around the method: the training forward, gradient
                      clipping, JSON-lines and atomic writes, train-state save/resume, run-folder
                      settings checks, flag types, the scripts' entry point

The stages import what they need from here (and the rules from envs.py); what only one stage
needs stays in that stage's script.
"""
import argparse
import glob
import json
import math
import os
import random
import re
import shutil
import socket
import sys
import tempfile
import time
import types
import urllib.parse
import warnings
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.utils import logging as transformers_logging

import envs

# Our scripts show their own progress; transformers' per-load/per-save bars would interleave with it.
transformers_logging.disable_progress_bar()
# Attention kernels on a GPU: recent torch puts cuDNN's first on H100, and it builds an execution
# plan for every new shape (batch, length): tens of milliseconds of host time each. Our batches
# change shape all the time -- SFT's length buckets, PPO's micro-batches, a decode whose rows leave
# and whose cache grows -- so that cost would come back every step (and a plan per key length
# cannot be recorded in a CUDA graph). Flash and memory-efficient attention need no plan.
torch.backends.cuda.enable_cudnn_sdp(False)

# -----------------------------------------------------------------------------
# 1. Prompts (SPEC §3)
#
# Chat format (Qwen style): a system message, then the first user message = the env instruction
# followed by turn 1; every later user message starts with "Reward:\n<r>\n" and then the next turn.
# The generation prompt ends with "<think>", so the model starts thinking straight away.

SYSTEM_PROMPT = "You're a helpful assistant."
MODES = ("worldmodel", "base")
FORMATS = {
    "worldmodel": ("<think> <observation> [current state] </observation> [Your thoughts] "
                   "<prediction> [next state]</prediction> </think> <answer> [your answer] </answer>"),
    "base": "<think> [Your thoughts] </think> <answer> [your answer] </answer>",
}
THINK_START = "<think>"
# Tags the format uses; the tiny tokenizer makes each of them one token.
TAGS = ("<think>", "</think>", "<observation>", "</observation>", "<prediction>", "</prediction>",
        "<answer>", "</answer>")

MAX_TURNS = 5
MAX_ACTIONS_PER_TURN = 5
MAX_RESPONSE_TOKENS = 400  # SPEC §5: tokens per turn at paper scale
MAX_CONTEXT_TOKENS = 3600  # SPEC §5: tokens per conversation
ACTION_SEPARATOR = "||"
FORMAT_PENALTY = -0.1

# What FrozenLake's instruction says about the ice, slippery (the default) or not (--env-overrides
# '{"slippery": false}'): the instruction describes the env the model plays. The short wording
# without slips just drops its clause, so the tiny tokenizer, trained on the slippery wording,
# knows every piece of it.
ICE = {"full": {True: "The ice is slippery: a move can take you sideways instead of where you meant to go, "
                      "but never backwards.",
                False: "The ice does not slip: every move goes where you meant it to."},
       "short": {True: "; the ice may slip you sideways.", False: "."}}

# The env instruction states the rules, the symbols, the coordinate convention and one example
# answer. "full" is for instruction-tuned models at paper scale; "short" is the tiny preset's, as
# every token costs CPU time there. Both agree with envs.py; tests check the symbols against it.
INSTRUCTIONS = {
    "full": {
        "sokoban": (
            "You are playing Sokoban. You are the player P in a warehouse; walk into a box X to "
            "push it one cell, and get every box onto a target O. A box cannot be pulled, and it "
            "cannot move into a wall or another box.\n"
            "Symbols: # wall, _ floor, O target, X box, √ box on a target, P player, S player on a target.\n"
            "Positions are (row,col), counted from 0 at the top-left cell.\n"
            "Actions: Up, Down, Left, Right. Give up to 5 per turn, joined by ||, for example "
            "<answer>Left || Up</answer>"),
        "frozenlake": (
            "You are playing FrozenLake. You are the player P on a frozen lake; reach the goal G "
            "without falling into a hole O. " + ICE["full"][True] + "\n"
            "Symbols: _ ice, O hole, G goal, P player, X player in a hole, √ player on the goal.\n"
            "Positions are (row,col), counted from 0 at the top-left cell.\n"
            "Actions: Left, Down, Right, Up. Give up to 5 per turn, joined by ||, for example "
            "<answer>Down || Right</answer>"),
        "sudoku": (
            "You are solving a 4x4 Sudoku. Fill every empty cell (.) with a digit from 1 to 4 so "
            "that every row, every column and every 2x2 box holds 1, 2, 3 and 4 exactly once.\n"
            "Positions are (row,col), counted from 1 at the top-left cell.\n"
            "Action: row,col,digit writes a digit into an empty cell. Give up to 5 per turn, "
            "joined by ||, for example <answer>1,2,3 || 4,1,2</answer>"),
    },
    "short": {
        "sokoban": ("Sokoban: push every box X onto a target O. # wall, _ floor, √ box on target, "
                    "P you, S you on target. (row,col) from 0. Actions Up Down Left Right, "
                    "e.g. <answer>Left || Up</answer>"),
        "frozenlake": ("FrozenLake: reach the goal G, avoid holes O" + ICE["short"][True] + " "
                       "_ ice, P you, X you in a hole, √ you on G. (row,col) from 0. Actions Left "
                       "Down Right Up, e.g. <answer>Down || Right</answer>"),
        "sudoku": ("Sudoku 4x4: fill each . with 1-4, once per row, column and 2x2 box. (row,col) "
                   "from 1. Action row,col,digit, e.g. <answer>1,2,3 || 4,1,2</answer>"),
    },
}


def env_instruction(style, env_name, env):
    """The instruction for env (the envs.py object of env_name) in wording style "full" or "short"."""
    text = INSTRUCTIONS[style][env_name]
    if isinstance(env, envs.FrozenLake) and not env.slippery:
        text = text.replace(ICE[style][True], ICE[style][False])
    return text


def format_reward(reward):
    """-0.30000000000000004 -> '-0.3', 1.0 -> '1', -0.0 -> '0' (how the model is told its reward)."""
    return f"{round(reward, 4) + 0.0:g}"


def turn_text(turn, state, actions_left, mode, max_response_tokens):
    """One turn of a user message, exactly the template of SPEC §3 (turns count from 1)."""
    return (f"Turn {turn}:\nState:\n{state}\nYou have {actions_left} actions left. "
            f"Always output: {FORMATS[mode]} with no extra text. Strictly follow this format. "
            f"Max response length: {max_response_tokens} words (tokens).")


def user_message(turn, state, actions_left, mode, max_response_tokens, instruction=None, reward=None):
    """The user message that opens a turn: the env instruction on the first turn, the previous
    turn's reward on every later one."""
    head = instruction + "\n" if instruction is not None else ""
    if reward is not None:
        head += f"Reward:\n{format_reward(reward)}\n"
    return head + turn_text(turn, state, actions_left, mode, max_response_tokens)


def prompt_text(tokenizer, messages):
    """The text the model continues: the chat template with its generation prompt, plus <think>."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + THINK_START


# -----------------------------------------------------------------------------
# 2. Parsing (SPEC §3)
#
# A response (including the <think> the prompt ended with) is format-valid when it is exactly
#   <think> ... </think> <answer> ... </answer>
# with nothing but whitespace around, each of these four tags exactly once, no tag inside the
# answer, at least one action in the answer, and -- in world-model mode -- <observation>...</observation>
# followed by <prediction>...</prediction> inside the think span, each state tag exactly once. (In base
# mode the thoughts are free text; states written there are read when each state tag occurs once.)
#
# Plain string search, not regular expressions with lazy groups: a model can write any junk, and
# nested lazy groups backtrack for minutes on a few kilobytes of repeated tags.


def split_actions(answer, max_actions=MAX_ACTIONS_PER_TURN):
    """The text of an answer -> its actions: split on '||', stripped, empty pieces dropped,
    at most max_actions kept (the rest of an over-long answer is ignored)."""
    actions = [a.strip() for a in answer.split(ACTION_SEPARATOR)]
    return [a for a in actions if a][:max_actions]


def parse_actions(response, max_actions=MAX_ACTIONS_PER_TURN):
    """The actions of the first <answer>...</answer> in any text; [] when there is none.

    Lenient on purpose (the rollout uses parse_response, which also checks the format): it never
    raises on text, and whether an action is one the env understands is the env's call.
    """
    if not isinstance(response, str):
        return []
    start = response.find("<answer>")
    end = response.find("</answer>", start + len("<answer>")) if start >= 0 else -1
    return split_actions(response[start + len("<answer>"):end], max_actions) if end >= 0 else []


def _only_span(text, open_tag, close_tag):
    """(start, end) of the text inside open_tag ... close_tag when each tag occurs exactly once,
    in that order; None otherwise."""
    if text.count(open_tag) != 1 or text.count(close_tag) != 1:
        return None
    start, end = text.index(open_tag) + len(open_tag), text.index(close_tag)
    return (start, end) if start <= end else None


def parse_response(response, mode, max_actions=MAX_ACTIONS_PER_TURN):
    """Read one assistant turn. Returns a dict:
      format_valid  -- the response follows the mode's format (see above)
      actions       -- the answer's actions ([] unless format_valid)
      think, answer, observation, prediction -- the stripped spans, None where absent
    A malformed response is an invalid turn, never an error; an unknown mode is a caller's bug.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    parsed = {"format_valid": False, "actions": [], "think": None, "answer": None,
              "observation": None, "prediction": None}
    text = response.strip() if isinstance(response, str) else ""
    think, answer = _only_span(text, "<think>", "</think>"), _only_span(text, "<answer>", "</answer>")
    if think is None or answer is None:
        return parsed
    between = text[think[1] + len("</think>"):answer[0] - len("<answer>")]
    if not (text.startswith("<think>") and text.endswith("</answer>")) or think[1] > answer[0] or between.strip():
        return parsed
    think_text, answer_text = text[think[0]:think[1]], text[answer[0]:answer[1]]
    parsed["think"], parsed["answer"] = think_text.strip(), answer_text.strip()
    observation = _only_span(think_text, "<observation>", "</observation>")
    prediction = _only_span(think_text, "<prediction>", "</prediction>")
    has_states = observation is not None and prediction is not None and observation[1] < prediction[0]
    if has_states:
        parsed["observation"] = think_text[observation[0]:observation[1]].strip()
        parsed["prediction"] = think_text[prediction[0]:prediction[1]].strip()
    actions = split_actions(answer_text, max_actions)
    valid = bool(actions) and not any(tag in answer_text for tag in TAGS) and (has_states or mode == "base")
    parsed["format_valid"] = valid
    parsed["actions"] = actions if valid else []
    return parsed


def world_model_scores(env, parsed, true_observation):
    """(observation_exact, prediction_exact, prediction_bayes) of one parsed turn (parse_response, or
    a rollout's turn record) written at env's current state, whose coordinates render is
    true_observation. prediction_exact is the probability that the turn's actions lead to the
    predicted grid (0 or 1 but on slippery FrozenLake), and 0 in a format-invalid turn, whose
    actions did not run; prediction_bayes is the best possible predictor's score on the same turn.
    SFT's and evaluate.py's world-model accuracy are both this."""
    outcomes = envs.next_grid_distribution(env, parsed["actions"])
    return (float(parsed["observation"] == true_observation),
            outcomes.get(parsed["prediction"], 0.0) if parsed["format_valid"] else 0.0,
            max(outcomes.values()))


# -----------------------------------------------------------------------------
# 3. Models
#
# One loader for every stage: a Hugging Face id or a local folder (ours are saved in the same
# format), bf16 + SDPA on GPU, fp32 on CPU, never trust_remote_code.

# Shapes of real architectures, for random-init models: the compute, memory and speed of the
# paper-scale path can be measured here even though the weights cannot be downloaded.
ARCHITECTURES = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                         max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                         tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                         max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                         tie_word_embeddings=True),
}
DEFAULT_MODEL = "Qwen/Qwen2.5-1.5B-Instruct"


class ModelLoadError(RuntimeError):
    """A checkpoint that cannot be loaded, with a message that says why and what to do."""


def default_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device):
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def hub_reachable(timeout=3.0):
    """Whether the Hugging Face Hub answers a TCP connection. Without a network the Hub client
    retries for about a minute before it gives up; asking first lets a model id fail in seconds."""
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
        return True
    except (OSError, TypeError):  # no DNS, no route, refused, timed out; TypeError: no hostname
        return False


def _local_files_only(name_or_path):
    """A folder never needs the Hub; a model id goes to the Hub only when it answers (else the
    local cache alone is tried, which fails at once when the id is not there)."""
    return os.path.isdir(name_or_path) or not hub_reachable()


def load_tokenizer(name_or_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    try:
        if _declares_generic_tokenizer(name_or_path):
            # transformers 5 rebuilds the pre-tokenizer of every checkpoint whose config says
            # "qwen2" with Qwen's own regex, ignoring tokenizer.json. The tiny preset's tokenizer
            # has a pre-tokenizer of its own, so a checkpoint that declares the generic backend is
            # loaded from its tokenizer.json exactly as saved.
            tokenizer = PreTrainedTokenizerFast.from_pretrained(name_or_path)
        else:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False,
                                                      local_files_only=_local_files_only(name_or_path))
    except Exception as e:  # OSError (missing / offline), ValueError, json or safetensors errors (corrupt)
        raise ModelLoadError(load_failure(name_or_path, "tokenizer", e)) from e
    if len(tokenizer) <= len(tokenizer.all_special_tokens):
        # a folder without its tokenizer files: transformers builds an empty tokenizer of the class the
        # model's config names, which would fail later, elsewhere (on the chat template, say)
        raise ModelLoadError(f"the tokenizer of {name_or_path!r} holds no vocabulary, only {len(tokenizer)} special "
                             f"tokens: are its tokenizer files (tokenizer.json, vocab.json, ...) missing?")
    if not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(f"the tokenizer of {name_or_path!r} has no chat template; SPA's prompts "
                             f"are chats (use an instruct model or a checkpoint saved by this project)")
    try:  # checked now, not at the first rollout: every stage builds its prompts from these pieces
        _template_pieces(tokenizer)
    except Exception as e:  # ValueError (what the pieces need), or the template's own error (Jinja)
        raise ModelLoadError(f"the chat template of {name_or_path!r} cannot be used: {e}") from e
    return tokenizer


def _declares_generic_tokenizer(name_or_path):
    path = os.path.join(name_or_path, "tokenizer_config.json")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        return json.load(f).get("tokenizer_class") in ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_model(name_or_path, device=None, dtype=None):
    """(model, tokenizer) from a Hugging Face id or local folder, in eval mode on `device`."""
    from transformers import AutoModelForCausalLM
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    tokenizer = load_tokenizer(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, attn_implementation="sdpa",
                                                     trust_remote_code=False,
                                                     local_files_only=_local_files_only(name_or_path))
    except Exception as e:  # as in load_tokenizer: re-raised below with what to do about it
        raise ModelLoadError(load_failure(name_or_path, "model", e)) from e
    if len(tokenizer) > model.config.vocab_size:  # its ids would index past the embedding table mid-run
        raise ModelLoadError(f"the tokenizer of {name_or_path!r} has {len(tokenizer)} tokens and the model's "
                             f"vocabulary {model.config.vocab_size}: they do not belong together")
    model = model.to(device).eval()
    # a corrupt file can still parse, and its NaNs would surface mid-run as a sampling error
    not_finite = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if not_finite:
        raise ModelLoadError(f"the weights of {name_or_path!r} are not all finite: {len(not_finite)} tensors hold "
                             f"NaN or inf, {not_finite[0]} first (a corrupt file, or a checkpoint of a run that "
                             f"diverged)")
    return model, tokenizer


def load_failure(name_or_path, what, error):
    """The one line a user sees for a checkpoint that cannot be loaded: what was given, and the likely fix."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()] or [type(error).__name__]
    first_line = lines[0]
    for line in lines[1:]:  # a first line that ends in ':' says nothing without what follows
        if not first_line.endswith((":", ",")) or len(first_line) > 200:
            break
        first_line += " " + line
    if os.path.isfile(name_or_path):
        return f"cannot load the {what}: {name_or_path!r} is a file, not a checkpoint folder"
    if os.path.isfile(os.path.join(name_or_path, "model", "config.json")):  # a run folder given for its model
        return f"cannot load the {what}: {name_or_path!r} is a run folder; did you mean {name_or_path}/model?"
    if os.path.isdir(name_or_path):
        return f"cannot load the {what} from folder {name_or_path!r} (missing or corrupt files?): {first_line}"
    return (f"cannot load the {what} {name_or_path!r}: there is no such folder, and the Hugging Face "
            f"Hub could not provide it as a model id (no network, HF_HUB_OFFLINE set, or a wrong id). "
            f"Download it where there is network and pass the folder (worldmodel_sft.py and rl.py can also run "
            f"without downloads: --preset tiny). ({first_line})")


def random_model(arch, device=None, dtype=None, seed=0):
    """A randomly initialised model of a named real architecture (see ARCHITECTURES)."""
    from transformers import AutoModelForCausalLM, Qwen2Config
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}: choose one of {', '.join(ARCHITECTURES)}")
    device = torch.device(device) if device is not None else default_device()
    config = Qwen2Config(**ARCHITECTURES[arch], attn_implementation="sdpa")
    torch.manual_seed(seed)
    with torch.device(device):  # initialise straight on the device: no detour through host RAM (3.1 GB: 1.5B in bf16)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or default_dtype(device))
    return model.eval()


def kv_cache_bytes_per_token(config, bytes_per_value):
    """Bytes of keys and values one token adds to the KV cache, over all layers."""
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers * 2 * kv_heads * head_dim * bytes_per_value


def save_checkpoint(model, tokenizer, out_dir, run_config=None):
    """A Hugging Face folder (config.json, model.safetensors, tokenizer files, run_config.json),
    written to a temporary folder beside out_dir and renamed into place: a crash never leaves a
    half-written checkpoint, and an existing one is replaced only once the new one is complete."""
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    prefix = ".tmp-" + os.path.basename(out_dir) + "-"
    # what a save killed mid-way left behind: the old checkpoint, moved aside, comes back first (it may
    # be the only complete one); then the leftovers go (a full checkpoint each)
    if not os.path.exists(out_dir) and os.path.isdir(out_dir + ".old"):
        os.rename(out_dir + ".old", out_dir)
    for stale in glob.glob(os.path.join(glob.escape(parent), glob.escape(prefix) + "*")) + [out_dir + ".old"]:
        shutil.rmtree(stale, ignore_errors=True)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        model = getattr(model, "module", model)  # DDP wrapper
        model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if run_config is not None:
            write_json(os.path.join(tmp, "run_config.json"), run_config)
        # mkdtemp (and some writers) make private files: give the checkpoint the permissions of any other
        # new file, so that a colleague on a shared machine can evaluate it
        umask = os.umask(0o022)
        os.umask(umask)  # reading the umask sets it: set it back
        os.chmod(tmp, 0o777 & ~umask)
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), (0o777 if os.path.isdir(os.path.join(tmp, name)) else 0o666) & ~umask)
        if os.path.exists(out_dir):
            os.rename(out_dir, out_dir + ".old")
            os.rename(tmp, out_dir)
            shutil.rmtree(out_dir + ".old")
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# -----------------------------------------------------------------------------
# 4. The tiny preset (SPEC §8)
#
# A Qwen2-architecture model of a few million parameters and a BPE tokenizer trained here, on the
# text the model will actually read and write: prompts of all three envs in both modes, their
# states in both renderings, and responses in the world-model format. Nothing is downloaded.
#
# Tokenisation is chosen for what the model must learn, a world model of grids:
#  - every line of a Sokoban or FrozenLake grid is one token (a pre-tokenizer isolates grid lines,
#    and the corpus holds the lines of 2,000 random episodes, so BPE learns nearly every line the
#    envs draw): a state is a few tokens that each say what they hold, so a model copies it by
#    matching content, where with one token per cell every `____` looks alike and it must count
#    positions. Partial merges are worse than either: merging runs of wall (per-cell otherwise)
#    made rows differ in length and next-state accuracy fell. Per cell vs per line: README;
#  - every coordinate "(r,c)", every move and every Sudoku move "r,c,v" is one token (and no
#    sequence of moves merges into one), the same token wherever it stands: a move takes no
#    leading space, so "try Right" in the thoughts and "<answer>Right" are the same "Right" and
#    the answer is a plain copy of the plan (with " Right" and "Right" as two tokens the tiny
#    model wrote its plan's first move as the answer in none of 200 held-out turns);
#  - the format tags are single tokens;
#  - everything else is ordinary byte-level BPE over the real prompts, so the fixed instruction
#    and format sentences, repeated in every prompt, collapse into a handful of tokens.
#
# The model is Qwen2 with two departures from Qwen2.5's own small models, both for learning from
# scratch on these texts (README):
#  - untied input and output embeddings. The random behaviour policy's planned moves are uniformly
#    random, and a softmax trained on uniform targets pulls the four moves' output vectors
#    together; tied, the input vectors went with them, the model could no longer tell its own
#    plan's moves apart, and copying the plan into the trace and the answer stayed at chance;
#  - grid-line tokens whose embeddings start as the sum of their cells' (compose_grid_line_embeddings).

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# ChatML, as Qwen's own template renders it for messages without tools.
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
                 "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
_GRID_SYMBOLS = "#_OXPSG√"
GRID_LINE = f"[{_GRID_SYMBOLS}]+"  # a line of a Sokoban or FrozenLake grid
_PRETOKEN_PATTERN = (
    rf"^{GRID_LINE}$"  # a whole line of a Sokoban/FrozenLake grid
    r"|(?:^|(?<=[1-4.]) )[1-4.](?=(?: [1-4.])*$)"  # a cell of a Sudoku line, with its leading space
    r"|\(\d+,\d+\)"  # a coordinate
    r"|\d,\d,\d"  # a Sudoku move
    r"|\b(?:Up|Down|Left|Right)\b")  # a move, so that no sequence of moves merges into one token
TINY_VOCAB_SIZE = 2048  # an upper bound: BPE runs out of merges on this corpus at about 1.9k tokens
TINY_MODEL = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6,
                  num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10_000.0,
                  rms_norm_eps=1e-6, tie_word_embeddings=False)
TINY_MAX_RESPONSE_TOKENS = 128


def tokenizer_corpus(seed=0, episodes_per_env=300, grid_episodes=1000):
    """Text the tiny tokenizer learns from: random play in every env, mode and rendering, as full
    ChatML transcripts whose world-model responses carry the true states (as after self-play SFT's
    rewriting); and the grid lines of every state of grid_episodes more random Sokoban and
    FrozenLake episodes, so that nearly every line those envs draw becomes one token."""
    rng = random.Random(seed)
    texts = []
    for env_name in ("sokoban", "frozenlake"):
        lines = []
        for _ in range(grid_episodes):
            env = envs.make(env_name)
            env.reset(rng.randrange(1_000_000))
            lines += env.render("grid").split("\n")
            while not env.done:
                env.step(rng.choice(env.ACTIONS))
                lines += env.render("grid").split("\n")
        texts.append("\n".join(lines))
    for env_name in envs.ENVS:
        for i in range(episodes_per_env):
            mode, render = MODES[i % 2], ("coords" if i % 4 < 2 else "grid")
            instruction = INSTRUCTIONS["short" if i % 3 else "full"][env_name]
            env = envs.make(env_name, render_mode=render)
            env.reset(rng.randrange(1_000_000))
            parts = [f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"]
            reward = None
            for turn in range(1, MAX_TURNS + 1):
                budget = rng.choice((TINY_MAX_RESPONSE_TOKENS, MAX_RESPONSE_TOKENS))
                parts.append(user_message(turn, env.render(), env.actions_left, mode, budget,
                                          instruction if turn == 1 else None, reward))
                response = random_response(env, rng, mode)
                observation, reward = env.render("coords"), 0.0
                for action in parse_actions(response):
                    if not env.done:
                        reward += env.step(action)[1]
                if mode == "worldmodel":
                    response = replace_states(response, observation, env.render("grid"))
                parts.append(f"<|im_end|>\n<|im_start|>assistant\n{THINK_START}{response}<|im_end|>\n")
                if env.done:
                    break
                parts.append("<|im_start|>user\n")
            texts.append("".join(parts))
    return texts


def train_tiny_tokenizer(vocab_size=TINY_VOCAB_SIZE, seed=0):
    """A byte-level BPE tokenizer trained on tokenizer_corpus(), as a transformers tokenizer."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_PRETOKEN_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAGS])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2,
                                  show_progress=False)
    tok.train_from_iterator(tokenizer_corpus(seed), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False)


def build_tiny_model(out_dir, seed=0, model_config=None):
    """Train the tiny tokenizer, initialise a tiny Qwen2 model (grid lines composed from their
    cells), save both as a Hugging Face folder."""
    from transformers import AutoModelForCausalLM, Qwen2Config
    tokenizer = train_tiny_tokenizer(seed=seed)
    config = Qwen2Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                         attn_implementation="sdpa", **(model_config or TINY_MODEL))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    compose_grid_line_embeddings(model, tokenizer, seed=seed)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return save_checkpoint(model, tokenizer, out_dir,
                           run_config={"preset": "tiny", "seed": seed, "model": model_config or TINY_MODEL})


def compose_grid_line_embeddings(model, tokenizer, seed=0):
    """Start each grid-line token's input and output embedding as the sum of one random vector per
    (column, symbol) of its line, instead of a vector of its own.

    Predicting a next state means redrawing a line with one cell changed -- `#OX_P#` becomes
    `#OXP_#` -- and with unrelated vectors for the ~600 lines that is a lookup the model must learn
    line by line. Built from their cells, a line's embedding differs from its successor's by the
    vectors of the cells that changed, the same difference in every line where that change
    happens: the model learns moves, not lines (README, Stage 1 results). Every other token keeps
    its ordinary random initialisation; training then changes them all."""
    lines = {i: text for i in range(len(tokenizer))
             if re.fullmatch(GRID_LINE, text := tokenizer.decode([i]))}
    if not lines:
        return
    width, hidden = max(map(len, lines.values())), model.config.hidden_size
    generator = torch.Generator().manual_seed(seed)
    cells = torch.randn(width, len(_GRID_SYMBOLS), hidden, generator=generator) * model.config.initializer_range
    ids = list(lines)
    composed = torch.stack([sum(cells[c, _GRID_SYMBOLS.index(s)] for c, s in enumerate(text)) / len(text) ** 0.5
                            for text in lines.values()])  # the same norm as a single random vector
    with torch.no_grad():
        for embedding in {model.get_input_embeddings().weight, model.get_output_embeddings().weight}:
            embedding[ids] = composed


def ensure_tiny_model(out_dir, seed=0):
    """The fresh tiny model's folder, built on first use (a few seconds) and reused after."""
    if not os.path.exists(os.path.join(out_dir, "config.json")):
        build_tiny_model(out_dir, seed=seed)
    return out_dir


# -----------------------------------------------------------------------------
# 5. The sampler
#
# Generation is a loop over the model's forward pass. A naive loop re-runs the whole sequence
# for every new token; instead, each attention layer keeps the keys and values of all tokens it
# has seen (the KV cache), so a step only computes the new token's query, key and value and
# attends over the cache. The prompt goes through in one forward pass (the "prefill"), then one
# token per row per step (the "decode").
#
# Batching prompts of different lengths: prompts are LEFT-padded, so every row's next token is in
# the same column of the cache. Two things keep pads from leaking into real tokens:
#  - the attention mask: True for the cache columns a row may attend to (its real tokens), False
#    for its pads. The prefill passes a 2-D (B, T) mask, from which the model builds the causal
#    4-D one itself; the decode keeps its own (B, 1, 1, C) mask over the whole cache and marks
#    each new column as it is written.
#  - position_ids: a row's first real token has position 0, whatever its padding, so rotary
#    embeddings see the same positions as for an unpadded prompt: cumsum(mask) - 1 at prefill,
#    then each row's last position + 1 per step. (transformers 5.x derives nothing from
#    cache_position any more, so positions are always passed explicitly.)
#
# A decode step changes no shape and reads nothing from the host: the token it feeds, each row's
# position, the mask and the cache column it writes live in device tensors that the step updates
# in place. On a GPU it is then recorded once as a CUDA graph and replayed, one launch for the
# whole forward pass instead of hundreds of small kernels launched from Python -- at paper scale
# that launch overhead, not the GPU, would set the pace (SPEC §10). On CPU it runs as it is,
# reading only the cache columns filled so far.
#
# Rows stop independently (on <|im_end|> / EOS or their token budget). A finished row is dropped
# from the batch -- its cache rows included -- once a quarter of the batch has finished (half,
# with graphs: the smaller batch is recorded again), so that finished rows stop costing compute
# without copying the cache after every single stop.

class _PreallocatedLayer(CacheLayerMixin):
    """One attention layer's keys and values, in buffers sized for the whole generation.

    transformers' DynamicCache concatenates every step (copying the whole cache each time: quadratic
    in the length); here a step writes its one new column in place. The model's forward calls
    update(). Prefill appends at `length`; decode (with a `cursor`: the column to write, as a
    device tensor, and how many columns attention reads) writes where the cursor says.
    """
    is_sliding, supports_early_init = False, False

    def __init__(self, capacity, cursor=None):
        super().__init__()
        self.capacity, self.length, self.cursor = capacity, 0, cursor

    def lazy_initialization(self, key_states, value_states):
        b, h, _, d = key_states.shape
        self.device = key_states.device
        self.key_buffer = key_states.new_zeros(b, h, self.capacity, d)  # zeros: pad columns are masked, but never NaN
        self.value_buffer = value_states.new_zeros(b, h, self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):  # (B, H_kv, n, D) each
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.cursor is not None:  # decode: one column, at a position held on the device
            self.key_buffer.index_copy_(2, self.cursor.write_at, key_states)
            self.value_buffer.index_copy_(2, self.cursor.write_at, value_states)
            return self.key_buffer[:, :, :self.cursor.visible], self.value_buffer[:, :, :self.cursor.visible]
        n = key_states.shape[-2]
        if self.length + n > self.capacity:
            raise RuntimeError(f"KV cache overflow: {self.length} + {n} > {self.capacity}")
        self.key_buffer[:, :, self.length:self.length + n] = key_states
        self.value_buffer[:, :, self.length:self.length + n] = value_states
        self.length += n
        self.keys = self.key_buffer[:, :, :self.length]
        self.values = self.value_buffer[:, :, :self.length]
        return self.keys, self.values

    def write_rows(self, rows, keys, values, width, batch_size):
        """Prefill of a group of rows: their (c, H_kv, w, D) keys/values go into the last w of the
        first `width` columns (right-aligned, as the batch is left-padded)."""
        if not self.is_initialized:
            self.lazy_initialization(keys.new_empty(batch_size, *keys.shape[1:]),
                                     values.new_empty(batch_size, *values.shape[1:]))
        index = torch.tensor(rows, device=keys.device)
        self.key_buffer[index, :, width - keys.shape[-2]:width] = keys
        self.value_buffer[index, :, width - values.shape[-2]:width] = values
        self.length = width

    def get_seq_length(self):
        return self.length

    def get_mask_sizes(self, query_length):  # (kv_length, kv_offset) for the mask builder (prefill)
        return self.length + query_length, 0

    def get_max_length(self):
        return self.capacity

    get_max_cache_shape = get_max_length  # its name before transformers 5.13

    def batch_select_indices(self, indices):  # keep only these rows
        if self.is_initialized:
            self.key_buffer = self.key_buffer[indices]
            self.value_buffer = self.value_buffer[indices]


def _make_cache(model, capacity, cursor=None):
    n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    return Cache(layers=[_PreallocatedLayer(capacity, cursor) for _ in range(n_layers)])


def _cache_kwarg(model):
    """transformers renamed forward's `past_key_values` to `cache` during 5.x; use what it takes."""
    import inspect
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def stop_token_ids(tokenizer):
    """The tokens that end a response: <|im_end|>, the tokenizer's EOS, and <|endoftext|> (Qwen2.5's
    generation config stops on it too, though its tokenizer's EOS is <|im_end|>)."""
    ids = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")} | {tokenizer.eos_token_id}
    return sorted(i for i in ids if isinstance(i, int) and i >= 0 and i != tokenizer.unk_token_id)


# The lowest sampling temperature taken (0 is greedy): far below any that samples usefully (the
# paper samples at 1), far above where logits / temperature overflows float32 (1e-40 does).
MIN_TEMPERATURE = 1e-3


def _pick_tokens(logits, temperature, top_p, top_k, generator):
    """Next token per row from (b, V) fp32 logits; greedy when temperature == 0."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (b, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (b, V)
        sorted_probs = sorted_logits.softmax(-1)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # keep the smallest set reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


PREFILL_TOKENS = 16384  # padded prompt tokens per prefill forward pass


def left_pad(prompts, pad_id):
    """(ids, mask), both (len(prompts), longest): prompts right-aligned, pads on the left."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


def micro_batches(batch, lengths, max_tokens):
    """Split a batch of sequence indices into pieces of at most max_tokens padded tokens (one
    sequence longer than that is a piece of its own), shortest sequences first so that each
    piece holds sequences of similar length: a short sequence is not padded to the longest one of
    the whole batch. The sampler's prefill and both training loops cut their batches with it."""
    pieces, piece = [], []
    for i in sorted(batch, key=lambda i: lengths[i]):
        if piece and (len(piece) + 1) * lengths[i] > max_tokens:
            pieces.append(piece)
            piece = []
        piece.append(i)
    return pieces + ([piece] if piece else [])


GRAPH_CAPTURE_FAILURES = set()  # why CUDA graph capture failed in this process: after one, sample stops trying
_CAPTURE_STREAMS = {}  # device -> the side stream graphs are recorded on (each stream holds a cuBLAS workspace)


def capture_graph(warm_up, step, device):
    """Run warm_up() (the current decode step, eagerly) on a side stream, then record step() there
    as a CUDA graph; returns its replay -- the recorded kernels, run again on the same tensors --
    or None when step() cannot be recorded (the caller then decodes eagerly). Recording does not
    run the step. The warm-up is what CUDA graphs need first: lazy library set-up (cuBLAS
    workspaces, say) cannot be recorded."""
    if device not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[device] = torch.cuda.Stream(device)
    stream = _CAPTURE_STREAMS[device]
    stream.wait_stream(torch.cuda.current_stream(device))
    graph, first_error = torch.cuda.CUDAGraph(), None
    with torch.cuda.stream(stream):
        warm_up()
        try:
            with torch.cuda.graph(graph, stream=stream):
                try:
                    step()
                except Exception as e:  # kept: ending a broken capture raises an error of its own
                    first_error = e
                    raise
        except Exception as e:  # an operation that cannot be recorded (a host sync, say)
            graph, error = None, first_error or e
            reason = f"{type(error).__name__}: {(str(error).strip() or '-').splitlines()[0]}"
            if reason not in GRAPH_CAPTURE_FAILURES:
                GRAPH_CAPTURE_FAILURES.add(reason)
                warnings.warn(f"agent.sample: CUDA graph capture failed, decoding eagerly from now on ({reason})",
                              RuntimeWarning)
    torch.cuda.current_stream(device).wait_stream(stream)
    return graph.replay if graph is not None else None


@torch.no_grad()
def sample(model, prompts, max_new_tokens, stop_ids, pad_id, temperature=1.0, top_p=1.0, top_k=0,
           generator=None, on_forward=None, cuda_graph=None):
    """Generate a continuation of every prompt in one batch.

    prompts: list of token-id lists (any lengths). max_new_tokens: an int or one per prompt.
    stop_ids: a row ends after emitting one of these (the stop token is kept in its output).
    temperature 0 = greedy; top_k 0 / top_p 1.0 = off. generator: a torch.Generator on the
    model's device, for reproducible sampling.
    Returns (tokens, logprobs): per prompt, the new token ids and, for each, its log-probability
    under the distribution it was drawn from before top-k/top-p: softmax(logits / temperature)
    (temperature 1 when greedy). PPO recomputes these with its training forward pass; the
    sampler's are a check on that (rl.py's actor/sampler_logprob_gap).
    on_forward: optional callback(seconds) per forward pass (used by benchmarks).
    cuda_graph: replay the decode step as a CUDA graph (default: on a CUDA device, until a
    recording has failed in this process; False: never; True: try even so).
    The model must use SDPA attention (load_model's): the decode passes it a boolean 4-D mask.
    """
    device = next(model.parameters()).device
    n = len(prompts)
    budgets = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if n == 0:
        return [], []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if len(budgets) != n or min(budgets) < 1:
        raise ValueError("max_new_tokens must be >= 1: one value, or one per prompt")
    if not (temperature == 0 or temperature >= MIN_TEMPERATURE) or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"need temperature 0 (greedy) or >= {MIN_TEMPERATURE}, 0 < top_p <= 1 and top_k >= 0; "
                         f"got temperature {temperature}, top_p {top_p}, top_k {top_k}")
    if getattr(model.config, "_attn_implementation", "sdpa") != "sdpa":
        raise ValueError(f"agent.sample needs a model with SDPA attention, not "
                         f"{model.config._attn_implementation!r} (load it with agent.load_model)")
    cache_kwarg = _cache_kwarg(model)
    use_graph = device.type == "cuda" and not GRAPH_CAPTURE_FAILURES if cuda_graph is None else cuda_graph

    def forward(ids, mask, positions, cache):
        return model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                     logits_to_keep=1, **{cache_kwarg: cache}).logits[:, -1].float()  # (b, V)

    def run(forward_pass):  # forward_pass(), its time reported to on_forward if there is one
        start = time.perf_counter() if on_forward else None
        forward_pass()
        if on_forward:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            on_forward(time.perf_counter() - start)

    # Prefill, in groups of similar length; each group's keys and values are copied into the
    # batch's cache, right-aligned like the batch's left padding. The capacity is rounded up to
    # a multiple of 16 columns: the alignment GPU attention kernels want of a mask's rows.
    width = max(len(p) for p in prompts)
    capacity = -(-(width + max(budgets)) // 16) * 16
    cursor = types.SimpleNamespace(write_at=torch.tensor([width], device=device), visible=width)
    cache = _make_cache(model, capacity, cursor)
    logits = torch.empty(n, model.config.get_text_config(decoder=True).vocab_size, device=device)  # (B, V)
    for chunk in micro_batches(range(len(prompts)), [len(p) for p in prompts], PREFILL_TOKENS):
        ids, mask = left_pad([prompts[i] for i in chunk], pad_id)  # (c, w)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (c, w): 0 at each row's first real token
        chunk_cache = _make_cache(model, ids.shape[1])

        def prefill():
            logits[chunk] = forward(ids.to(device), mask.to(device), positions.to(device), chunk_cache)
        run(prefill)
        for layer, chunk_layer in zip(cache.layers, chunk_cache.layers):
            layer.write_rows(chunk, chunk_layer.keys, chunk_layer.values, width, n)

    # The decode step's tensors: the token fed, each row's position, the mask over the whole
    # cache (the prompts' real tokens now, each new column as it is written) and the output
    attend = torch.zeros(n, 1, 1, capacity, dtype=torch.bool, device=device)  # (B, 1, 1, C)
    attend[:, 0, 0, :width] = left_pad(prompts, pad_id)[1].bool().to(device)
    token = torch.zeros(n, 1, dtype=torch.long, device=device)
    position = torch.tensor([[len(p)] for p in prompts], device=device)  # (B, 1): the next token's position
    step_logits = torch.empty_like(logits)

    def step():  # the token in `token` at cursor.write_at; its next-token logits to step_logits
        attend.index_fill_(-1, cursor.write_at, True)
        # attention over the cache, masked: on a GPU the memory-efficient kernel (flash takes no mask)
        step_logits.copy_(forward(token, attend[..., :cursor.visible], position, cache))
        cursor.write_at.add_(1)
        position.add_(1)

    # Decode: one token per live row per step.
    rows = list(range(n))  # batch row -> prompt index
    live = torch.ones(n, dtype=torch.bool)  # per batch row: still generating
    budget_left = torch.tensor(budgets)
    stop = torch.tensor(stop_ids, dtype=torch.long, device=device)
    out_tokens, out_logprobs = [[] for _ in range(n)], [[] for _ in range(n)]
    replay = None  # the step recorded as a CUDA graph, for the batch's current rows
    for t in range(max(budgets)):
        picked = _pick_tokens(logits, temperature, top_p, top_k, generator)  # (b,)
        tempered = logits / temperature if temperature > 0 else logits
        logprob = torch.log_softmax(tempered, -1).gather(-1, picked[:, None]).squeeze(-1)  # (b,)
        ended = torch.isin(picked, stop)
        # one read back to the host a step (token ids are exact in float64)
        token_list, logprob_list, ended_list = torch.stack([picked.double(), logprob.double(), ended.double()]).tolist()
        token_list, ended_list = [int(t) for t in token_list], [e > 0 for e in ended_list]
        for b, (prompt_index, row_live) in enumerate(zip(rows, live.tolist())):
            if row_live:
                out_tokens[prompt_index].append(token_list[b])
                out_logprobs[prompt_index].append(logprob_list[b])
        budget_left -= 1
        live &= ~torch.tensor(ended_list) & (budget_left > 0)
        if not live.any():
            break
        # drop finished rows from the batch and the cache, once a quarter of it has finished (with
        # graphs, half: each drop costs a new recording)
        if (~live).sum() * (2 if use_graph else 4) >= len(rows):
            keep = live.nonzero().squeeze(-1)
            keep_device = keep.to(device)
            cache.batch_select_indices(keep_device)
            picked, attend, token = picked[keep_device], attend[keep_device], token[keep_device]
            position, step_logits = position[keep_device], step_logits[keep_device]
            rows = [rows[i] for i in keep.tolist()]
            live, budget_left = live[keep], budget_left[keep]
            replay = None  # recorded on the old tensors
        token.copy_(picked[:, None])
        if replay is not None:
            run(replay)
        elif use_graph:  # this step eagerly (the warm-up), then record the step for the next ones
            cursor.visible = capacity  # a graph has fixed shapes: it reads the whole cache, masked
            replay = capture_graph(lambda: run(step), step, device)
            use_graph = replay is not None
        else:
            cursor.visible = width + t + 1  # the columns filled so far, this step's included
            run(step)
        logits = step_logits
    return out_tokens, out_logprobs


# -----------------------------------------------------------------------------
# 6. The multi-turn rollout (SPEC §3)
#
# Episodes are organised in groups: len(seeds) distinct puzzles, each played group_size times.
# Every turn, the prompts of all live episodes are generated in one batch. An episode's token
# sequence is built incrementally -- the prompt tokens, then exactly the tokens the policy
# generated, then the next user message's tokens -- so what PPO later scores is exactly what the
# model saw and produced (re-tokenising decoded text would not always give the same ids).

@dataclass
class Episode:
    env_name: str
    seed: int
    group: int  # index of the puzzle in this rollout
    sample: int  # index of the episode within its group
    env: object = field(repr=False)
    env_overrides: dict = field(default_factory=dict)  # as passed to rollout (the render mode is not among them)
    messages: list = field(default_factory=list)  # the chat as text (system, user, assistant, ...)
    tokens: list = field(default_factory=list)  # the whole conversation, one sequence
    assistant_mask: list = field(default_factory=list)  # 1 where the policy generated the token
    logprobs: list = field(default_factory=list)  # the sampler's log-prob per token (0.0 on prompt tokens)
    turn_ends: list = field(default_factory=list)  # index in tokens of each turn's last generated token
    turn_rewards: list = field(default_factory=list)  # env reward + format penalty, per turn
    turns: list = field(default_factory=list)  # per-turn record: states, response, actions, rewards
    score: float = 0.0  # sum of turn_rewards
    success: bool = False
    done: bool = False
    end_reason: str = ""  # "env" (success, hole, action budget), "turns", "context"


def _template_pieces(tokenizer):
    """The text the chat template puts around messages, found by rendering placeholders:
    (opening of the first prompt before the user content, the text after an assistant message's
    content up to the next user content, the text after user content up to the generation). A
    template that breaks what incremental prompts rely on is a ValueError: contents rendered
    verbatim, user turns rendered alike, an assistant message ended by a special token."""
    cache = getattr(tokenizer, "_spa_template_pieces", None)  # (the template they came from, pieces)
    if cache is not None and cache[0] == tokenizer.chat_template:
        return cache[1]
    user, reply, user2 = "\x00U1\x00", "\x00A1\x00", "\x00U2\x00"
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user},
         {"role": "assistant", "content": reply}, {"role": "user", "content": user2}],
        tokenize=False, add_generation_prompt=True)
    if any(text.count(s) != 1 for s in (user, reply, user2)):
        raise ValueError("the tokenizer's chat template does not render message contents verbatim; "
                         "SPA's incremental prompts need a ChatML-like template")
    head, rest = text.split(user)
    after_user, rest = rest.split(reply)
    after_reply, after_user2 = rest.split(user2)
    if after_user != after_user2:
        raise ValueError("the chat template renders user turns inconsistently; cannot build prompts incrementally")
    if not any(after_reply.startswith(token) for token in tokenizer.get_added_vocab()):
        raise ValueError("the chat template must end an assistant message with a special token (ChatML's "
                         "<|im_end|>): after plain text a response's last token could merge with it, and the "
                         "tokens SFT trains on would not be those the rollout samples (see encode_chat)")
    pieces = (head, after_reply, after_user + THINK_START)
    tokenizer._spa_template_pieces = (tokenizer.chat_template, pieces)
    return pieces


def _encode(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def encode_chat(tokenizer, text):
    """(token ids, (start, end) characters of each) of a rendered conversation (prompt_text, with
    responses), tokenised as rollout() builds it: every assistant response apart from the prompt
    before it, which ends in <think>. Tokenised in one piece, a BPE vocabulary like Qwen2's merges
    the prompt's last '>' with the response's first '<' into '><', a token the sampler never
    writes after that prompt -- training on it would teach a start the model never makes (and so
    does '>' with a response's first newline or punctuation). The other end of a response needs no
    cut: the template closes it with a special token (<|im_end|>; _template_pieces refuses a template
    that does not), which no BPE merge crosses. A
    response that itself held the text the template puts before a response would be cut there
    too; a sampled one cannot (it stops at <|im_end|>)."""
    _, _, response_starts = _template_pieces(tokenizer)  # "...assistant\n<think>": a response follows
    cuts, at = [0], text.find(response_starts)
    while at != -1:
        cuts.append(at + len(response_starts))
        at = text.find(response_starts, cuts[-1])
    ids, offsets = [], []
    for lo, hi in zip(cuts, cuts[1:] + [len(text)]):
        piece = tokenizer(text[lo:hi], add_special_tokens=False, return_offsets_mapping=True)
        ids += piece["input_ids"]
        offsets += [(lo + start, lo + end) for start, end in piece["offset_mapping"]]
    return ids, offsets


def rollout(policy, tokenizer, env_name, seeds, group_size, *, mode="worldmodel", render="coords",
            instruction="full", max_turns=MAX_TURNS, max_actions_per_turn=MAX_ACTIONS_PER_TURN,
            max_response_tokens=MAX_RESPONSE_TOKENS, max_context_tokens=MAX_CONTEXT_TOKENS,
            format_penalty=FORMAT_PENALTY, env_overrides=None):
    """Play len(seeds) x group_size episodes and return them (group-major order).

    policy(prompts, episodes, budgets) -> list of (token_ids, logprobs or None): one response per
    live episode, generated from its prompt token ids with at most budgets[i] tokens; responses
    that stopped end with the stop token. See model_policy and text_policy.
    A turn is played only if a full max_response_tokens response fits in max_context_tokens;
    otherwise the episode ends there (end_reason "context").
    """
    if env_name not in envs.ENVS:
        raise ValueError(f"unknown env {env_name!r}: choose one of {', '.join(envs.ENVS)}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")
    if instruction not in INSTRUCTIONS:
        raise ValueError(f"unknown instruction {instruction!r}: choose one of {', '.join(INSTRUCTIONS)}")
    head, after_reply, after_user = _template_pieces(tokenizer)
    stop_ids = set(stop_token_ids(tokenizer))
    im_end_text = "<|im_end|>"
    im_end_id = tokenizer.convert_tokens_to_ids(im_end_text)

    episodes = []
    for group, seed in enumerate(seeds):
        for sample in range(group_size):
            env = envs.make(env_name, **{**(env_overrides or {}), "render_mode": render})
            env.reset(seed)
            first = user_message(1, env.render(), env.actions_left, mode, max_response_tokens,
                                 env_instruction(instruction, env_name, env))
            ep = Episode(env_name=env_name, seed=seed, group=group, sample=sample, env=env,
                         env_overrides=dict(env_overrides or {}),
                         messages=[{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": first}])
            ep.tokens = _encode(tokenizer, head + first + after_user)
            ep.assistant_mask = [0] * len(ep.tokens)
            ep.logprobs = [0.0] * len(ep.tokens)
            episodes.append(ep)

    for turn in range(1, max_turns + 1):
        live = []
        for ep in episodes:
            if ep.done:
                continue
            if len(ep.tokens) + max_response_tokens > max_context_tokens:  # only the first prompt can
                ep.done, ep.end_reason = True, "context"  # get here: later turns are checked below
                continue
            live.append(ep)
        if not live:
            break
        responses = policy([ep.tokens for ep in live], live, [max_response_tokens] * len(live))
        for ep, (new_tokens, new_logprobs) in zip(live, responses):
            stopped = bool(new_tokens) and new_tokens[-1] in stop_ids
            content = tokenizer.decode(new_tokens[:-1] if stopped else new_tokens, skip_special_tokens=False)
            response = THINK_START + content
            ep.tokens += new_tokens
            ep.assistant_mask += [1] * len(new_tokens)
            ep.logprobs += list(new_logprobs) if new_logprobs is not None else [0.0] * len(new_tokens)
            ep.turn_ends.append(len(ep.tokens) - 1)
            ep.messages.append({"role": "assistant", "content": response})
            _play_turn(ep, turn, response, mode, max_actions_per_turn, format_penalty, stopped)
            if not ep.done and turn == max_turns:
                ep.done, ep.end_reason = True, "turns"
            if ep.done:
                continue
            # the next user message: this turn's reward from the env (the format penalty is a
            # training signal, not something the env said), then the next turn
            last = ep.turns[-1]
            message = user_message(turn + 1, ep.env.render(), ep.env.actions_left, mode, max_response_tokens,
                                   reward=last["env_reward"])
            # after a response that stopped on "<|im_end|>" the template's "<|im_end|>" is already
            # in the tokens (one that stopped on another end token, e.g. "<|endoftext|>", keeps it)
            closed = stopped and new_tokens[-1] == im_end_id and after_reply.startswith(im_end_text)
            joiner = after_reply[len(im_end_text):] if closed else after_reply
            increment = _encode(tokenizer, joiner + message + after_user)
            # a turn is played only if a full response fits: the conversation never exceeds
            # max_context_tokens, and no response is cut short by a limit its prompt did not state
            if len(ep.tokens) + len(increment) + max_response_tokens > max_context_tokens:
                ep.done, ep.end_reason = True, "context"
                continue
            ep.messages.append({"role": "user", "content": message})
            ep.tokens += increment
            ep.assistant_mask += [0] * len(increment)
            ep.logprobs += [0.0] * len(increment)
    return episodes


def _play_turn(ep, turn, response, mode, max_actions_per_turn, format_penalty, stopped):
    """Parse one response, run its actions in the env and record the turn."""
    env = ep.env
    parsed = parse_response(response, mode, max_actions_per_turn)
    record = {"turn": turn, "state_before": env.render("grid"), "coords_before": env.render("coords"),
              "actions_left_before": env.actions_left, "response": response, "stopped": stopped,
              "format_valid": parsed["format_valid"], "observation": parsed["observation"],
              "prediction": parsed["prediction"], "actions": parsed["actions"], "executed": [],
              "invalid_actions": [], "env_reward": 0.0, "pieces": [env.pieces()]}
    for action in parsed["actions"]:
        if env.done:  # the episode ended mid-turn (success, a hole, or the action budget): the
            break      # actions left go unjudged (no env can say whether they were valid), unpenalised
        _, reward, _, info = env.step(action)
        record["env_reward"] += reward
        (record["executed"] if info["action_is_valid"] else record["invalid_actions"]).append(action)
        if info["action_is_valid"]:
            record["pieces"].append(env.pieces())  # where the pieces are after each executed action
        if info["success"]:
            ep.success = True
    penalty = format_penalty if (not parsed["format_valid"] or record["invalid_actions"]) else 0.0
    record.update(penalty=penalty, reward=record["env_reward"] + penalty, state_after=env.render("grid"),
                  coords_after=env.render("coords"), done=env.done)
    ep.turns.append(record)
    ep.turn_rewards.append(record["reward"])
    ep.score += record["reward"]
    if env.done:
        ep.done, ep.end_reason = True, "env"


# How many actions the random behaviour policy plans per turn: one more with this probability, up
# to the cap (1: 60%, 2: 24%, 3: 9.6%, 4: 3.8%, 5: 2.6%). Short plans are what a world model predicts
# best -- next-state accuracy after one action was several times that after three in our tiny-
# preset measurements -- and a model finetuned on them writes short plans in turn.
RANDOM_PLAN_CONTINUE = 0.4


def random_actions(env, rng, max_actions=MAX_ACTIONS_PER_TURN):
    """1..max_actions random actions the env's grammar accepts (Sudoku: a random digit in a random
    empty cell, which the rules may still reject); the count as RANDOM_PLAN_CONTINUE says."""
    n = 1
    while n < max_actions and rng.random() < RANDOM_PLAN_CONTINUE:
        n += 1
    if not isinstance(env, envs.Sudoku):
        return [rng.choice(env.ACTIONS) for _ in range(n)]
    empty = [i for i, v in enumerate(env.render("grid").split()) if v == "."] or list(range(16))
    cells = [rng.choice(empty) for _ in range(n)]
    return [f"{i // 4 + 1},{i % 4 + 1},{rng.randint(1, 4)}" for i in cells]


def replace_states(response, observation, prediction, trace=""):
    """The response with the contents of its (only) <observation> and <prediction> spans replaced
    by the given states, each on lines of its own, and `trace` (see trace_sentence), if any, added
    after a space to the end of the thoughts, just before <prediction>. This is the layout the
    world model learns to write: a grid that starts on a fresh line tokenises line by line from
    its first row."""
    spans = [_only_span(response, "<observation>", "</observation>"),
             _only_span(response, "<prediction>", "</prediction>")]
    if None in spans or spans[0][1] > spans[1][0]:
        raise ValueError("replace_states needs one <observation> span followed by one <prediction> span")
    (o_start, o_end), (p_start, p_end) = spans
    thoughts_end = p_start - len("<prediction>")
    return (response[:o_start] + f"\n{observation}\n" + response[o_end:thoughts_end] + (" " + trace if trace else "")
            + response[thoughts_end:p_start] + f"\n{prediction}\n" + response[p_end:])


def trace_sentence(actions, pieces):
    """A thought that traces a turn step by step: where the player went after each executed
    action, and where a box it pushed went -- "Right to (2,2); Down to (3,2), box to (4,2)."
    (pieces: env.pieces() before the turn and after each executed action, as the rollout records
    them; "" for an env without pieces, Sudoku). Written before the <prediction>, it breaks
    predicting a grid into steps a small model learns: one coordinate from the last one and the
    action, then the grid redrawn from the observation with the pieces moved. On slippery
    FrozenLake the coordinate is where an outcome gets chosen, so greedy decoding writes one
    whole likely outcome, not a grid with the player nowhere (README)."""
    steps = []
    for action, before, after in zip(actions, pieces, pieces[1:]):
        if "player" not in after:
            return ""
        step = f"{action} to ({after['player'][0]},{after['player'][1]})"
        for r, c in sorted(set(map(tuple, after.get("boxes", ()))) - set(map(tuple, before.get("boxes", ())))):
            step += f", box to ({r},{c})"
        steps.append(step)
    return "; ".join(steps) + "." if steps else ""


_TRACE_STEP = (rf"(?:{'|'.join(sorted(set(envs.Sokoban.ACTIONS) | set(envs.FrozenLake.ACTIONS)))})"
               r" to \(\d+,\d+\)(?:, box to \(\d+,\d+\))*")
# A trace_sentence where replace_states puts it: the end of the thoughts, just before <prediction>.
# The trace states positions (it is world model, not plan), so the PPO stages treat it as a state.
TRACE_BEFORE_PREDICTION = re.compile(rf"{_TRACE_STEP}(?:; {_TRACE_STEP})*\.(?=\s*<prediction>)")


def state_spans(text):
    """Where a response states the world: (kind, start, end) character spans of the contents of every
    complete <observation>...</observation> ("observation") and <prediction>...</prediction>
    ("prediction"), and of every position trace right before a <prediction> ("trace"). This is the
    one rule by which SFT's --loss-spans and PPO's --no-state-loss tell world-model tokens from the
    rest (see state_token_kinds)."""
    spans = []
    for kind in ("observation", "prediction"):
        open_tag, close_tag = f"<{kind}>", f"</{kind}>"
        start = text.find(open_tag)
        while start != -1:
            end = text.find(close_tag, start + len(open_tag))
            if end == -1:
                break  # unclosed: no state was stated
            spans.append((kind, start + len(open_tag), end))
            start = text.find(open_tag, end + len(close_tag))
    return spans + [("trace", *match.span()) for match in TRACE_BEFORE_PREDICTION.finditer(text)]


def state_token_kinds(offsets, spans):
    """For each token, given as its (start, end) characters, the kind of the state span it overlaps
    (see state_spans), or None. Overlap, not containment: a BPE token that straddles a tag, like
    '>(0', carries a piece of the state, so it is a state token -- for the loss masks of SFT and PPO
    alike."""
    return [next((kind for kind, s, e in spans if lo < e and s < hi), None) for lo, hi in offsets]


def plan_response(actions, mode, observation, prediction, intent):
    """A scripted response in the mode's format that plays `actions` and states them as its plan
    in the thoughts before the prediction ("{intent} Right || Down."), so that the prediction is
    a function of the state and the plan (a transition model can learn it; it cannot learn to
    guess actions it only sees afterwards). Compact: no spaces between tags (every tag is a token
    of its own, and so is every space)."""
    answer = f" {ACTION_SEPARATOR} ".join(actions)
    if mode == "base":
        return f"{intent} {answer}.</think><answer>{answer}</answer>"
    return replace_states(f"<observation></observation>{intent} {answer}.<prediction></prediction></think>"
                          f"<answer>{answer}</answer>", observation, prediction)


def random_response(env, rng, mode, max_actions=MAX_ACTIONS_PER_TURN):
    """What the random-action behaviour policy writes (SPEC §4): random actions, with the current
    state as both observation and prediction; self-play SFT replaces both with the truth before
    training on them."""
    return plan_response(random_actions(env, rng, max_actions), mode, env.render("coords"), env.render("grid"),
                         "I will try")


def random_policy(tokenizer, rng, mode, max_actions=MAX_ACTIONS_PER_TURN):
    """The random-action behaviour policy, for self-play with a model that cannot write the
    format yet, and as evaluation's chance baseline."""
    return text_policy(tokenizer, lambda ep: random_response(ep.env, rng, mode, max_actions))


def oracle_plan(env, turns_left):
    """The optimal next turn from the env's current state (at most MAX_ACTIONS_PER_TURN actions)."""
    if isinstance(env, envs.FrozenLake):
        plan = env.oracle_actions(turns_left, max_turns=MAX_TURNS,
                                  max_actions_per_turn=MAX_ACTIONS_PER_TURN)
    else:
        plan = env.solve()  # Sokoban: BFS from the current state; Sudoku: the remaining moves
    if not plan:
        raise RuntimeError(f"the oracle found no move on {type(env).__name__}: a bug in the solver or the rollout")
    return plan[:MAX_ACTIONS_PER_TURN]


def oracle_response(env, turns_left, mode):
    """What the oracle writes: its next turn, the true state as observation and the most likely
    state after the turn as prediction."""
    actions = oracle_plan(env, turns_left)
    prediction = ""
    if mode == "worldmodel":
        outcomes = envs.next_grid_distribution(env, actions)
        prediction = max(outcomes, key=outcomes.get)
    return plan_response(actions, mode, env.render("coords"), prediction, "I will play")


def oracle_policy(tokenizer, mode):
    """The optimal policy, replanned every turn, for rollouts of MAX_TURNS turns: evaluation's upper
    reference row, and a behaviour policy for self-play (worldmodel_sft.py --behaviour oracle: how
    well can a model imitate it?)."""
    return text_policy(tokenizer, lambda ep: oracle_response(ep.env, MAX_TURNS - len(ep.turns), mode))


def model_policy(model, tokenizer, temperature=1.0, top_p=1.0, top_k=0, generator=None, on_forward=None):
    """The policy that samples from a model with our KV-cache sampler."""
    stops = stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]

    def policy(prompts, episodes, budgets):
        tokens, logprobs = sample(model, prompts, budgets, stops, pad, temperature=temperature, top_p=top_p,
                                  top_k=top_k, generator=generator, on_forward=on_forward)
        return list(zip(tokens, logprobs))
    return policy


def text_policy(tokenizer, respond):
    """A scripted policy: respond(episode) -> the response text after <think> (tests, reference
    policies). The text is tokenised, closed with <|im_end|> and cut to the budget (a response cut
    short stays unclosed, as a sampled one would)."""
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def policy(prompts, episodes, budgets):
        out = []
        for ep, budget in zip(episodes, budgets):
            tokens = (_encode(tokenizer, respond(ep)) + [im_end])[:budget]
            out.append((tokens, None))
        return out
    return policy


# -----------------------------------------------------------------------------
# 7. Small pieces the stage scripts share around the method

def training_hidden_states(backbone, ids, attention):
    """The training forward pass of a transformer body (a model's base_model) over a RIGHT-padded
    batch: the last hidden states, (b, T, H), with no KV cache built.

    No attention mask goes in. With every row's pads after its real tokens, causal attention alone
    keeps each real token off the pads (they come later), and what the pads themselves compute is
    never scored, so the real tokens' states and gradients are a masked pass's: the same
    arithmetic, equal to 1e-12 in float64 (tested), and in float32 up to the kernels' rounding.
    Without a mask SDPA runs its causal kernel, which skips the blocks above the diagonal and
    builds no (b, 1, T, T) mask -- on CPU the tiny model's forward and backward take 17% less
    time at 1,000 tokens a row, 32% at 2,000 (README) -- and on CUDA it can pick the flash kernel,
    which takes no mask at all. `attention` (1 on real tokens) is only checked."""
    if bool((attention[:, 1:] > attention[:, :-1]).any()):
        raise ValueError("training_hidden_states needs right-padded rows (a pad before a real token)")
    return backbone(input_ids=ids, use_cache=False).last_hidden_state


def scored_logits(model, ids, attention, scored):
    """The training forward pass (right-padded rows, see training_hidden_states), with next-token
    logits only where a stage needs them: (n, V) fp32 for the positions t where scored[:, t]
    ((b, T-1), bool), each predicting token t+1. The prompt's logits are never computed -- with a
    152k-token vocabulary they would be most of the memory and time of a step."""
    hidden = training_hidden_states(model.base_model, ids, attention)  # (b, T, H)
    return model.get_output_embeddings()(hidden[:, :-1][scored]).float()  # (n, V)


def clip_gradients(model, max_norm):
    """Clip the gradients' total norm to max_norm; returns the norm before clipping. A NaN or
    infinite norm stops the run before the optimiser step would write it into the weights (the
    last saved state stays the last good one)."""
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
    if not math.isfinite(norm):
        raise SystemExit(f"error: the gradient norm is {norm}: training diverged, and stops before the weights take "
                         f"it. Resuming would repeat the same steps: start again in a new --out with a lower "
                         f"learning rate")
    return norm


def append_jsonl(path, *rows):
    """Append JSON lines, on disk when it returns (metrics, finished rows: a crash loses at most
    the line being written, which read_jsonl then skips)."""
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        f.flush()
        os.fsync(f.fileno())


def drop_metrics_after(path, step, epoch=None):
    """On resume (or a fresh start, step -1): forget the metric lines logged after the saved state,
    since they will be run and logged again — lines of a later step and, given the saved epoch,
    lines of the same step that carry a later epoch (SFT logs an epoch's held-out line, with
    epoch + 1, before it saves the epoch's end). Returns the lines kept."""
    def logged_after(row):
        later_epoch = epoch is not None and row.get("step", 0) == step and row.get("epoch", 0) > epoch
        return row.get("step", 0) > step or later_epoch

    if not os.path.isfile(path):
        return []  # nothing logged: nothing to write either
    rows = [row for row in read_jsonl(path) if not logged_after(row)]
    write_jsonl(path, rows)
    return rows


def read_jsonl(path):
    """The rows of a JSON-lines file that append_jsonl writes to (none if there is no file yet); the
    half line a crash can leave at its end is skipped. Any other line that is not JSON is an error."""
    if not os.path.isfile(path):
        return []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    last = lines.pop()  # what follows the last newline: nothing, a crash's half line, or a whole row
    rows = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise SystemExit(f"error: {path}: line {number} is not JSON; delete that line to keep the other "
                                 f"rows, or move the file away to start afresh") from None
    try:
        row = json.loads(last) if last.strip() else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        row = None  # a row cut off mid-write (a cut object never parses)
    if isinstance(row, dict):
        rows.append(row)  # a whole row with no newline after it
    return rows


def run_script(main, on_interrupt):
    """A stage script's entry point: main(argv), and on Ctrl-C one line saying how to continue (the
    state the run saved is on disk) instead of a traceback from wherever it was; exit status 130."""
    try:
        main(sys.argv[1:])
    except KeyboardInterrupt:
        print(f"\ninterrupted. {on_interrupt}", file=sys.stderr, flush=True)
        sys.exit(130)


def write_atomically(path, write):
    """write(f) a whole file atomically: into a temporary file beside it, on disk, then renamed into
    place, so that a crash leaves either the old file or the new one, never half of one."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:  # a failed write (disk full, Ctrl-C) leaves the old file and no half-written one
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


def write_text(path, text):
    write_atomically(path, lambda f: f.write(text.encode("utf-8")))


def save_train_state(path, state):
    """What a run needs to continue exactly (models, optimisers, RNG, step), saved atomically."""
    write_atomically(path, lambda f: torch.save(state, f))


def resume_train_state(path, keys, restore, writer):
    """Load the state that save_train_state wrote at path, check it holds `keys`, and hand it to
    restore(state), which puts it into the models and optimisers. Anything wrong -- a truncated or
    foreign file, weights of another shape -- is one clear error, never a traceback or a run that
    trains on from half a state. writer names the script, for the message. What a bad state cannot
    raise -- a NameError or AttributeError from a bug in restore -- stays a traceback: it is no reason
    to delete a good state."""
    def refuse(e):
        message = " ".join(str(e).split())  # load_state_dict's lists of mismatched shapes, on one line
        return SystemExit(f"error: cannot resume from {path} ({type(e).__name__}: {message[:300]}); "
                          f"delete it to start over")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except torch.OutOfMemoryError:
        raise  # the state is fine; the device is full
    except Exception as e:  # truncated, or not a torch file at all
        raise refuse(e) from None
    if not isinstance(state, dict) or not set(keys) <= set(state):
        raise refuse(ValueError(f"not a train state written by {writer}"))
    try:
        restore(state)
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError, KeyError, IndexError, TypeError) as e:  # another shape, another run's state
        raise refuse(e) from None
    return state


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_jsonl(path, rows):
    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def run_config(args):
    """A stage's settings as its run_config.json records them: the parsed flags, with the starting
    model resolved -- without --model, a fresh tiny model built in the run folder's base_model/."""
    return {**vars(args), "model": args.model or os.path.join(args.out, "base_model")}


def default_run_config(parse_args, args, presets):
    """The run_config a stage's parse_args gives args' env, preset and run folder with every other
    flag left at its default, less the flags a preset fills in: what settings_changed takes a flag
    to have been in a run that began before the flag existed. A preset's value is left out because
    presets are where new features get switched on (the tiny preset's --thought-trace came on with
    the flag), so a run older than the flag did not run at it. A new flag must parse with only
    --env, --preset and --out given."""
    config = run_config(parse_args(["--env", args.env, "--preset", args.preset, "--out", args.out]))
    return {key: value for key, value in config.items() if key not in presets[args.preset]}


def settings_changed(run_dir, config, may_change=(), defaults=None):
    """How the settings in config differ from those of the run already in run_dir (its
    run_config.json), as one line; None when they agree. Keys in may_change are allowed to differ.
    A stage checks this before it resumes: continuing a run's state (or reusing its data) under
    other flags would mix two runs and report them as one -- so a run without its run_config.json
    cannot be checked, and that is said too. A key its run_config.json lacks (a flag added to the
    code since that run began: a fork's new switch) is taken to have had its value in defaults
    (default_run_config), the code's behaviour before the flag, by the usual convention.

    The run folder may have been moved or copied since, alone or with its siblings (a benchmark's
    folder, whose stages point into each other): a path recorded inside the old folder, or inside
    its old parent, agrees with the same path inside the new one. A path outside them must be
    the same path."""
    before, problem = _recorded_settings(run_dir)
    if problem:
        return problem
    if foreign := _another_scripts_settings(before, config, may_change):
        return foreign
    moves = []  # (old folder, new folder): the run's own, then its parent
    if isinstance(before.get("out"), str):
        old, new = os.path.normpath(before["out"]), os.path.normpath(run_dir)
        moves = [(old, new), (os.path.dirname(old), os.path.dirname(new))]

    def inside(value, folder):  # value relative to folder, or None when it is not inside it
        relative = os.path.relpath(value, folder or os.curdir)
        return None if relative == os.pardir or relative.startswith(os.pardir + os.sep) else relative

    def agree(then, now):
        if then == now:
            return True
        return isinstance(then, str) and isinstance(now, str) and bool(then and now) and any(
            (where := inside(then, old)) is not None and where == inside(now, new) for old, new in moves)
    now = json.loads(json.dumps(config))  # as it would be saved: tuples become lists
    assumed = {key: value for key, value in json.loads(json.dumps(defaults or {})).items()
               if key in now and key not in before}
    recorded = {**assumed, **before}
    shown = {key: f"not recorded (taken as {value!r})" for key, value in assumed.items()}
    changed = [f"{key}: {shown.get(key, repr(recorded.get(key)))} there, {now.get(key)!r} now"
               for key in sorted(set(recorded) | set(now))
               if key not in may_change and not agree(recorded.get(key), now.get(key))]
    return "; ".join(changed) or None


def _recorded_settings(run_dir):
    """(settings, None) from run_dir's run_config.json, or (None, why there are none)."""
    path = os.path.join(run_dir, "run_config.json")
    if not os.path.isfile(path):
        return None, "no run_config.json there records its settings"
    try:
        with open(path) as f:
            before = json.load(f)
    except (OSError, ValueError) as e:
        return None, f"its run_config.json is unreadable ({type(e).__name__}: {e})"
    if not isinstance(before, dict):
        return None, f"its run_config.json holds no settings (a JSON {type(before).__name__}, not an object)"
    return before, None


def _another_scripts_settings(before, config, may_change):
    """What says that recorded settings (a run_config.json) are another script's: most of them are
    not flags of the script whose settings are config. None when they may be its own."""
    foreign = sorted(set(before) - set(config) - set(may_change))
    if 2 * len(foreign) > len(before):
        return (f"another script's run: {len(foreign)} of the {len(before)} settings in its run_config.json are "
                f"not this script's ({', '.join(foreign[:3])}, ...)")
    return None


def another_scripts_run(run_dir, config, may_change=()):
    """settings_changed's test for a folder of another stage, alone: a stage starting afresh in a
    folder checks this before it writes its run_config.json over that run's (which could then never
    resume). None when there is no readable run_config.json there or it may be this script's."""
    before, _ = _recorded_settings(run_dir)
    return None if before is None else _another_scripts_settings(before, config, may_change)


def env_overrides_problem(env_name, overrides):
    """What is wrong with an --env-overrides value for env_name, as one line for parser.error (None
    when envs.make takes it). Every script with that flag checks it this way before any work."""
    if "render_mode" in overrides:
        return "--env-overrides: the rendering is not an env override; set it with --render"
    try:
        envs.make(env_name, **overrides)
    except (TypeError, ValueError) as e:
        return f"--env-overrides {json.dumps(overrides)}: {e}"
    return None


# argparse types and the run folder: a bad value is one line at start, not a traceback mid-run

def help_with_defaults(parser, presets=None):
    """Append each flag's default to its --help line: "(default: 0.2)", or for a flag a preset fills
    in, every preset's value, "(paper: 1e-06; tiny: 0.0002)" -- argparse itself would show the None
    the flag starts at. A preset value that depends on --env is shown per env."""
    def shown(value):
        if isinstance(value, dict):  # one value per env
            return ", ".join(f"{env} {shown(v)}" for env, v in value.items())
        if isinstance(value, (list, tuple)):
            return " ".join(map(str, value))
        if isinstance(value, bool):  # a --flag / --no-flag pair
            return "on" if value else "off"
        if isinstance(value, float):
            return f"{value:.12g}"
        return "unset" if value is None else str(value)

    for action in parser._actions:
        if not action.option_strings or action.help in (None, argparse.SUPPRESS) or "%(default)" in action.help:
            continue  # positionals, --help, and flags whose help already shows it (BooleanOptionalAction)
        by_preset = {name: preset[action.dest] for name, preset in (presets or {}).items() if action.dest in preset}
        if by_preset:
            text = "; ".join(f"{name}: {shown(value)}" for name, value in by_preset.items())
        elif not (action.default is None or action.default is False or action.default in ([], {}, argparse.SUPPRESS)):
            text = f"default: {shown(action.default)}"
        else:
            continue
        action.help += f" ({text.replace('%', '%%')})"
    return parser


def json_object(text):
    """--env-overrides: a JSON object, e.g. '{"slippery": false}'."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg}); e.g. '{{\"slippery\": false}}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"a JSON object of settings is needed, e.g. '{{\"slippery\": false}}', "
                                         f"not {text!r}")
    return value


def seed_int(text):
    """A --seed flag: a whole number from 0 to 2**63 - 1, what every generator a run seeds takes
    (numpy's refuses a negative seed, torch's one past 64 bits)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 0 <= value < 2 ** 63:
        raise argparse.ArgumentTypeError(f"a seed is a whole number from 0 to 2**63 - 1, not {text}")
    return value


def finite_float(text):
    """A float flag: NaN and infinities are refused (they would train a model into NaN, silently)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text!r}")
    return value


def make_run_dir(path):
    """Create the run folder (--out), or exit with one line that says why it cannot be. A model
    checkpoint is not a run folder: the run would replace the run_config.json that tells
    evaluate.py and the next stage how the checkpoint was trained (--out given as --model, say)."""
    if os.path.isfile(os.path.join(path, "config.json")):
        raise SystemExit(f"error: --out {path} is a model checkpoint (it has config.json); a run there would "
                         f"overwrite its files: pass a new folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: --out {path}: {e.strerror}; pass a folder path that can be written to") from None
