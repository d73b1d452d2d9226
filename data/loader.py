"""Deterministic, resumable, distributed training batches from a token store.

Batch contract: a dict of CPU long tensors, [R, T]:

  input_ids     token ids; the pad id in padding
  labels        PRE-SHIFTED: labels[b, t] is the target for position t, i.e. input_ids[b, t+1]
                when that is the next token of the same document and its loss_mask is 1;
                IGNORE_INDEX (-100) otherwise: padding, the last token of each document
                segment in the row, and unsupervised targets (prompts, system turns)
  doc_ids       index of the document segment within the row (0, 1, 2, ...), -1 on padding
  position_ids  0, 1, 2, ... restarting at each document segment; 0 on padding

One store, R = B rows:
  packed: the epoch's shuffled documents are laid end to end and cut every T tokens (greedy
  fill); a document cut at a row end continues the next row as a new segment, positions
  restarting at 0. Only the epoch's last row is padded.
  padded: one document per row, truncated to T, right-padded.

Preference pairs (PairedStore):
  padded: R = 2B, one answer per row: the B chosen answers, then the B rejected answers of the same
  pairs, each truncated to T.
  packed: R = B rows of whole pairs, greedy in the epoch's order (data/layout.py: pack_pairs), each
  pair a chosen segment then its rejected segment; a pair longer than T is cut to fit one row
  (fit_pair_lengths). One more tensor says which answer each token belongs to:
  sequence_ids  [B, T] in the padded rows' order: the chosen answers of the batch's P pairs are
                0..P-1, their rejected answers P..2P-1; -1 on padding
"""

from dataclasses import dataclass

import numpy as np
import torch

from data.layout import (EMPTY_ROW, batches_from, check_loader_options, epoch_documents, fit_pair_lengths, pack_pairs,
                         rank_batches)
from data.store import PairedStore

IGNORE_INDEX = -100
MODES = ("packed", "padded")


@dataclass
class EpochLayout:
    documents: np.ndarray  # document indices in the order this epoch reads them
    num_rows: int
    stream_starts: np.ndarray | None = None  # packed: where each document starts in the epoch's token stream
    kept_lengths: np.ndarray | None = None  # packed pairs: [n, 2] tokens kept of each pair's chosen, rejected
    row_starts: np.ndarray | None = None  # packed pairs: row r holds pairs documents[row_starts[r]:row_starts[r+1]]


class BatchLoader:
    """Batches of one store split for one rank.

    weights: per-source sampling fractions (PreparedData.weights) for training on the mixture;
    None reads every document once per epoch (evaluation). drop_last=False completes the last
    batches with all-padding rows instead of dropping rows, so that evaluation sees everything.
    """

    def __init__(self, store, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 mode: str = "packed", weights=None, drop_last: bool = True):
        check_loader_options(store, batch_size, rank, world_size, weights)
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r} (valid: {', '.join(MODES)})")
        self.paired = isinstance(store, PairedStore)
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        self.stores = [store.chosen, store.rejected] if self.paired else [store]
        self.source = store.source
        self.pad_id = self.stores[0].meta["pad_id"]
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.mode, self.weights, self.drop_last = mode, weights, drop_last
        self._cached_layout = None

    def layout(self, epoch: int) -> EpochLayout:
        if self._cached_layout is None or self._cached_layout[0] != epoch:
            documents = epoch_documents(self.source, self.seed, epoch, self.weights)
            if self.mode == "padded":
                layout = EpochLayout(documents, len(documents))
            elif self.paired:
                kept = fit_pair_lengths(*(store.doc_lengths[documents] for store in self.stores), self.seq_len)
                row_starts = pack_pairs(kept.sum(axis=1), self.seq_len)
                layout = EpochLayout(documents, len(row_starts) - 1, kept_lengths=kept, row_starts=row_starts)
            else:
                lengths = self.stores[0].doc_lengths[documents]
                stream_starts = np.concatenate([[0], np.cumsum(lengths)])
                layout = EpochLayout(documents, -(-int(stream_starts[-1]) // self.seq_len), stream_starts)
            self._cached_layout = (epoch, layout)
        return self._cached_layout[1]

    def batches(self, epoch: int) -> np.ndarray:
        """[num_batches, B] global row indices of this rank's batches (EMPTY_ROW: all padding)."""
        return rank_batches(self.layout(epoch).num_rows, self.batch_size, self.rank, self.world_size, self.drop_last)

    def __len__(self):
        """Batches of the first epoch on this rank, the same on every rank (see batches(epoch) for another)."""
        return len(self.batches(0))

    def iterate(self, epoch: int, start_batch: int = 0):
        """This rank's batches of an epoch from start_batch on: resuming replays the same order."""
        layout = self.layout(epoch)
        for rows in batches_from(self.batches(epoch), start_batch):
            yield self.collate(layout, rows)

    def padding_fraction(self, epoch: int = 0) -> float:
        """Fraction of padding positions in the rows all ranks read in an epoch."""
        layout = self.layout(epoch)
        used_rows = self.batches(epoch).size * self.world_size
        real_rows = min(used_rows, layout.num_rows)
        if self.mode == "packed" and self.paired:
            tokens = int(layout.kept_lengths[:layout.row_starts[real_rows]].sum())
            return 1 - tokens / (used_rows * self.seq_len)
        if self.mode == "packed":
            tokens = min(int(layout.stream_starts[-1]), real_rows * self.seq_len)
            return 1 - tokens / (used_rows * self.seq_len)
        documents = layout.documents[:real_rows]
        tokens = sum(np.minimum(store.doc_lengths[documents], self.seq_len).sum() for store in self.stores)
        return 1 - int(tokens) / (used_rows * self.seq_len * len(self.stores))

    # ------------------------------------------------------------ collation

    def collate(self, layout: EpochLayout, rows: np.ndarray) -> dict:
        row_segments = self._row_segments(layout, rows)
        shape = (len(row_segments), self.seq_len)
        input_ids = np.full(shape, self.pad_id, dtype=np.int64)
        loss_mask = np.zeros(shape, dtype=np.uint8)
        doc_ids = np.full(shape, -1, dtype=np.int64)
        position_ids = np.zeros(shape, dtype=np.int64)
        for out_row, segments in enumerate(row_segments):
            filled = 0
            for segment, (store, document, start, length) in enumerate(segments):
                begin = store.offsets[document] + start
                end = filled + length
                input_ids[out_row, filled:end] = store.tokens[begin:begin + length]
                loss_mask[out_row, filled:end] = store.loss_mask[begin:begin + length]
                doc_ids[out_row, filled:end] = segment
                position_ids[out_row, filled:end] = np.arange(length)
                filled = end
        labels = np.full_like(input_ids, IGNORE_INDEX)
        # Padding has loss_mask 0, so it is never a target; a new segment is never the previous one's target.
        next_is_target = (doc_ids[:, 1:] == doc_ids[:, :-1]) & (loss_mask[:, 1:] == 1)
        labels[:, :-1] = np.where(next_is_target, input_ids[:, 1:], IGNORE_INDEX)
        batch = {"input_ids": input_ids, "labels": labels, "doc_ids": doc_ids, "position_ids": position_ids}
        if self.paired and self.mode == "packed":
            batch["sequence_ids"] = self._sequence_ids(layout, rows, doc_ids)
        return {name: torch.from_numpy(array) for name, array in batch.items()}

    def _row_segments(self, layout: EpochLayout, rows: np.ndarray) -> list[list[tuple]]:
        """Per output row, (store, document, start within it, length) of each of its segments in order."""
        if self.mode == "packed":
            segments_of = self._pair_segments if self.paired else self._packed_segments
            return [[] if row == EMPTY_ROW else segments_of(layout, row) for row in rows]
        row_segments = []
        for store in self.stores:  # pairs: the B chosen rows, then the B rejected rows
            for row in rows:
                if row == EMPTY_ROW:
                    row_segments.append([])
                    continue
                document = layout.documents[row]
                row_segments.append([(store, document, 0, min(int(store.doc_lengths[document]), self.seq_len))])
        return row_segments

    def _pair_segments(self, layout: EpochLayout, row: int) -> list[tuple]:
        """Each pair of the row as its chosen segment, then its rejected one."""
        return [(store, layout.documents[k], 0, int(length))
                for k in range(layout.row_starts[row], layout.row_starts[row + 1])
                for store, length in zip(self.stores, layout.kept_lengths[k])]

    def _sequence_ids(self, layout: EpochLayout, rows: np.ndarray, doc_ids: np.ndarray) -> np.ndarray:
        """Segment s of a row is side s % 2 (chosen, rejected) of the row's pair s // 2."""
        pairs_per_row = np.array([0 if row == EMPTY_ROW else layout.row_starts[row + 1] - layout.row_starts[row]
                                  for row in rows], dtype=np.int64)
        first_pair = np.cumsum(pairs_per_row) - pairs_per_row
        sequence = (doc_ids % 2) * pairs_per_row.sum() + first_pair[:, None] + doc_ids // 2
        return np.where(doc_ids >= 0, sequence, -1)

    def _packed_segments(self, layout: EpochLayout, row: int) -> list[tuple]:
        """Each piece of the epoch stream in this row."""
        row_start = row * self.seq_len
        row_end = min(row_start + self.seq_len, int(layout.stream_starts[-1]))
        k = int(np.searchsorted(layout.stream_starts, row_start, side="right")) - 1
        segments = []
        position = row_start
        while position < row_end:
            piece_end = min(int(layout.stream_starts[k + 1]), row_end)
            segments.append((self.stores[0], layout.documents[k], position - int(layout.stream_starts[k]),
                             piece_end - position))
            position = piece_end
            k += 1
        return segments
