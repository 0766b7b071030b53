import os

import pytest

# Tests never touch the network: a model id that is not a local folder must fail fast and clearly.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A freshly built tiny-preset checkpoint folder, shared by the whole test session."""
    import agent
    return agent.build_tiny_model(str(tmp_path_factory.mktemp("tiny") / "tiny"), seed=0)


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """(model, tokenizer) of the tiny preset, fp32 on CPU. Treat as read-only."""
    import agent
    return agent.load_model(tiny_dir, device="cpu")


# Qwen2's pre-tokenizer split: punctuation runs take the newlines after them, so its vocabulary has
# tokens like ">\n" that straddle the end of a tag and the start of a state (the tiny tokenizer keeps
# every tag a token of its own, so with it no token straddles one)
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")


@pytest.fixture(scope="session")
def qwen_style_tokenizer():
    """A byte-level BPE with Qwen2's split and no tags of its own, trained on the tiny preset's corpus."""
    import agent
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=list(agent.SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(agent.tokenizer_corpus(0), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=agent.CHAT_TEMPLATE, clean_up_tokenization_spaces=False)
