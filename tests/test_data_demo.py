"""The demo corpus: every file parses as its kind, every task answer is right, held-out prompts stay out."""

import os
import re
import subprocess
import sys

import pytest

from data.formats import read_records
from train.config import REPO_ROOT

KINDS = {"pretrain.jsonl": "pretrain", "midtrain.jsonl": "pretrain", "sft.jsonl": "sft",
         "dpo.jsonl": "dpo", "rl_prompts.jsonl": "rl", "rl_eval.jsonl": "rl"}


def solve(prompt):
    """An independent oracle for the verifiable tasks; None for other prompts (doc Q&A)."""
    if match := re.search(r"(\d+) ([+-]) (\d+)", prompt):
        a, op, b = int(match[1]), match[2], int(match[3])
        return str(a + b if op == "+" else a - b)
    if match := re.search(r"(?:the first letter of|Which letter does) '(\w+)'", prompt):
        return match[1][0]
    if match := re.search(r"(?:Reverse the word|Spell) '(\w+)'", prompt):
        return match[1][::-1]
    if match := re.search(r"(?:letters are in the word|Count the letters in) '(\w+)'", prompt):
        return str(len(match[1]))
    if match := re.fullmatch(r"Is '(\w+)' (?:written in capital letters|in uppercase)\?", prompt):
        return "yes" if match[1].isupper() else "no"
    if match := re.search(r"'(\w+)' (?:in uppercase|to capital letters)", prompt):
        return match[1].upper()
    if match := re.search(r"(?:alphabetically|alphabetical order): (.+)$", prompt):
        return ", ".join(sorted(match[1].split(", ")))
    return None


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("demo")
    subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "make_demo_data.py"), "--out_dir", str(out_dir)],
                   check=True, capture_output=True)
    return out_dir


@pytest.fixture(scope="module")
def records(demo_dir):
    """Per file, its records with each conversation as its list of messages (the demo has no tools)."""
    def messages(kind, record):
        if kind in ("pretrain", "sft"):
            return record.messages if kind == "sft" else record
        return (record[0].messages, record[1].messages) if kind == "dpo" else (record[0].messages, record[1])
    return {name: [messages(kind, record) for _, record in read_records(demo_dir / name, kind)]
            for name, kind in KINDS.items()}


def turns(messages):
    """(user prompt, assistant answer) pairs of a conversation."""
    return [(messages[i]["content"], messages[i + 1]["content"])
            for i in range(len(messages) - 1) if messages[i]["role"] == "user"]


def test_task_answers_are_correct(records):
    checked = 0
    for messages in records["sft.jsonl"]:
        for prompt, answer in turns(messages):
            if solve(prompt) is not None:
                assert answer == solve(prompt), prompt
                checked += 1
    for chosen, rejected in records["dpo.jsonl"]:
        prompt = chosen[-2]["content"]
        assert chosen[:-1] == rejected[:-1]
        assert chosen[-1]["content"] == solve(prompt) != rejected[-1]["content"], prompt
    for name in ("rl_prompts.jsonl", "rl_eval.jsonl"):
        for messages, answer in records[name]:
            assert answer == solve(messages[-1]["content"])
    assert checked > len(records["sft.jsonl"]) // 2


def test_held_out_prompts_appear_in_no_training_file(records):
    held_out = {messages[-1]["content"] for messages, _ in records["rl_eval.jsonl"]}
    training = {prompt for messages in records["sft.jsonl"] for prompt, _ in turns(messages)}
    training |= {chosen[-2]["content"] for chosen, _ in records["dpo.jsonl"]}
    training |= {messages[-1]["content"] for messages, _ in records["rl_prompts.jsonl"]}
    assert held_out and not held_out & training


def test_demo_has_multi_turn_and_system_prompts(records):
    conversations = records["sft.jsonl"]
    assert any(len(turns(c)) > 1 for c in conversations)
    assert any(c[0]["role"] == "system" for c in conversations)
    assert any(solve(c[0]["content"]) is None for c in conversations if c[0]["role"] == "user")  # doc Q&A


def test_generation_is_deterministic(demo_dir, tmp_path):
    # A different hash seed: set iteration order must not leak into the output.
    subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "make_demo_data.py"), "--out_dir", str(tmp_path)],
                   check=True, capture_output=True, env={**os.environ, "PYTHONHASHSEED": "12345"})
    for name in KINDS:
        assert (tmp_path / name).read_bytes() == (demo_dir / name).read_bytes(), name
