"""Packed preference pairs (--packing packed for dpo and reward): the same losses and counts as the padded rows of
the same pairs, every pair once per epoch and never split, and a real 2-rank run of each stage."""
from __future__ import annotations

import math
from itertools import islice

import numpy as np
import pytest
import torch

from data.layout import EMPTY_ROW, fit_pair_lengths, pack_pairs
from data.loader import IGNORE_INDEX, BatchLoader, EpochLayout
from data.mixture import load_data_config
from data.prepare import load_prepared
from data.store import PairedStore
from data.tokenizer import load_tokenizer
from model import ModelConfig, RewardModel, Transformer
from tests.launch import CONTRACT, REPO_ROOT, read_metrics, read_run_config, run_stage, same_work
from tests.test_preference_runs import out_root  # noqa: F401 (the fixture: an SFT export for --from_weight sft)
from tests.test_data_loader import FIRST_ID, Trace, build_store, random_lengths
from train.dpo import DPOStage
from train.reward import RewardStage

SEQ_LEN = 48


@pytest.fixture
def pairs(tmp_path):
    # Sides of 1..23 tokens: every pair fits a row of SEQ_LEN whole, as padded rows hold them.
    chosen = build_store(tmp_path / "chosen", random_lengths(40, seed=1, longest=24), random_mask=True, seed=1)
    rejected = build_store(tmp_path / "rejected", random_lengths(40, seed=2, longest=24), random_mask=True,
                           first_id=FIRST_ID + 3000, seed=2)
    return PairedStore(chosen, rejected)


def pair_docs(loader: BatchLoader, epoch: int, rows: np.ndarray) -> np.ndarray:
    """The store indices of the pairs a packed batch of these rows holds, in its sequence order."""
    layout = loader.layout(epoch)
    return np.concatenate([[]] + [layout.documents[layout.row_starts[row]:layout.row_starts[row + 1]]
                                  for row in rows if row != EMPTY_ROW]).astype(np.int64)


def padded_batch_of(store: PairedStore, docs: np.ndarray, padding_pairs: int = 0) -> dict:
    """The padded [2P, T] batch of exactly these pairs in this order (and all-padding pairs after them)."""
    loader = BatchLoader(store, len(docs) + padding_pairs, SEQ_LEN, mode="padded")
    rows = np.concatenate([np.arange(len(docs)), np.full(padding_pairs, EMPTY_ROW)])
    return loader.collate(EpochLayout(docs, len(docs)), rows)


def packed_batches(store: PairedStore) -> list[tuple[dict, dict]]:
    """(packed batch, padded batch of the same pairs) for an epoch's first and last batches, the last ending in an
    empty row and its padded twin in a padding pair, as evaluation batches do."""
    loader = BatchLoader(store, 3, SEQ_LEN, seed=4, mode="packed", drop_last=False)
    batches = loader.batches(0)[[0, -1]]
    assert (batches[-1] == EMPTY_ROW).any()
    return [(loader.collate(loader.layout(0), rows),
             padded_batch_of(store, pair_docs(loader, 0, rows), padding_pairs=int((rows == EMPTY_ROW).sum())))
            for rows in batches]


def tiny(seed: int) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_preset("tiny"))


def assert_same_outputs(packed, padded):
    assert packed.loss_sum.item() == pytest.approx(padded.loss_sum.item(), rel=1e-5, abs=1e-6)
    assert packed.extras.keys() == padded.extras.keys()
    for name, (value, count) in packed.extras.items():
        assert count == padded.extras[name][1], name
        assert value.item() == pytest.approx(padded.extras[name][0].item(), rel=1e-5, abs=1e-5), name


@pytest.mark.parametrize("kind", ["sigmoid", "ipo"])
def test_dpo_on_packed_pairs_equals_dpo_on_padded_rows(pairs, kind):
    stage = DPOStage()
    stage.beta, stage.kind, stage.reference = 0.3, kind, tiny(0).eval()
    policy, config = tiny(1), tiny(1).config  # another model than the reference: log-ratios far from 0
    for packed, padded in packed_batches(pairs):
        packed, padded = stage.prepare_batch(packed), stage.prepare_batch(padded)
        assert packed["pairs"] == padded["pairs"]
        assert_same_outputs(stage.loss(policy, packed), stage.loss(policy, padded))
        assert same_work(stage.batch_stats(packed, config), stage.batch_stats(padded, config))


def test_reward_on_packed_pairs_equals_reward_on_padded_rows(pairs):
    torch.manual_seed(0)
    model = RewardModel(ModelConfig.from_preset("tiny"))
    torch.nn.init.normal_(model.value_head.weight, std=0.5)  # a trained head, not the zero start
    stage = RewardStage()
    for packed, padded in packed_batches(pairs):
        packed, padded = stage.prepare_batch(packed), stage.prepare_batch(padded)
        assert same_work(stage.batch_stats(packed, model.config), stage.batch_stats(padded, model.config))
        assert_same_outputs(stage.loss(model, packed), stage.loss(model, padded))


def answers_of(batch: dict, traces: list[Trace]) -> dict[int, list[tuple[int, int]]]:
    """Per answer of the batch (sequence id), its (side, store document) as traced from its tokens, checking on the
    way that the answer is one whole segment: store-consecutive tokens, positions 0.., labels inside it."""
    answers = {}
    for ids, doc_ids, positions, labels, sequences in zip(
            *(batch[name] for name in ("input_ids", "doc_ids", "position_ids", "labels", "sequence_ids"))):
        for sequence in sequences[sequences >= 0].unique().tolist():
            where = (sequences == sequence).nonzero().squeeze(1)
            assert (where.diff() == 1).all() and len(doc_ids[where].unique()) == 1  # one contiguous segment
            assert (positions[where] == torch.arange(len(where))).all()
            side = int(ids[where[0]] >= FIRST_ID + 3000)
            trace = traces[side]
            g = trace.index(ids[where[0]])
            assert trace.position_in_doc[g] == 0 and (ids[where] == ids[where[0]] + torch.arange(len(where))).all()
            document = int(trace.doc_of[g])
            assert len(where) == trace.store.doc_lengths[document]  # whole: these pairs all fit a row
            for t in where.tolist():  # a label is the next token of the same answer, where the mask says so
                inside = t + 1 < len(ids) and t + 1 in where
                expected = int(ids[t + 1]) if inside and trace.mask[g + t - int(where[0]) + 1] else IGNORE_INDEX
                assert labels[t] == expected
            answers[sequence] = (side, document)
    return answers


def test_every_pair_once_per_epoch_across_two_ranks_never_split(pairs):
    traces = [Trace(pairs.chosen), Trace(pairs.rejected)]

    def loaders():
        return [BatchLoader(pairs, 2, SEQ_LEN, rank, 2, seed=8, mode="packed", drop_last=False) for rank in (0, 1)]

    seen = []
    for loader in loaders():
        for batch in loader.iterate(1):
            answers = answers_of(batch, traces)
            count = len(answers) // 2
            assert sorted(answers) == list(range(2 * count))
            for p in range(count):  # answer p and answer count + p: the chosen and rejected of one pair
                assert answers[p][0] == 0 and answers[count + p] == (1, answers[p][1])
                seen.append(answers[p][1])
    assert sorted(seen) == list(range(len(pairs)))
    # Deterministic from (seed, epoch): fresh loaders, and a resumed one, read the same batches.
    for loader, again in zip(loaders(), loaders()):
        full = list(loader.iterate(1))
        assert len(full) == len(loader) == len(again) > 1
        for expected, actual in zip(full[1:], again.iterate(1, start_batch=1)):
            assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)
    assert not torch.equal(next(loaders()[0].iterate(0))["input_ids"], next(loaders()[0].iterate(1))["input_ids"])


@pytest.mark.parametrize("drop_last, weights", [(True, [1.0]), (False, None)])
def test_packed_pair_padding_fraction_equals_a_direct_count(pairs, drop_last, weights):
    loaders = [BatchLoader(pairs, 3, SEQ_LEN, rank, 2, seed=9, mode="packed", weights=weights, drop_last=drop_last)
               for rank in (0, 1)]
    assert loaders[0].layout(0).num_rows % 6  # some rows are dropped or completed
    batches = [batch for loader in loaders for batch in loader.iterate(0)]
    padding = sum(int((b["doc_ids"] < 0).sum()) for b in batches)
    assert loaders[0].padding_fraction(0) == pytest.approx(padding / sum(b["doc_ids"].numel() for b in batches))


def test_a_pair_longer_than_a_row_keeps_the_longest_prefixes_that_fit():
    chosen, rejected = np.array([5, 30, 8, 20, 40, 3]), np.array([6, 8, 30, 20, 9, 40])
    assert fit_pair_lengths(chosen, rejected, 25).tolist() == [[5, 6], [17, 8], [8, 17], [13, 12], [16, 9], [3, 22]]
    # Greedy, in order, whole pairs: rows of 25 take 11 | 25 | 25 | 25 | 25 | 25 tokens.
    assert pack_pairs(np.array([11, 25, 25, 25, 25, 25]), 25).tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert pack_pairs(np.array([10, 10, 5, 20, 4, 1]), 25).tolist() == [0, 3, 6]


def test_packed_pairs_cut_to_fit_are_the_kept_prefixes(tmp_path):
    chosen = build_store(tmp_path / "chosen", [30, 5, 20])
    rejected = build_store(tmp_path / "rejected", [10, 30, 20], first_id=FIRST_ID + 3000)
    loader = BatchLoader(PairedStore(chosen, rejected), 3, 25, mode="packed", drop_last=False)
    layout = loader.layout(0)
    batch = next(loader.iterate(0))
    kept = {int(document): lengths.tolist() for document, lengths in zip(layout.documents, layout.kept_lengths)}
    assert kept == {0: [15, 10], 1: [5, 20], 2: [13, 12]}
    count = 3
    for row in range(3):  # one pair a row here
        pair = row
        for side, store in enumerate((chosen, rejected)):
            document = int(layout.documents[pair])
            where = batch["sequence_ids"][row] == side * count + pair
            assert batch["input_ids"][row][where].tolist() == store.doc(document)[0][:kept[document][side]].tolist()


# ------------------------------------------------------------ real runs at world size 2

DATA_CONFIG = "config/data/posttrain/dpo/demo.yaml"
ROWS, ACCUMULATION, STEPS, SEED = 2, 1, 2, 42


@pytest.fixture(scope="module")
def demo_batches():
    """Each rank's first STEPS packed micro-batches of the demo pairs, as the runs must read them."""
    config = load_data_config(REPO_ROOT / DATA_CONFIG)
    prepared = load_prepared(config, load_tokenizer())
    return [list(islice(BatchLoader(prepared.split("train"), ROWS, config.max_seq_len, rank, 2, SEED, "packed",
                                    weights=prepared.weights).iterate(0), STEPS * ACCUMULATION)) for rank in (0, 1)]


@pytest.mark.parametrize("stage, keys", [("dpo", ["rewards/chosen", "rewards/margins", "logps/chosen"]),
                                         ("reward", ["reward/accuracy", "reward/margin"])])
def test_packed_run_at_world_size_two(stage, keys, out_root, demo_batches, tmp_path):  # noqa: F811
    run_stage(stage, tmp_path, "--out_root", str(out_root), "--from_weight", "sft", "--packing", "packed",
              "--batch_size", str(ROWS), "--accumulation_steps", str(ACCUMULATION), "--max_steps", str(STEPS),
              "--log_interval", "1", "--eval_interval", "0", "--eval_batches", "1", "--save_interval", "0",
              "--throughput_warmup_steps", "0", "--seed", str(SEED), world_size=2, zero="2")
    records = read_metrics(tmp_path)
    assert read_run_config(tmp_path)["data"]["mode"] == "packed"
    assert [r["train/global_step"] for r in records] == list(range(1, STEPS + 1))
    for record in records:
        for key in CONTRACT + keys:
            assert record[key] is not None and math.isfinite(record[key]), key
    assert math.isfinite(records[-1]["eval/loss"])
    # Step 1 starts at the reference (dpo) or from a zero value head (reward): log 2 per pair, so the loss is
    # normalised by exactly the pairs read.
    assert records[0]["train/loss"] == pytest.approx(math.log(2), rel=1e-6)
    step_pairs = [sum(int(batches[step]["sequence_ids"].max() + 1) // 2 for batches in demo_batches)
                  for step in range(STEPS)]
    tokens = [sum(int((batches[step]["doc_ids"] >= 0).sum()) for batches in demo_batches) for step in range(STEPS)]
    for step, record in enumerate(records):
        assert record["train/num_input_tokens_seen"] == sum(tokens[:step + 1])
        assert record["train/samples_per_second"] * record["system/step_time_s"] == pytest.approx(step_pairs[step])
    supervised = [sum(int((batches[step]["labels"] != IGNORE_INDEX).sum()) for batches in demo_batches)
                  if stage == "dpo" else 2 * step_pairs[step] for step in range(STEPS)]
    assert records[-1]["train/num_supervised_tokens_seen"] == sum(supervised)
