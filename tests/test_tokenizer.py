import json
import shutil

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models, pre_tokenizers, trainers

from data.tokenizer import DEFAULT_TOKENIZER_DIR, load_tokenizer

# The shipped tokenizer's contract (MiniMind's): vocabulary size and special token ids.
VOCAB_SIZE = 6400
SPECIAL_IDS = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.mark.parametrize("text", [
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\n\n",
    "naïve café — 東京 🙂 Ωμέγα",
    "def f(x):\n    return x ** 2  # squared\n",
    "",
])
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_and_vocab(tok):
    assert tok.vocab_size == VOCAB_SIZE
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == tuple(SPECIAL_IDS.values())
    for token, token_id in SPECIAL_IDS.items():
        assert tok.decode([token_id], skip_special_tokens=False) == token
        assert tok.decode([token_id]) == ""


def test_encode_treats_special_token_text_as_data(tok):
    ids = tok.encode("a<|im_end|>b")
    assert not set(ids) & set(SPECIAL_IDS.values())
    assert tok.decode(ids) == "a<|im_end|>b"


def pieces(tok, ids, mask):
    return [(tok.decode([i], skip_special_tokens=False), m) for i, m in zip(ids, mask)]


def test_chat_template_mask_by_hand(tok):
    messages = [
        {"role": "system", "content": "1"},
        {"role": "user", "content": "2+3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "9-1?"},
        {"role": "assistant", "content": "8"},
    ]
    expected = [
        ("<|im_start|>", 0), ("system", 0), ("\n", 0), ("1", 0), ("<|im_end|>", 0), ("\n", 0),
        ("<|im_start|>", 0), ("user", 0), ("\n", 0), ("2", 0), ("+", 0), ("3", 0), ("?", 0),
        ("<|im_end|>", 0), ("\n", 0),
        ("<|im_start|>", 0), ("assistant", 0), ("\n", 0), ("5", 1), ("<|im_end|>", 1), ("\n", 0),
        ("<|im_start|>", 0), ("user", 0), ("\n", 0), ("9", 0), ("-", 0), ("1", 0), ("?", 0),
        ("<|im_end|>", 0), ("\n", 0),
        ("<|im_start|>", 0), ("assistant", 0), ("\n", 0), ("8", 1), ("<|im_end|>", 1), ("\n", 0),
    ]
    assert pieces(tok, *tok.render_chat(messages)) == expected


def test_generation_prompt(tok):
    messages = [{"role": "user", "content": "2+3?"}]
    ids, mask = tok.render_chat(messages)
    prompt_ids, prompt_mask = tok.render_chat(messages, add_generation_prompt=True)
    assert pieces(tok, prompt_ids, prompt_mask)[len(ids):] == [("<|im_start|>", 0), ("assistant", 0), ("\n", 0)]
    assert prompt_ids[:len(ids)] == ids
    assert not any(prompt_mask)


def test_render_matches_shipped_jinja_template(tok):
    jinja2 = pytest.importorskip("jinja2")
    config = json.loads((DEFAULT_TOKENIZER_DIR / "tokenizer_config.json").read_text())
    template = jinja2.Environment().from_string(config["chat_template"])
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Reverse 'abc', then count: ünïcödé 🙂"},
        {"role": "assistant", "content": "cba\n\n  7"},
        {"role": "user", "content": "thanks"},
    ]
    for add_generation_prompt in (False, True):
        ids, _ = tok.render_chat(messages, add_generation_prompt=add_generation_prompt)
        rendered = template.render(messages=messages, add_generation_prompt=add_generation_prompt)
        assert tok.decode(ids, skip_special_tokens=False) == rendered


def test_user_tokenizer_dir_loads(tok, tmp_path):
    user_dir = tmp_path / "my_tokenizer"
    shutil.copytree(DEFAULT_TOKENIZER_DIR, user_dir)
    user_tok = load_tokenizer(user_dir)
    assert user_tok.name_or_path == str(user_dir)
    assert user_tok.fingerprint == tok.fingerprint
    messages = [{"role": "user", "content": "hi"}]
    assert user_tok.render_chat(messages) == tok.render_chat(messages)


def test_missing_directory_and_file_are_named(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_tokenizer(missing)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "tokenizer.json")):
        load_tokenizer(tmp_path)


def test_tokenizer_without_chatml_tokens_fails_clearly(tmp_path):
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator(["some plain text"], trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>"]))
    backend.save(str(tmp_path / "tokenizer.json"))
    plain = load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match=r"lacks '<\|im_start\|>'"):
        plain.render_chat([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="bos_token"):
        plain.bos_id
