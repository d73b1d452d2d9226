"""bench/peer.py without running it (no TRL needed): which parts a command line selects."""
import sys

import pytest

from bench import peer


def parse(monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["bench/peer.py", *argv])
    return peer.parse_args()


def test_parts_from_only_and_skip(monkeypatch):
    assert parse(monkeypatch).parts == ["sft", "grpo", "dpo"]
    assert parse(monkeypatch, "--only", "dpo,sft").parts == ["sft", "dpo"]
    assert parse(monkeypatch, "--skip_dpo", "--skip_grpo").parts == ["sft"]
    assert parse(monkeypatch, "--only", "grpo,dpo", "--skip_dpo").parts == ["grpo"]


def test_bad_selections_are_refused(monkeypatch):
    for argv in (["--only", "ppo"], ["--only", "sft", "--skip_sft"], ["--grpo_steps", "0"], ["--group_size", "1"]):
        with pytest.raises(SystemExit):
            parse(monkeypatch, *argv)


def test_sft_rows_of_512_and_dpo_at_its_data_config_length(monkeypatch):
    args = parse(monkeypatch)
    assert args.max_seq_len == 512
    assert args.dpo_max_seq_len == peer.load_data_config(peer.REPO_ROOT / peer.DPO_DATA).max_seq_len

