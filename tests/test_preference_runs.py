"""DPO and reward-model runs under the deepspeed launcher (1 and 2 CPU ranks, ZeRO 0/2/3), every metric against
an independent reference computed here in one process: the same starting weights, the same pairs, plain PyTorch.

World size 1 runs micro-batches of 8 pairs, world size 2 of 4: the global batch (and the loss curve) is the same.
"""
from __future__ import annotations

import math
import re
from itertools import islice

import pytest
import torch
import torch.nn.functional as F

from data.loader import BatchLoader
from data.mixture import load_data_config
from data.prepare import load_prepared
from data.tokenizer import load_tokenizer
from model import ModelConfig, Transformer, forward_flops, load_pretrained, load_reward_model, save_pretrained
from tests.launch import CONTRACT, REPO_ROOT, read_metrics, read_run_config, run_launch_script, run_stage

DATA_CONFIG = "config/data/posttrain/dpo/demo.yaml"
PAIRS, ACCUMULATION, STEPS, SEED, BETA = 8, 2, 3, 42, 0.1
DPO_KEYS = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected"]
REWARD_KEYS = ["reward/accuracy", "reward/margin"]
DPO_RUNS = [(1, "2"), (2, "3")]
REWARD_RUNS = [(1, "0"), (2, "3")]


def stage_args(out_root, world_size: int) -> list[str]:
    return ["--out_root", str(out_root), "--from_weight", "sft", "--batch_size", str(PAIRS // world_size),
            "--accumulation_steps", str(ACCUMULATION), "--max_steps", str(STEPS), "--log_interval", "1",
            "--eval_interval", "0", "--eval_batches", "0", "--save_interval", "0", "--throughput_warmup_steps", "0",
            "--seed", str(SEED)]


def launch(stage: str, out_dir, out_root, world_size: int, zero: str) -> str:
    """ZeRO-3 at two ranks goes through the launch script, as users start it; the others through run_stage."""
    if (world_size, zero) != (2, "3"):
        return run_stage(stage, out_dir, *stage_args(out_root, world_size), world_size=world_size, zero=zero).stdout
    return run_launch_script(stage, "--out_dir", str(out_dir), *stage_args(out_root, world_size), zero=zero).stdout


@pytest.fixture(scope="module")
def out_root(tmp_path_factory):
    """Where `--from_weight sft` looks: an SFT export (an untrained one does for the mechanics)."""
    root = tmp_path_factory.mktemp("out")
    torch.manual_seed(SEED)
    save_pretrained(Transformer(ModelConfig.from_preset("tiny")), root / "sft" / "export")
    return root


@pytest.fixture(scope="module")
def sft_export(out_root):
    return out_root / "sft" / "export"


@pytest.fixture(scope="module")
def data():
    config = load_data_config(REPO_ROOT / DATA_CONFIG)
    prepared = load_prepared(config, load_tokenizer())
    loader = BatchLoader(prepared.split("train"), PAIRS, config.max_seq_len, 0, 1, SEED, "padded",
                         weights=prepared.weights)
    return list(islice(loader.iterate(0), STEPS * ACCUMULATION)), prepared.split("val")


def runs_of(stage, configurations, tmp_path_factory, out_root):
    results = {}
    for world_size, zero in configurations:
        out_dir = tmp_path_factory.mktemp(f"{stage}_ws{world_size}_zero{zero}")
        stdout = launch(stage, out_dir, out_root, world_size, zero)
        results[(world_size, zero)] = (out_dir, read_metrics(out_dir), read_run_config(out_dir), stdout)
    return results


@pytest.fixture(scope="module")
def dpo_runs(tmp_path_factory, out_root):
    return runs_of("dpo", DPO_RUNS, tmp_path_factory, out_root)


@pytest.fixture(scope="module")
def reward_runs(tmp_path_factory, out_root):
    return runs_of("reward", REWARD_RUNS, tmp_path_factory, out_root)


def row_logps(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log p of one document's supervised tokens (mask = 1: a training target), from a full log-softmax."""
    log_probs = F.log_softmax(model(ids[None]).logits[0].double(), dim=-1)
    targets = mask[1:].bool()
    return log_probs[:-1][targets].gather(1, ids[1:][targets][:, None]).sum()


def batch_docs(batch: dict):
    """(ids, mask) of every row of a collated pair batch, rebuilt from input_ids and the pre-shifted labels."""
    for row in range(batch["input_ids"].shape[0]):
        length = int((batch["doc_ids"][row] >= 0).sum())
        mask = torch.zeros(length, dtype=torch.long)
        mask[1:] = (batch["labels"][row, :length - 1] != -100).long()
        yield batch["input_ids"][row, :length], mask


def store_docs(store):
    return [(torch.from_numpy(ids.astype("int64")), torch.from_numpy(mask.astype("int64")))
            for ids, mask in (store.doc(i) for i in range(len(store)))]


def step_batches(train, step):
    return train[(step - 1) * ACCUMULATION: step * ACCUMULATION]


def check_wins(logged: float, margins: list[float]) -> None:
    """The logged win rate against margins recomputed in float64: only a margin within fp32 noise may differ."""
    wins, ties = sum(m > 0 for m in margins), sum(abs(m) < 1e-6 for m in margins)
    assert abs(logged * len(margins) - wins) <= ties + 1e-9  # the logged rate is a float: 70/94·94 is not exactly 70


def check_keys_and_counts(records, train, stage_keys, supervised_per_pair=None):
    assert [r["train/global_step"] for r in records] == list(range(1, STEPS + 1))
    tokens_seen = supervised_seen = 0
    for step, record in enumerate(records, start=1):
        for key in CONTRACT + stage_keys:
            assert record[key] is not None and math.isfinite(record[key]), (step, key)
        batches = step_batches(train, step)
        tokens_seen += sum(int((b["doc_ids"] >= 0).sum()) for b in batches)
        supervised_seen += (PAIRS * ACCUMULATION * supervised_per_pair if supervised_per_pair
                            else sum(int((b["labels"] != -100).sum()) for b in batches))
        assert record["train/num_input_tokens_seen"] == tokens_seen
        assert record["train/num_supervised_tokens_seen"] == supervised_seen
        assert record["train/samples_per_second"] == pytest.approx(PAIRS * ACCUMULATION / record["system/step_time_s"])


def check_same_curve(runs, keys):
    reference = next(iter(runs.values()))[1]
    for run, (_, records, _, _) in runs.items():
        for ours, theirs in zip(records, reference):
            assert ours.keys() == theirs.keys(), run
            for key in set(keys) & theirs.keys():
                assert ours[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), (run, key)  # fp32 log-prob noise


@pytest.mark.parametrize("run", DPO_RUNS, ids=[f"ws{w}-zero{z}" for w, z in DPO_RUNS])
def test_dpo_metrics_match_independent_references(dpo_runs, data, sft_export, run):
    world_size, zero = run
    out_dir, records, run_config, stdout = dpo_runs[run]
    train, val = data
    assert run_config["from_weight_path"] == str(sft_export)
    check_keys_and_counts(records, train, DPO_KEYS)

    # Step 1: the policy is the reference, so every reward is exactly 0 (no win) and every pair loses log 2.
    first = records[0]
    assert first["train/loss"] == pytest.approx(math.log(2), rel=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert first[key] == 0.0, key
    sft = load_pretrained(sft_export)
    docs = [doc for batch in step_batches(train, 1) for doc in batch_docs(batch)]
    logps = torch.stack([row_logps(sft, ids, mask) for ids, mask in docs])
    chosen = torch.cat([logps[i * 2 * PAIRS: i * 2 * PAIRS + PAIRS] for i in range(ACCUMULATION)])
    rejected = torch.cat([logps[i * 2 * PAIRS + PAIRS: (i + 1) * 2 * PAIRS] for i in range(ACCUMULATION)])
    assert first["logps/chosen"] == pytest.approx(chosen.mean().item(), rel=1e-5)
    assert first["logps/rejected"] == pytest.approx(rejected.mean().item(), rel=1e-5)
    # Its gradient: d/dθ of mean −log σ(β·h) at h = 0, the reference's log-probs held constant.
    loss = -F.logsigmoid(BETA * ((chosen - chosen.detach()) - (rejected - rejected.detach()))).mean()
    loss.backward()
    norm = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in sft.parameters()))
    assert first["train/grad_norm"] == pytest.approx(norm, rel=1e-5)

    # Model FLOPs: policy forward + backward and reference forward, logits only at the answer tokens.
    config = sft.config
    for step, record in enumerate(records, start=1):
        batches = step_batches(train, step)
        lengths = [int(n) for b in batches for n in (b["doc_ids"] >= 0).sum(dim=1)]
        targets = sum(int((b["labels"] != -100).sum()) for b in batches)
        flops = 4 * forward_flops(config, lengths, lm_head_tokens=targets)
        assert record["train/tflops_per_device"] == pytest.approx(
            flops / record["system/step_time_s"] / world_size / 1e12)

    # The final evaluation, after training: the exported policy against the SFT reference, over every val pair.
    policy = load_pretrained(out_dir / "export")
    pairs = list(zip(store_docs(val.chosen), store_docs(val.rejected)))
    with torch.no_grad():
        pi = [(row_logps(policy, *c), row_logps(policy, *r)) for c, r in pairs]
        ref = [(row_logps(sft, *c), row_logps(sft, *r)) for c, r in pairs]
    margins = [BETA * ((pc - rc) - (pr - rr)).item() for (pc, pr), (rc, rr) in zip(pi, ref)]
    last = records[-1]
    assert last["eval/loss"] == pytest.approx(sum(math.log1p(math.exp(-m)) for m in margins) / len(val), rel=1e-5)
    assert last["eval/rewards/margins"] == pytest.approx(sum(margins) / len(val), rel=1e-4, abs=1e-7)
    check_wins(last["eval/rewards/accuracies"], margins)
    assert last["eval/logps/chosen"] == pytest.approx(sum(pc.item() for pc, _ in pi) / len(val), rel=1e-5)
    assert last["eval/perplexity"] is None  # a per-pair loss has no perplexity

    # The reference is a frozen copy; under ZeRO-3 an inference engine holding this rank's shards only.
    held, total = map(float, re.search(r"frozen reference: ([\d.]+)M of its ([\d.]+)M", stdout).groups())
    assert held < 0.55 * total if zero == "3" else held == total


def test_dpo_loss_curve_is_the_same_under_every_zero_stage_and_world_size(dpo_runs):
    check_same_curve(dpo_runs, ["train/loss", "train/grad_norm", "rewards/margins", "logps/chosen", "eval/loss"])


@pytest.mark.parametrize("run", REWARD_RUNS, ids=[f"ws{w}-zero{z}" for w, z in REWARD_RUNS])
def test_reward_metrics_match_independent_references(reward_runs, data, sft_export, run):
    out_dir, records, run_config, _ = reward_runs[run]
    train, val = data
    assert run_config["from_weight_path"] == str(sft_export)
    check_keys_and_counts(records, train, REWARD_KEYS, supervised_per_pair=2)

    # A fresh value head scores everything 0: step 1 is exactly at chance.
    first = records[0]
    assert first["train/loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert first["reward/margin"] == 0.0 and first["reward/accuracy"] == 0.0

    # The final evaluation from the exported reward model (value head included), sequence by sequence.
    model = load_reward_model(out_dir / "export")
    with torch.no_grad():
        scores = [(model(c[None]).values[0, -1].item(), model(r[None]).values[0, -1].item())
                  for (c, _), (r, _) in zip(store_docs(val.chosen), store_docs(val.rejected))]
    margins = [c - r for c, r in scores]
    last = records[-1]
    assert any(m != 0 for m in margins)  # the head trained
    assert last["eval/loss"] == pytest.approx(sum(math.log1p(math.exp(-m)) for m in margins) / len(val), rel=1e-5)
    assert last["eval/reward/margin"] == pytest.approx(sum(margins) / len(val), rel=1e-4, abs=1e-7)
    check_wins(last["eval/reward/accuracy"], margins)


def test_reward_loss_curve_is_the_same_under_every_zero_stage_and_world_size(reward_runs):
    check_same_curve(reward_runs, ["train/loss", "train/grad_norm", "reward/margin", "eval/loss"])
