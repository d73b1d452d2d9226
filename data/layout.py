"""Epoch layouts shared by every loader: which documents an epoch reads, how preference pairs fill rows, and which
rows a rank gets.

Everything is a pure function of (seed, epoch) and the store, so all ranks agree without
communicating and a resumed run recomputes exactly the order it was interrupted in.
"""

import numpy as np

EMPTY_ROW = -1  # a row index past the end of the epoch: an all-padding row (drop_last=False only)


def epoch_documents(source: np.ndarray, seed: int, epoch: int, weights=None) -> np.ndarray:
    """Indices of the documents read in this epoch, shuffled.

    Without weights every document appears once. With weights, source s contributes
    round(weights[s] * N) documents (N = all documents): whole copies of the source
    while it fits (upsampling), then a random subset of it (subsampling).
    """
    rng = np.random.default_rng([seed, epoch])
    if weights is None:
        return rng.permutation(len(source))
    picked = []
    for source_index, weight in enumerate(weights):
        members = np.flatnonzero(source == source_index)
        wanted = round(weight * len(source))
        if wanted and not len(members):
            raise ValueError(f"source {source_index} has weight {weight} but no documents in this split")
        copies, remainder = divmod(wanted, max(len(members), 1))
        picked += [members] * copies + [rng.permutation(members)[:remainder]]
    return rng.permutation(np.concatenate(picked))


def rank_batches(num_rows: int, batch_size: int, rank: int, world_size: int, drop_last: bool = True) -> np.ndarray:
    """[num_batches, batch_size] global row indices of this rank's batches.

    Rank r takes rows r, r+W, r+2W, ...; batch i of every rank together covers rows
    [i*B*W, (i+1)*B*W). drop_last drops the rows that would not fill a batch on every
    rank; otherwise the last batches are completed with EMPTY_ROW so that every rank
    still runs the same number of steps.
    """
    rows_per_step = batch_size * world_size
    num_batches = num_rows // rows_per_step if drop_last else -(-num_rows // rows_per_step)
    rows = np.arange(num_batches * rows_per_step).reshape(num_batches, batch_size, world_size)[:, :, rank]
    return np.where(rows < num_rows, rows, EMPTY_ROW)


def batches_from(batches, start_batch: int):
    """An epoch's batches from start_batch on: where a resumed run continues (0 to len(batches), the end)."""
    if not 0 <= start_batch <= len(batches):
        raise ValueError(f"start_batch {start_batch} is not in [0, {len(batches)}]")
    return batches[start_batch:]


def check_loader_options(store, batch_size: int, rank: int, world_size: int, weights):
    if len(store) == 0:
        raise ValueError(f"{store!r} has no documents")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if weights is not None and (len(weights) != store.num_sources or min(weights) < 0):
        raise ValueError(f"weights {list(weights)} must be {store.num_sources} non-negative numbers, "
                         f"one per source of {store!r}")


def fit_pair_lengths(chosen: np.ndarray, rejected: np.ndarray, seq_len: int) -> np.ndarray:
    """[N, 2] (chosen, rejected) lengths kept when each pair must fit one row of seq_len tokens.

    A pair that fits is kept whole. Otherwise its sides are cut at their ends, the shorter one kept whole when it
    holds at most half the row, else the chosen side keeping ceil(T/2) tokens and the rejected side floor(T/2):
    the longest prefixes of both that fit together.
    """
    chosen = np.minimum(chosen, seq_len)
    kept_chosen = np.minimum(chosen, np.maximum(seq_len - rejected, -(-seq_len // 2)))
    return np.stack([kept_chosen, np.minimum(rejected, seq_len - kept_chosen)], axis=1)


def pack_pairs(pair_tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """[rows + 1] boundaries: row r holds pairs row_starts[r]:row_starts[r + 1] of the epoch's order.

    pair_tokens: each pair's kept length (both sides), at most seq_len. Greedy in order: a row takes the next
    pairs while they fit, and never splits one.
    """
    stream_ends = np.cumsum(pair_tokens)
    row_starts = [0]
    while row_starts[-1] < len(pair_tokens):
        row_start = stream_ends[row_starts[-1] - 1] if row_starts[-1] else 0
        row_starts.append(int(np.searchsorted(stream_ends, row_start + seq_len, side="right")))
    return np.asarray(row_starts, dtype=np.int64)
