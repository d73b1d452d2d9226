"""Formats, mixture configs and prepare: errors name their file, stores hold exactly the data."""

import json
import os
import random
import shutil
import sys

import numpy as np
import pytest
import yaml

import data.prepare as prepare_module
from data.formats import Chat, DataFormatError, read_records
from data.loader import IGNORE_INDEX, BatchLoader
from data.mixture import load_data_config
from train.config import REPO_ROOT, ConfigError
from data.prepare import load_prepared, prepare
from data.tokenizer import DEFAULT_TOKENIZER_DIR, load_tokenizer

WORDS = ["alpha", "beta", "gamma", "délta", "東京", "🙂", "x", "return", "(1, 2)", "\n", "  "]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")
    return path


def write_config(directory, name="mix.yaml", **options):
    path = directory / name
    path.write_text(yaml.safe_dump(options), encoding="utf-8")
    return path


def random_texts(count, seed=0, max_words=60):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words))) for _ in range(count)]


def conversation(rng, turns):
    messages = [{"role": "system", "content": "Be brief."}] if rng.random() < 0.5 else []
    for _ in range(turns):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        messages += [{"role": "user", "content": f"What is {a} + {b}?"},
                     {"role": "assistant", "content": str(a + b)}]
    return messages


# ---------------------------------------------------------------- formats

PROMPT = [{"role": "user", "content": "hi"}]
VALID = {"pretrain": {"text": "ok"}, "sft": {"conversations": PROMPT}, "dpo": {"chosen": PROMPT, "rejected": PROMPT},
         "rl": {"conversations": PROMPT, "answer": "hello"}}


BAD_LINES = [
    ("pretrain", '{"text": "unterminated', "malformed JSON"),
    ("pretrain", '{"text": 5}', "field 'text' must be str, got int"),
    ("pretrain", '{"txt": "typo"}', "missing field 'text'"),
    ("pretrain", '["text"]', "expected a JSON object"),
    ("sft", '{"conversations": [{"role": "bot", "content": "x"}]}',
     "field 'conversations[0].role': unknown role 'bot'"),
    ("sft", '{"conversations": []}', "field 'conversations' is an empty conversation"),
    ("sft", '{"conversations": [{"role": "user", "content": 3}]}', "field 'conversations[0].content' must be str"),
    ("dpo", '{"chosen": [{"role": "user", "content": "x"}]}', "missing field 'rejected'"),
    ("rl", '{"conversations": [{"role": "user", "content": "x"}], "answer": 7}', "field 'answer' must be str"),
    ("rl", '{"conversations": [{"role": "assistant", "content": "x"}]}', "no prompt before the assistant turn"),
]


@pytest.mark.parametrize("kind, bad_line, expected", BAD_LINES)
def test_schema_errors_name_file_line_and_field(tmp_path, kind, bad_line, expected):
    valid = json.dumps(VALID[kind])
    path = tmp_path / "data.jsonl"
    path.write_text(f"{valid}\n{valid}\n{bad_line}\n{valid}\n")
    with pytest.raises(DataFormatError) as error:
        list(read_records(path, kind))
    assert str(error.value).startswith(f"{path}:3: ")
    assert expected in str(error.value)


def test_skip_bad_records_skips_and_names_each_bad_line(tmp_path):
    path = tmp_path / "data.jsonl"
    kinds = {kind for kind, _, _ in BAD_LINES}
    for kind in sorted(kinds):
        cases = [(line, expected) for k, line, expected in BAD_LINES if k == kind]
        valid = json.dumps(VALID[kind])
        path.write_text("".join(f"{valid}\n{line}\n" for line, _ in cases) + f"{valid}\n")
        bad = []
        assert [n for n, _ in read_records(path, kind, bad)] == list(range(1, 2 * len(cases) + 2, 2))
        assert len(bad) == len(cases)
        for i, ((_, expected), message) in enumerate(zip(cases, bad)):
            assert message.startswith(f"{path}:{2 * i + 2}: ") and expected in message


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataFormatError, match=f"{path}: empty file"):
        list(read_records(path, "pretrain"))


def test_rl_drops_the_final_assistant_turn(tmp_path):
    messages = [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "5"}]
    path = write_jsonl(tmp_path / "rl.jsonl",
                       [{"conversations": messages, "answer": "5"}, {"conversations": messages[:1]}])
    assert [record for _, record in read_records(path, "rl")] == [(Chat(messages[:1]), "5"), (Chat(messages[:1]), None)]


# ---------------------------------------------------------------- mixture config

@pytest.fixture
def text_file(tmp_path):
    return write_jsonl(tmp_path / "texts.jsonl", [{"text": t} for t in random_texts(40)])


def base_options(path, **overrides):
    return {"kind": "pretrain", "max_seq_len": 32, "sources": [{"path": str(path), "weight": 1.0}], **overrides}


def test_unknown_option_is_named_with_valid_ones(tmp_path, text_file):
    config_file = write_config(tmp_path, **base_options(text_file, max_seq_length=64))
    with pytest.raises(ConfigError) as error:
        load_data_config(config_file)
    message = str(error.value)
    assert str(config_file) in message and "'max_seq_length'" in message
    assert "valid: kind, max_seq_len, sources, validation, seed" in message


def test_unknown_source_option_is_named(tmp_path, text_file):
    options = base_options(text_file)
    options["sources"][0]["wieght"] = 1.0
    with pytest.raises(ConfigError, match=r"unknown option 'sources\[0\].wieght'"):
        load_data_config(write_config(tmp_path, **options))


def test_weights_must_sum_to_one(tmp_path, text_file):
    options = base_options(text_file)
    options["sources"] = [{"path": str(text_file), "weight": 0.6}, {"path": str(text_file), "weight": 0.3}]
    config_file = write_config(tmp_path, **options)
    with pytest.raises(ConfigError, match=r"weight.*must sum to 1") as error:
        load_data_config(config_file)
    assert str(config_file) in str(error.value)


def test_missing_source_file_is_named(tmp_path):
    missing = tmp_path / "nope.jsonl"
    config_file = write_config(tmp_path, **base_options(missing))
    with pytest.raises(ConfigError) as error:
        load_data_config(config_file)
    assert str(config_file) in str(error.value) and "sources[0].path" in str(error.value)
    assert str(missing) in str(error.value)


@pytest.mark.parametrize("overrides, option", [
    ({"kind": "midtrain"}, "kind"),
    ({"max_seq_len": "long"}, "max_seq_len"),
    ({"validation": {"fraction": 1.5}}, "validation.fraction"),
    ({"validation": {"fraction": 0.1, "path": "x"}}, "validation"),
])
def test_bad_values_name_the_option(tmp_path, text_file, overrides, option):
    with pytest.raises(ConfigError, match=f"option '{option}'"):
        load_data_config(write_config(tmp_path, **base_options(text_file, **overrides)))


def test_relative_paths_resolve_against_repo_root(tmp_path):
    config = load_data_config(write_config(tmp_path, **base_options("pyproject.toml")))
    assert config.sources[0].path == REPO_ROOT / "pyproject.toml"


# ---------------------------------------------------------------- prepare

@pytest.fixture
def pretrain_config(tmp_path, text_file):
    return load_data_config(write_config(tmp_path, **base_options(text_file, validation={"fraction": 0.25})))


def store_docs(store):
    return [tuple(store.doc(i)[0].tolist()) for i in range(len(store))]


def test_pretrain_store_holds_exactly_the_documents(tmp_path, tok, pretrain_config):
    prepared = prepare(pretrain_config, tok, tmp_path / "cache")
    texts = [json.loads(line)["text"] for line in pretrain_config.sources[0].path.read_text().splitlines()]
    expected = [tuple([tok.bos_id] + tok.encode(text) + [tok.eos_id]) for text in texts]
    train, val = prepared.split("train"), prepared.split("val")
    assert len(train) and len(val)
    assert sorted(store_docs(train) + store_docs(val)) == sorted(expected)
    meta = prepared.meta["splits"]
    assert meta["train"]["docs"] + meta["val"]["docs"] == len(texts)
    assert meta["train"]["tokens"] + meta["val"]["tokens"] == sum(map(len, expected))
    # Every token but a document's first is a target in pretraining.
    assert meta["train"]["supervised_tokens"] + meta["val"]["supervised_tokens"] == sum(len(d) - 1 for d in expected)
    assert all(store.loss_mask.all() for store in (train, val))
    assert train.tokens.dtype == np.uint16


def test_sft_store_is_render_chat_truncated(tmp_path, tok):
    rng = random.Random(0)
    conversations = [conversation(rng, turns=rng.randint(1, 6)) for _ in range(60)]
    source = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": c} for c in conversations])
    rendered = [tok.render_chat(c) for c in conversations]
    max_seq_len = int(np.median([len(ids) for ids, _ in rendered]))
    options = {**base_options(source), "kind": "sft", "max_seq_len": max_seq_len}
    config = load_data_config(write_config(tmp_path, **options))
    store = prepare(config, tok, tmp_path / "cache").split("train")
    for i, (ids, mask) in enumerate(rendered):
        assert store.doc(i)[0].tolist() == ids[:max_seq_len]
        assert store.doc(i)[1].tolist() == mask[:max_seq_len]
    assert store.meta["truncated_docs"] == sum(len(ids) > max_seq_len for ids, _ in rendered) > 0
    assert store.meta["supervised_tokens"] == sum(sum(mask[1:max_seq_len]) for _, mask in rendered)


def test_sft_labels_supervise_exactly_the_assistant_turns(tmp_path, tok):
    rng = random.Random(1)
    conversations = [conversation(rng, turns=rng.randint(1, 3)) for _ in range(20)]
    source = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": c} for c in conversations])
    config = load_data_config(write_config(tmp_path, **{**base_options(source), "kind": "sft", "max_seq_len": 512}))
    store = prepare(config, tok, tmp_path / "cache").split("train")
    loader = BatchLoader(store, batch_size=len(conversations), seq_len=512, mode="padded", drop_last=False)
    batch = next(loader.iterate(0))
    supervised = sorted(tok.decode(row[row != IGNORE_INDEX], skip_special_tokens=False) for row in batch["labels"])
    assistant_turns = [[m["content"] + "<|im_end|>" for m in c if m["role"] == "assistant"] for c in conversations]
    assert supervised == sorted("".join(turns) for turns in assistant_turns)


def test_dpo_stores_are_aligned_pairs(tmp_path, tok):
    rng = random.Random(2)
    pairs = []
    for _ in range(30):
        prompt = conversation(rng, 1)[:-1]
        pairs.append({"chosen": prompt + [{"role": "assistant", "content": "right"}],
                      "rejected": prompt + [{"role": "assistant", "content": "wrong answer"}]})
    source = write_jsonl(tmp_path / "dpo.jsonl", pairs)
    config = load_data_config(write_config(tmp_path, **{**base_options(source), "kind": "dpo", "max_seq_len": 64}))
    store = prepare(config, tok, tmp_path / "cache").split("train")
    assert len(store.chosen) == len(store.rejected) == len(pairs)
    for i, pair in enumerate(pairs):
        assert store.chosen.doc(i)[0].tolist() == tok.render_chat(pair["chosen"])[0]
        assert store.rejected.doc(i)[0].tolist() == tok.render_chat(pair["rejected"])[0]


def test_rl_store_holds_prompts_and_answers(tmp_path, tok):
    rng = random.Random(3)
    records = [{"conversations": conversation(rng, 1), "answer": str(i)} for i in range(25)]
    source = write_jsonl(tmp_path / "rl.jsonl", records)
    config = load_data_config(write_config(tmp_path, **{**base_options(source), "kind": "rl"}))
    store = prepare(config, tok, tmp_path / "cache").split("train")
    assert store.answers == [r["answer"] for r in records]
    for i, record in enumerate(records):
        prompt = record["conversations"][:-1]
        assert store.doc(i)[0].tolist() == tok.render_chat(prompt, add_generation_prompt=True)[0]


def test_filters_and_max_samples(tmp_path, tok, text_file):
    options = base_options(text_file)
    lengths = sorted(len(tok.encode(t)) + 2 for t in random_texts(40))
    min_length, max_length = lengths[10], lengths[30]
    options["sources"][0].update(max_samples=30, min_length=min_length, max_length=max_length)
    prepared = prepare(load_data_config(write_config(tmp_path, **options)), tok, tmp_path / "cache")
    kept = [n for n in (len(tok.encode(t)) + 2 for t in random_texts(40)[:30]) if min_length <= n <= max_length]
    assert prepared.split("train").doc_lengths.tolist() == kept
    assert prepared.meta["sources"][0] == {"path": str(text_file), "records": 30, "filtered_docs": 30 - len(kept),
                                           "skipped_records": 0, "bad_records": []}


def test_validation_path_fills_the_val_split(tmp_path, tok, text_file):
    val_file = write_jsonl(tmp_path / "val.jsonl", [{"text": t} for t in random_texts(7, seed=9)])
    config = load_data_config(write_config(tmp_path, **base_options(text_file, validation={"path": str(val_file)})))
    prepared = prepare(config, tok, tmp_path / "cache")
    assert len(prepared.split("val")) == 7 and len(prepared.split("train")) == 40
    assert prepared.split("val").meta["sources"][0]["path"] == str(val_file)


def test_second_prepare_reuses_without_tokenizing(tmp_path, tok, pretrain_config, monkeypatch):
    first = prepare(pretrain_config, tok, tmp_path / "cache")
    monkeypatch.setattr(prepare_module, "tokenize_chunk", lambda *args: pytest.fail("re-tokenized"))
    second = load_prepared(pretrain_config, tok, require_existing=True, cache_dir=tmp_path / "cache")
    third = prepare(pretrain_config, tok, tmp_path / "cache")
    assert not first.reused and second.reused and third.reused
    assert first.root == second.root == third.root


def assert_stale(config, tokenizer, cache_dir):
    with pytest.raises(FileNotFoundError) as error:
        load_prepared(config, tokenizer, require_existing=True, cache_dir=cache_dir)
    message = str(error.value)
    assert str(config.config_file) in message and "stale" in message
    assert f"python -m data.prepare --data_config {config.config_file}" in message


def test_touching_a_source_makes_the_store_stale(tmp_path, tok, pretrain_config):
    prepare(pretrain_config, tok, tmp_path / "cache")
    source = pretrain_config.sources[0].path
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert_stale(pretrain_config, tok, tmp_path / "cache")


def test_same_size_same_mtime_edit_is_still_detected(tmp_path, tok, pretrain_config):
    prepare(pretrain_config, tok, tmp_path / "cache")
    source = pretrain_config.sources[0].path
    stat = source.stat()
    content = source.read_bytes()
    source.write_bytes(content.replace(b"alpha", b"omega", 1))
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert source.stat().st_size == stat.st_size
    assert_stale(pretrain_config, tok, tmp_path / "cache")


def test_changing_the_tokenizer_makes_the_store_stale(tmp_path, tok, pretrain_config):
    tokenizer_dir = tmp_path / "tokenizer"
    shutil.copytree(DEFAULT_TOKENIZER_DIR, tokenizer_dir)
    prepare(pretrain_config, load_tokenizer(tokenizer_dir), tmp_path / "cache")
    tokenizer_file = tokenizer_dir / "tokenizer.json"
    tokenizer_file.write_text(json.dumps(json.loads(tokenizer_file.read_text()), indent=1))
    assert_stale(pretrain_config, load_tokenizer(tokenizer_dir), tmp_path / "cache")


def test_never_prepared_says_what_to_run(tmp_path, tok, pretrain_config):
    with pytest.raises(FileNotFoundError, match="nothing prepared.*Run: python -m data.prepare"):
        load_prepared(pretrain_config, tok, require_existing=True, cache_dir=tmp_path / "cache")


def test_interrupted_prepare_leaves_no_complete_store(tmp_path, tok, pretrain_config, monkeypatch):
    tokenize_chunk = prepare_module.tokenize_chunk
    calls = []

    def tokenize_then_die(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return tokenize_chunk(*args)

    monkeypatch.setattr(prepare_module, "RECORDS_PER_CHUNK", 8)
    monkeypatch.setattr(prepare_module, "tokenize_chunk", tokenize_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare(pretrain_config, tok, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []
    with pytest.raises(FileNotFoundError, match="nothing prepared"):
        load_prepared(pretrain_config, tok, require_existing=True, cache_dir=tmp_path / "cache")


def test_cli_prepares_then_reuses(tmp_path, pretrain_config, monkeypatch, capsys):
    argv = ["prepare", "--data_config", str(pretrain_config.config_file), "--cache_dir", str(tmp_path / "cache")]
    monkeypatch.setattr(sys, "argv", argv)
    prepare_module.main()
    prepare_module.main()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("prepared ") and any(line.startswith("reused ") for line in lines)


def test_a_file_splits_the_same_way_in_every_config(tmp_path, tok, text_file):
    other = write_jsonl(tmp_path / "other.jsonl", [{"text": t} for t in random_texts(30, seed=5)])
    alone = base_options(text_file, validation={"fraction": 0.3})
    mixed = {**alone, "sources": [{"path": str(other), "weight": 0.5}, {"path": str(text_file), "weight": 0.5}]}

    def val_split(name, options):
        return prepare(load_data_config(write_config(tmp_path, name, **options)), tok, tmp_path / "cache").split("val")

    val_alone, val_mixed = val_split("alone.yaml", alone), val_split("mixed.yaml", mixed)
    from_text_file = [doc for doc, source in zip(store_docs(val_mixed), val_mixed.source) if source == 1]
    assert store_docs(val_alone) == from_text_file and from_text_file


# ---------------------------------------------------------------- bad records in prepare

def test_prepare_skips_and_counts_bad_records_only_when_asked(tmp_path, tok):
    texts = random_texts(6)
    source = tmp_path / "texts.jsonl"
    lines = [json.dumps({"text": t}) for t in texts]
    lines[1:1] = ['{"text": "unterminated']
    lines[4:4] = ['{"txt": "typo"}', "[1]"]
    source.write_text("\n".join(lines) + "\n")
    config = load_data_config(write_config(tmp_path, **base_options(source)))
    with pytest.raises(DataFormatError, match=f"{source}:2: malformed JSON"):
        prepare(config, tok, tmp_path / "cache")
    prepared = prepare(config, tok, tmp_path / "cache", skip_bad_records=True)
    assert len(prepared.split("train")) == len(texts)
    counts = prepared.meta["sources"][0]
    assert counts["records"] == 6 and counts["skipped_records"] == 3
    assert [m.split(": ")[0] for m in counts["bad_records"]] == [f"{source}:2", f"{source}:5", f"{source}:6"]
    assert prepare_module.skipped_records(prepared) == {str(source): 3}
    # The skipping store has its own key: a run without the flag fails again instead of reusing it.
    with pytest.raises(DataFormatError, match=f"{source}:2: malformed JSON"):
        prepare(config, tok, tmp_path / "cache")


def test_a_file_of_only_bad_records_is_an_error_even_when_skipping(tmp_path, tok):
    source = tmp_path / "bad.jsonl"
    source.write_text('{"txt": 1}\n{"text": 2}\n')
    config = load_data_config(write_config(tmp_path, **base_options(source)))
    with pytest.raises(DataFormatError, match=f"{source}: no usable records \\(2 bad, all skipped; the first: "
                                              f"{source}:1: missing field 'text'"):
        prepare(config, tok, tmp_path / "cache", skip_bad_records=True)


def test_an_rl_prompt_longer_than_max_seq_len_is_named_or_skipped(tmp_path, tok):
    short = {"conversations": [{"role": "user", "content": "2+3?"}], "answer": "5"}
    long = {"conversations": [{"role": "user", "content": " ".join(random_texts(1, max_words=200)) * 4}]}
    source = write_jsonl(tmp_path / "rl.jsonl", [short, long, short])
    config = load_data_config(write_config(tmp_path, **{**base_options(source), "kind": "rl", "max_seq_len": 64}))
    with pytest.raises(DataFormatError, match=rf"{source}:2: the prompt is \d+ tokens, longer than max_seq_len 64"):
        prepare(config, tok, tmp_path / "cache")
    prepared = prepare(config, tok, tmp_path / "cache", skip_bad_records=True)
    assert prepared.split("train").answers == ["5", "5"]
    assert prepare_module.skipped_records(prepared) == {str(source): 1}
