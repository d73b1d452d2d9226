"""BatchLoader / PromptLoader on synthetic stores whose every token id is unique, so a batch
position can be traced back to exactly one (document, position) of the store."""

import numpy as np
import pytest
import torch

from data.loader import IGNORE_INDEX, BatchLoader
from data.prompts import PromptLoader
from data.store import PairedStore, StoreWriter, TokenStore

PAD = 0
FIRST_ID = 3  # ids below are reserved for pad/special tokens and never appear as data here
VOCAB = 30_000


def build_store(directory, doc_lengths, sources=None, random_mask=False, first_id=FIRST_ID, answers=None, seed=0):
    """Document i holds consecutive ids; ids are unique across the store."""
    sources = [0] * len(doc_lengths) if sources is None else sources
    writer = StoreWriter(directory, VOCAB, [f"source{s}" for s in range(max(sources) + 1)])
    rng = np.random.default_rng(seed)
    next_id = first_id
    for i, length in enumerate(doc_lengths):
        mask = rng.integers(0, 2, length) if random_mask else np.ones(length)
        writer.append(np.arange(next_id, next_id + length), mask, sources[i],
                      answer=None if answers is None else answers[i])
        next_id += length
    writer.finish({"kind": "test", "pad_id": PAD}, with_answers=answers is not None)
    return TokenStore(directory)


def random_lengths(count, seed=0, longest=40):
    return np.random.default_rng(seed).integers(1, longest, count).tolist()


class Trace:
    """Where each token id of a store lives: its document and the next id of that document."""

    def __init__(self, store):
        self.store = store
        self.tokens = np.asarray(store.tokens).astype(np.int64)
        self.mask = np.asarray(store.loss_mask)
        self.first_id = int(self.tokens[0])
        position = np.arange(len(self.tokens))
        self.doc_of = np.searchsorted(store.offsets, position, side="right") - 1
        self.position_in_doc = position - store.offsets[self.doc_of]

    def index(self, token_id):
        return int(token_id) - self.first_id

    def expected_label(self, token_id, next_in_row):
        """The target for a position holding token_id, followed in the row by next_in_row."""
        g = self.index(token_id)
        next_in_doc = g + 1 < len(self.tokens) and self.doc_of[g + 1] == self.doc_of[g]
        if next_in_doc and next_in_row == token_id + 1 and self.mask[g + 1]:
            return token_id + 1
        return IGNORE_INDEX


def all_batches(make_loader, world_size, epoch=0):
    return [list(make_loader(rank).iterate(epoch)) for rank in range(world_size)]


def non_pad_tokens(batches):
    return np.concatenate([b["input_ids"][b["doc_ids"] >= 0].numpy() for b in batches])


@pytest.fixture
def store(tmp_path):
    return build_store(tmp_path / "store", random_lengths(120), random_mask=True)


@pytest.mark.parametrize("world_size, batch_size", [(1, 3), (2, 4), (3, 1)])
def test_packed_epoch_reads_every_token_once(store, world_size, batch_size):
    seq_len = 16
    per_rank = all_batches(lambda rank: BatchLoader(store, batch_size, seq_len, rank, world_size, seed=5,
                                                    drop_last=False), world_size)
    tokens = np.sort(np.concatenate([non_pad_tokens(batches) for batches in per_rank]))
    assert tokens.tolist() == np.asarray(store.tokens).astype(np.int64).tolist()


@pytest.mark.parametrize("mode", ["packed", "padded"])
def test_labels_are_next_tokens_of_the_same_document(store, mode):
    trace = Trace(store)
    loader = BatchLoader(store, batch_size=4, seq_len=16, seed=1, mode=mode, drop_last=False)
    checked = 0
    for batch in loader.iterate(0):
        rows = zip(batch["input_ids"].tolist(), batch["labels"].tolist(), batch["doc_ids"].tolist())
        for ids, labels, doc_ids in rows:
            for t, (token, label) in enumerate(zip(ids, labels)):
                if doc_ids[t] < 0:
                    assert token == PAD and label == IGNORE_INDEX
                    continue
                next_in_row = ids[t + 1] if t + 1 < len(ids) and doc_ids[t + 1] >= 0 else None
                assert label == trace.expected_label(token, next_in_row)
                checked += label != IGNORE_INDEX
    assert checked > 0


@pytest.mark.parametrize("mode", ["packed", "padded"])
def test_doc_ids_and_positions_follow_the_documents(store, mode):
    trace = Trace(store)
    seq_len = 16
    for batch in BatchLoader(store, batch_size=5, seq_len=seq_len, seed=2, mode=mode, drop_last=False).iterate(0):
        for ids, doc_ids, positions in zip(batch["input_ids"], batch["doc_ids"], batch["position_ids"]):
            real = doc_ids >= 0
            filled = int(real.sum())
            assert real[:filled].all() and (positions[~real] == 0).all()  # padding only at the end
            assert (ids[~real] == PAD).all()
            if filled == 0:
                continue  # an all-padding row completing the last batch (drop_last=False)
            segments = doc_ids[:filled]
            starts = torch.cat([torch.tensor([True]), segments[1:] != segments[:-1]])
            assert (segments[starts] == torch.arange(int(starts.sum()))).all()  # 0, 1, 2, ... per row
            for t in range(filled):
                g = trace.index(ids[t])
                if starts[t]:
                    assert positions[t] == 0
                    # a row's later segments are whole documents' starts; only the first may continue one
                    assert trace.position_in_doc[g] == 0 or t == 0
                else:
                    assert ids[t] == ids[t - 1] + 1 and trace.doc_of[g] == trace.doc_of[g - 1]
                    assert positions[t] == positions[t - 1] + 1
                if mode == "padded":
                    assert positions[t] == trace.position_in_doc[g]


@pytest.mark.parametrize("mode", ["packed", "padded"])
def test_resume_reproduces_the_remaining_batches(store, mode):
    def make():
        return BatchLoader(store, batch_size=3, seq_len=16, rank=1, world_size=2, seed=7, mode=mode)
    full = list(make().iterate(epoch=3))
    resume_at = len(full) // 2
    resumed = list(make().iterate(epoch=3, start_batch=resume_at))
    assert len(resumed) == len(full) - resume_at > 0
    for expected, actual in zip(full[resume_at:], resumed):
        assert all(torch.equal(expected[name], actual[name]) for name in expected)


def test_epochs_differ_and_are_deterministic(store):
    loader = BatchLoader(store, batch_size=3, seq_len=16, seed=7)
    first = torch.cat([b["input_ids"] for b in loader.iterate(0)])
    again = torch.cat([b["input_ids"] for b in BatchLoader(store, batch_size=3, seq_len=16, seed=7).iterate(0)])
    second = torch.cat([b["input_ids"] for b in loader.iterate(1)])
    assert torch.equal(first, again) and not torch.equal(first, second)


@pytest.mark.parametrize("mode", ["packed", "padded"])
def test_ranks_get_disjoint_rows_and_equal_counts(store, mode):
    world_size = 3
    loaders = [BatchLoader(store, batch_size=2, seq_len=16, rank=r, world_size=world_size, seed=3, mode=mode)
               for r in range(world_size)]
    counts = {len(loader) for loader in loaders}
    assert len(counts) == 1 and counts.pop() > 0
    seen = [set(non_pad_tokens(list(loader.iterate(0))).tolist()) for loader in loaders]
    assert [len(list(loader.iterate(0))) for loader in loaders] == [len(loader) for loader in loaders]
    for a in range(world_size):
        for b in range(a + 1, world_size):
            assert not seen[a] & seen[b]


def test_mixture_weights_set_each_sources_share(tmp_path):
    sizes = [30, 90]
    sources = [0] * sizes[0] + [1] * sizes[1]
    store = build_store(tmp_path / "mix", random_lengths(sum(sizes), seed=4), sources)
    trace = Trace(store)
    weights = [0.5, 0.5]
    loader = BatchLoader(store, batch_size=7, seq_len=64, mode="padded", weights=weights, drop_last=False)
    first_tokens = [b["input_ids"][b["doc_ids"][:, 0] >= 0, 0] for b in loader.iterate(0)]
    docs = trace.doc_of[[trace.index(t) for t in torch.cat(first_tokens).tolist()]]
    per_doc = np.bincount(docs, minlength=len(store))
    for source, weight in enumerate(weights):
        members = per_doc[store.source == source]
        wanted = round(weight * len(store))
        assert members.sum() == wanted
        # upsampled sources repeat whole copies; subsampled ones never repeat a document
        assert members.max() - members.min() <= 1 and members.max() == -(-wanted // len(members))


@pytest.mark.parametrize("mode, drop_last", [("packed", True), ("packed", False), ("padded", True), ("padded", False)])
def test_padding_fraction_equals_a_direct_count(store, mode, drop_last):
    world_size = 2
    loaders = [BatchLoader(store, batch_size=7, seq_len=24, rank=r, world_size=world_size, seed=9, mode=mode,
                           drop_last=drop_last) for r in range(world_size)]
    assert loaders[0].layout(0).num_rows % (7 * world_size)  # some rows are dropped or completed
    batches = [batch for loader in loaders for batch in loader.iterate(0)]
    padding = sum(int((b["doc_ids"] < 0).sum()) for b in batches)
    positions = sum(b["doc_ids"].numel() for b in batches)
    assert loaders[0].padding_fraction() == pytest.approx(padding / positions)
    assert padding > 0 if mode == "padded" else True


def test_dpo_batches_stack_chosen_then_rejected_of_the_same_pairs(tmp_path):
    lengths = random_lengths(40, seed=6)
    chosen = build_store(tmp_path / "chosen", lengths)
    rejected = build_store(tmp_path / "rejected", random_lengths(40, seed=7), first_id=FIRST_ID + 10_000)
    pairs = PairedStore(chosen, rejected)
    chosen_trace, rejected_trace = Trace(chosen), Trace(rejected)
    batch_size = 4
    loader = BatchLoader(pairs, batch_size, seq_len=32, mode="padded", seed=1)
    assert len(loader) == len(pairs) // batch_size
    for batch in loader.iterate(0):
        assert batch["input_ids"].shape == (2 * batch_size, 32)
        for i in range(batch_size):
            chosen_doc = chosen_trace.doc_of[chosen_trace.index(batch["input_ids"][i, 0])]
            rejected_doc = rejected_trace.doc_of[rejected_trace.index(batch["input_ids"][batch_size + i, 0])]
            assert chosen_doc == rejected_doc


def test_bad_options_are_rejected(store):
    with pytest.raises(ValueError, match="weights"):
        BatchLoader(store, 2, 16, weights=[0.5, 0.5])
    with pytest.raises(ValueError, match="rank 2"):
        BatchLoader(store, 2, 16, rank=2, world_size=2)
    with pytest.raises(ValueError, match="start_batch"):
        next(BatchLoader(store, 2, 16).iterate(0, start_batch=10**6))


@pytest.mark.parametrize("drop_last", [True, False])
def test_prompt_loader_splits_prompts_across_ranks(tmp_path, drop_last):
    count = 23
    answers = [f"answer {i}" for i in range(count)]
    store = build_store(tmp_path / "rl", random_lengths(count, seed=8), answers=answers)
    world_size, batch_size = 2, 3
    loaders = [PromptLoader(store, batch_size, rank, world_size, seed=4, drop_last=drop_last)
               for rank in range(world_size)]
    rows_per_step = batch_size * world_size
    assert len(loaders[0]) == len(loaders[1]) == (count // rows_per_step if drop_last else -(-count // rows_per_step))
    seen = []
    for loader in loaders:
        for batch in loader.iterate(0):
            for doc, prompt, answer in zip(batch["doc_index"], batch["prompt_ids"], batch["answers"]):
                assert prompt == store.doc(doc)[0].tolist() and answer == answers[doc]
                seen.append(doc)
    assert len(seen) == len(set(seen)) == (len(loaders[0]) * rows_per_step if drop_last else count)
