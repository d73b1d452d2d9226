"""Data guards provoked for real: SFT/DPO data without a supervised token, a prepare killed with SIGKILL, a prepared
store that does not fit its disk (a 1 MiB tmpfs)."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest
import yaml

import data.prepare as prepare_module
from data.prepare import prepare
from data.tokenizer import load_tokenizer
from model import ModelConfig
from tests.launch import tmpfs
from train.config import REPO_ROOT, ConfigError, TrainConfig
from train.data_loading import build_data
from train.dpo import DPOStage
from train.reward import RewardStage
from train.stage import LanguageModelStage

SFT = LanguageModelStage("sft", data_kind="sft", default_packing="padded")
SYSTEM_ONLY = [{"role": "system", "content": "Be brief."}]
USER_ONLY = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """build_data prepares into the default cache directory: a private one per test."""
    monkeypatch.setattr(prepare_module, "DEFAULT_CACHE_DIR", tmp_path / "cache")
    return tmp_path / "cache"


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def write_config(path, kind, source, **options):
    path.write_text(yaml.safe_dump({"kind": kind, "max_seq_len": 64, "sources": [{"path": str(source), "weight": 1.0}],
                                    **options}), encoding="utf-8")
    return path


def answered(count):
    return [{"conversations": USER_ONLY + [{"role": "assistant", "content": str(i)}]} for i in range(count)]


def counts(tok, conversations):
    """describe_counts of a store of these conversations, none of them supervised or truncated."""
    return f"docs {len(conversations)}  tokens {sum(len(tok.render_chat(c)[0]) for c in conversations)}  " \
           f"supervised 0  truncated 0"


def build(config, stage=SFT):
    cfg = TrainConfig(data_config=str(config), batch_size=2)
    return build_data(cfg, stage, ModelConfig.from_preset("tiny"), rank=0, world_size=1)


# ---------------------------------------------------------------- data that teaches nothing

def test_sft_data_without_an_assistant_turn_is_refused_with_its_counts(tmp_path, tok, cache):
    conversations = [SYSTEM_ONLY, USER_ONLY, SYSTEM_ONLY, USER_ONLY]
    source = write_jsonl(tmp_path / "no_answers.jsonl", [{"conversations": c} for c in conversations])
    config = write_config(tmp_path / "sft.yaml", "sft", source)
    with pytest.raises(ConfigError, match=re.escape(
            f"--data_config {config}: the train split has no supervised token ({counts(tok, conversations)}), "
            f"nothing for sft to learn (only assistant turns are supervised); give each conversation an assistant "
            f"turn within max_seq_len 64")):
        build(config)


def test_sft_data_with_answers_passes(tmp_path, cache):
    config = write_config(tmp_path / "sft.yaml", "sft", write_jsonl(tmp_path / "sft.jsonl", answered(8)),
                          validation={"fraction": 0.25})
    data = build(config)
    assert data.prepared.meta["splits"]["train"]["supervised_tokens"] > 0 and len(data.train) > 0


def test_a_validation_split_without_an_assistant_turn_is_refused(tmp_path, tok, cache):
    validation = write_jsonl(tmp_path / "val.jsonl", [{"conversations": SYSTEM_ONLY}, {"conversations": USER_ONLY}])
    config = write_config(tmp_path / "sft.yaml", "sft", write_jsonl(tmp_path / "sft.jsonl", answered(8)),
                          validation={"path": str(validation)})
    with pytest.raises(ConfigError, match=re.escape(
            f"--data_config {config}: the val split has no supervised token "
            f"({counts(tok, [SYSTEM_ONLY, USER_ONLY])}), nothing for sft to measure (only assistant turns are "
            f"supervised); give each conversation an assistant turn within max_seq_len 64, or leave validation out "
            f"(validation.fraction 0, no validation.path)")):
        build(config)


@pytest.mark.parametrize("stage", [DPOStage(), RewardStage()], ids=["dpo", "reward"])
def test_preference_pairs_without_a_supervised_answer_are_refused_per_side(tmp_path, tok, cache, stage):
    rejected = USER_ONLY[:1] + [{"role": "user", "content": "Anything?"}]
    source = write_jsonl(tmp_path / "pairs.jsonl", [{"chosen": USER_ONLY, "rejected": rejected}] * 3)
    config = write_config(tmp_path / "dpo.yaml", "dpo", source)
    with pytest.raises(ConfigError, match=re.escape(
            f"--data_config {config}: the train split has no supervised token (chosen: {counts(tok, [USER_ONLY] * 3)}"
            f"; rejected: {counts(tok, [rejected] * 3)}), nothing for {stage.name} to learn (only assistant turns are "
            f"supervised); give each chosen and rejected answer an assistant turn within max_seq_len 64")):
        build(config, stage)


# ---------------------------------------------------------------- a killed prepare

STALLED_PREPARE = """
import sys, time
import data.prepare as prepare_module
from data.tokenizer import load_tokenizer

tokenize_chunk, calls = prepare_module.tokenize_chunk, []

def tokenize_then_stall(*args):  # the first chunk is written into the temp store, then the process waits
    calls.append(1)
    if len(calls) == 2:
        print("stalled", flush=True)
        time.sleep(600)
    return tokenize_chunk(*args)

prepare_module.RECORDS_PER_CHUNK = 8
prepare_module.tokenize_chunk = tokenize_then_stall
prepare_module.prepare(sys.argv[1], load_tokenizer(), sys.argv[2])
"""


def test_a_killed_prepare_leaves_no_temporary_store_at_the_next_run(tmp_path, tok, capsys):
    """A real prepare SIGKILLed in the middle of writing; the next prepare removes its temp dir, and only that one."""
    source = write_jsonl(tmp_path / "text.jsonl", [{"text": f"document {i} " * 20} for i in range(40)])
    config = write_config(tmp_path / "pretrain.yaml", "pretrain", source, validation={"fraction": 0.1})
    cache = tmp_path / "cache"
    child = subprocess.Popen([sys.executable, "-c", STALLED_PREPARE, str(config), str(cache)], cwd=REPO_ROOT,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "stalled\n"
    finally:
        child.kill()
        child.wait()
    [leftover] = cache.glob(".tmp-*")
    assert leftover.name.endswith(f"@{socket.gethostname()}-{child.pid}-" + leftover.name[-8:])
    assert (leftover / "train" / "tokens.bin").is_file()
    # Never removed: the temp of a live process of this host, and a dead pid's of another host.
    live = cache / f".tmp-store@{socket.gethostname()}-{os.getpid()}-0123abcd"
    other_host = cache / f".tmp-store@other-node-{child.pid}-0123abcd"
    live.mkdir()
    other_host.mkdir()

    prepared = prepare(config, tok, cache)
    assert capsys.readouterr().err == \
        f"removed 1 temporary store(s) left by killed data preparations: {leftover}\n"
    assert sorted(cache.iterdir()) == sorted([prepared.root, live, other_host])
    assert not prepared.reused
    fresh = prepare(config, tok, tmp_path / "fresh")
    for split in ("train", "val"):
        assert (prepared.split(split).tokens == fresh.split(split).tokens).all()
        assert (prepared.split(split).offsets == fresh.split(split).offsets).all()
    assert len(prepared.split("train")) + len(prepared.split("val")) == 40


# ---------------------------------------------------------------- a full disk

@pytest.fixture
def tiny_disk(tmp_path):
    """A real 1 MiB tmpfs as the cache directory."""
    mount_point = tmp_path / "cache"
    mount_point.mkdir()
    with tmpfs(mount_point, "size=1m"):
        yield mount_point


def disk_full_message(cache, writing_error):
    return (rf"\[Errno 28\] disk full while writing the prepared data into {re.escape(str(cache))}: the store had "
            rf"reached [\d,]+ bytes when writing failed \({writing_error}\), and ([\d,]+) bytes are free there; the "
            rf"partial store was removed, nothing is left behind. Free space in {re.escape(str(cache))} and run again")


def test_a_store_larger_than_the_disk_names_the_cache_and_leaves_nothing(tmp_path, tok, tiny_disk):
    """About 2 MB of tokens for a 1 MiB disk: the token file's write fails with ENOSPC."""
    source = write_jsonl(tmp_path / "text.jsonl", [{"text": f"document {i} " * 150} for i in range(1000)])
    config = write_config(tmp_path / "pretrain.yaml", "pretrain", source)
    with pytest.raises(OSError, match=disk_full_message(tiny_disk, r"\[Errno 28\] No space left on device")) as error:
        prepare(config, tok, tiny_disk)
    assert list(tiny_disk.iterdir()) == []
    free = int(re.search(r"([\d,]+) bytes are free", str(error.value)).group(1).replace(",", ""))
    assert free == shutil.disk_usage(tiny_disk).free == 1 << 20  # every file was closed before the temp was removed


def test_numpys_short_write_on_a_full_disk_is_named_disk_full(tmp_path, tok, tiny_disk):
    """The disk has room for the token and mask files but not the offsets: np.save's error carries no errno."""
    texts = ["x"] * 5000
    source = write_jsonl(tmp_path / "text.jsonl", [{"text": text} for text in texts])
    config = write_config(tmp_path / "pretrain.yaml", "pretrain", source)
    tokens = sum(len(ids) + 2 for ids in tok.encode_batch(texts))
    page = 4096
    room = -(-2 * tokens // page) * page + -(-tokens // page) * page + 4 * page  # offsets.npy needs 40 KB
    filler = tiny_disk / "filler"
    filler.write_bytes(bytes(shutil.disk_usage(tiny_disk).free - room))
    with pytest.raises(OSError, match=disk_full_message(tiny_disk, r"\d+ requested and \d+ written")):
        prepare(config, tok, tiny_disk)
    assert list(tiny_disk.iterdir()) == [filler]
