"""Attention over packed documents: what each kernel costs, forward + backward, on this machine.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.attention [--lengths 512,2048,4096] [--repeats 5]

One attention layer of the `small` preset (8 query heads, 2 KV heads, head dim 64, fp32), 4,096 tokens a batch
(8 rows of 512, 2 of 2048, 1 of 4096), in two layouts: packed documents of realistic lengths (log-normal, median
256 tokens, cut at the row end, as the pretrain loader packs them) and one document filling each row. Candidates:

- dense:   SDPA with the [B, 1, T, T] boolean document mask (the path before this change);
- flex:    FlexAttention, compiled, with a create_block_mask document mask (no backward on a CPU);
- per-doc: model.attention's kernel: SDPA with is_causal on each document, a view of the flattened batch;
- bucket:  documents right-padded to a multiple of 64 and batched per padded length, one SDPA call per padded
           length (exact: a causal query never sees the padding after it), gathered and scattered back;
- causal:  SDPA is_causal=True with no mask, only when each row is one document.

Each candidate is warmed up (flex: compiled), then the candidates' forward + backward passes are timed in
--repeats interleaved rounds, the order flipping each round, and the median kept; one thread, since on a shared
two-core machine a second thread waits on the other jobs. The mask or layout is built once per forward and shared
by every layer, so it is timed apart ("build"). Peak memory is the process's peak resident set over one forward +
backward above the resident set before it (glibc made to return large blocks at once); "saved" is what autograd
keeps for backward. Ratios are dense's time over each one's.
"""
from __future__ import annotations

import argparse
import ctypes
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from model.attention import DocumentMask, Documents, _attend_pieces, _dense_sdpa, _transposed, attend

HEADS, KV_HEADS, HEAD_DIM, TOKENS = 8, 2, 64, 4096
_flex = torch.compile(flex_attention, dynamic=False)


def packed_rows(rows: int, seq_len: int, generator: torch.Generator) -> list[list[int]]:
    """Document lengths of each row: log-normal (median 256), the last one cut at the row end."""
    layout = []
    for _ in range(rows):
        lengths, filled = [], 0
        while filled < seq_len:
            length = int(torch.empty(1).log_normal_(5.545, 1.0, generator=generator).clamp(8, seq_len))
            lengths.append(min(length, seq_len - filled))
            filled += lengths[-1]
        layout.append(lengths)
    return layout


def doc_ids_of(layout: list[list[int]], seq_len: int) -> torch.Tensor:
    doc_ids = torch.full((len(layout), seq_len), -1)
    for row, lengths in enumerate(layout):
        doc_ids[row, :sum(lengths)] = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    return doc_ids


def dense(q, k, v, doc_ids):
    mask = DocumentMask(doc_ids)
    return lambda: _dense_sdpa(q, k, v, mask, 0.0)


def flex(q, k, v, doc_ids):
    def document_causal(b, h, q_idx, kv_idx):
        return (doc_ids[b, q_idx] == doc_ids[b, kv_idx]) & (kv_idx <= q_idx)
    block_mask = create_block_mask(document_causal, doc_ids.shape[0], None, doc_ids.shape[1], doc_ids.shape[1])
    return lambda: _transposed(_flex, q, k, v, block_mask=block_mask, enable_gqa=True)


def per_doc(q, k, v, doc_ids):
    pieces = Documents(doc_ids).pieces
    return lambda: _attend_pieces(q, k, v, pieces, 0.0)


def bucket(q, k, v, doc_ids, step=64):
    """Documents right-padded to a multiple of `step` and batched per padded length (exact: a causal query never
    sees the padding after it), gathered and scattered back with index_select."""
    documents = Documents(doc_ids)
    padded = -(-documents.lengths // step) * step
    source = torch.full((doc_ids.numel(),), int(padded.sum()))
    groups, offset = [], 0
    for length in np.unique(padded).tolist():
        members = np.flatnonzero(padded == length)
        slot = np.arange(length)
        reads = documents.starts[members, None] + np.minimum(slot, documents.lengths[members, None] - 1)
        real = slot < documents.lengths[members, None]
        slots = offset + np.arange(len(members) * length).reshape(len(members), length)
        source[reads[real]] = torch.from_numpy(slots[real])
        groups.append((torch.from_numpy(reads.ravel()), len(members), length))
        offset += len(members) * length

    def run():
        flat = [t.flatten(0, 1) for t in (q, k, v)]
        outs = [_transposed(F.scaled_dot_product_attention,
                            *(t.index_select(0, reads).view(count, length, -1, HEAD_DIM) for t in flat),
                            is_causal=True, enable_gqa=True).flatten(0, 1) for reads, count, length in groups]
        return torch.cat(outs + [q.new_zeros(1, HEADS, HEAD_DIM)]).index_select(0, source).view_as(q)
    return run


def causal(q, k, v, doc_ids):
    return lambda: attend(q, k, v, DocumentMask(), "sdpa")


def saved_bytes(run) -> int:
    sizes = {}

    def pack(tensor):
        sizes[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(sizes.values())


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field))


def prepare(name, make, doc_ids) -> dict:
    """The candidate built, warmed up (flex: compiled), and its memory measured over one forward + backward."""
    generator = torch.Generator().manual_seed(0)
    rows, seq_len = doc_ids.shape
    q = torch.randn(rows, seq_len, HEADS, HEAD_DIM, generator=generator, requires_grad=True)
    k, v = (torch.randn(rows, seq_len, KV_HEADS, HEAD_DIM, generator=generator, requires_grad=True)
            for _ in range(2))
    grad = torch.randn(rows, seq_len, HEADS, HEAD_DIM, generator=generator)
    start = time.perf_counter()
    run = make(q, k, v, doc_ids)
    build = time.perf_counter() - start
    run().backward(grad)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets the peak resident set
    before = rss_kib("VmRSS:")
    run().backward(grad)
    peak = (rss_kib("VmHWM:") - before) / 1024

    def step():
        q.grad = k.grad = v.grad = None
        start = time.perf_counter()
        run().backward(grad)
        return time.perf_counter() - start
    return dict(name=name, build=build, peak=peak, saved=saved_bytes(run) / 2**20, step=step, times=[])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="512,2048,4096")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD 64 KiB: freed tensors leave the RSS
    generator = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, {HEADS} heads / {KV_HEADS} KV heads"
          f" × {HEAD_DIM}, {TOKENS} tokens a batch; times are forward + backward of one layer, median of "
          f"{args.repeats}")
    for seq_len in (int(n) for n in args.lengths.split(",")):
        rows = TOKENS // seq_len
        for layout_name, layout in (("packed", packed_rows(rows, seq_len, generator)),
                                    ("one doc a row", [[seq_len]] * rows)):
            doc_ids = doc_ids_of(layout, seq_len)
            lengths = [length for row in layout for length in row]
            area = sum(length * length for length in lengths) / (rows * seq_len * seq_len)
            print(f"\nT={seq_len} × {rows} rows, {layout_name}: {len(lengths)} documents, median "
                  f"{int(statistics.median(lengths))} tokens, Σ L² / (B·T²) = {area:.3f}")
            print(f"  {'candidate':<8} {'build ms':>9} {'fwd+bwd ms':>11} {'vs dense':>9} {'peak MiB':>9} "
                  f"{'saved MiB':>10}")
            candidates = [("dense", dense), ("flex", flex), ("per-doc", per_doc), ("bucket", bucket)]
            if layout_name != "packed":
                candidates.append(("causal", causal))
            results = []
            for name, make in candidates:
                try:
                    results.append(prepare(name, make, doc_ids))
                except NotImplementedError as error:  # FlexAttention on a CPU: forward only
                    print(f"  {name:<8} {str(error).split('.')[0]}")
            for round_ in range(args.repeats):  # interleaved, the order flipping, so drift favours none
                for result in results[::1 if round_ % 2 else -1]:
                    result["times"].append(result["step"]())
            dense_time = statistics.median(results[0]["times"])
            for result in results:
                time_ = statistics.median(result["times"])
                print(f"  {result['name']:<8} {result['build'] * 1e3:9.1f} {time_ * 1e3:11.1f} "
                      f"{dense_time / time_:8.2f}× {result['peak']:9.1f} {result['saved']:10.1f}", flush=True)


if __name__ == "__main__":
    main()
