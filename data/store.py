"""The token store: one directory of flat, memory-mapped arrays holding N documents.

    tokens.bin     all documents' token ids back to back (uint16 when the vocab fits, else uint32)
    loss_mask.bin  uint8 per token: 1 where that token is a training target
    offsets.npy    int64 [N+1]: document i is tokens[offsets[i]:offsets[i+1]]
    source.npy     int32 [N]: index of the mixture source each document came from
    meta.json      kind, dtype and counts (total and per source)
    answers.json   rl only: the reference answer of each prompt (or null)
"""

import contextlib
import json
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TOKENS, LOSS_MASK, OFFSETS, SOURCE, META, ANSWERS = (
    "tokens.bin", "loss_mask.bin", "offsets.npy", "source.npy", "meta.json", "answers.json")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size < 2**16 else np.uint32)


def _new_counts():
    return {"docs": 0, "tokens": 0, "supervised_tokens": 0, "truncated_docs": 0}


class StoreWriter:
    """Appends documents to a new store directory; finish() writes the index and meta.json. As a context manager
    it closes its files on the way out, also when finish() was never reached."""

    def __init__(self, directory: Path, vocab_size: int, source_paths: list[str]):
        self.directory = directory
        directory.mkdir(parents=True)
        self.dtype = token_dtype(vocab_size)
        self.tokens_file = open(directory / TOKENS, "wb")
        self.mask_file = open(directory / LOSS_MASK, "wb")
        self.offsets = array("q", [0])
        self.sources = array("i")
        self.answers = []
        self.source_paths = source_paths
        self.per_source = [_new_counts() for _ in source_paths]

    def append(self, ids, loss_mask, source_index: int, truncated: bool = False, answer=None):
        ids = np.asarray(ids, dtype=self.dtype)
        loss_mask = np.asarray(loss_mask, dtype=np.uint8)
        assert len(ids) == len(loss_mask) > 0, "a document needs tokens and one mask value per token"
        self.tokens_file.write(ids.tobytes())
        self.mask_file.write(loss_mask.tobytes())
        self.offsets.append(self.offsets[-1] + len(ids))
        self.sources.append(source_index)
        self.answers.append(answer)
        counts = self.per_source[source_index]
        counts["docs"] += 1
        counts["tokens"] += len(ids)
        # Targets a model sees when the document is read whole: every token but the first can be one.
        counts["supervised_tokens"] += int(loss_mask[1:].sum())
        counts["truncated_docs"] += int(truncated)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        # Closed without raising: after a failed write (a full disk) the rest still buffered is dropped.
        for file in (self.tokens_file, self.mask_file):
            with contextlib.suppress(OSError):
                file.close()

    def finish(self, meta: dict, with_answers: bool = False) -> dict:
        self.tokens_file.close()
        self.mask_file.close()
        np.save(self.directory / OFFSETS, np.frombuffer(self.offsets, dtype=np.int64))
        np.save(self.directory / SOURCE, np.frombuffer(self.sources, dtype=np.int32))
        if with_answers:
            (self.directory / ANSWERS).write_text(json.dumps(self.answers, ensure_ascii=False), encoding="utf-8")
        totals = _new_counts()
        for counts in self.per_source:
            for name in totals:
                totals[name] += counts[name]
        meta = {**meta, "token_dtype": self.dtype.name, **totals,
                "sources": [{"path": path, **counts} for path, counts in zip(self.source_paths, self.per_source)]}
        (self.directory / META).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        return meta


def _memmap(path, dtype):
    # np.memmap refuses empty files; an empty split (no validation data) is legitimate.
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


class TokenStore:
    """Read-only view of one store directory."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.meta = json.loads((self.directory / META).read_text(encoding="utf-8"))
        self.tokens = _memmap(self.directory / TOKENS, np.dtype(self.meta["token_dtype"]))
        self.loss_mask = _memmap(self.directory / LOSS_MASK, np.uint8)
        self.offsets = np.load(self.directory / OFFSETS)
        self.doc_lengths = np.diff(self.offsets)
        self.source = np.load(self.directory / SOURCE)
        answers_file = self.directory / ANSWERS
        self.answers = json.loads(answers_file.read_text(encoding="utf-8")) if answers_file.exists() else None

    def __len__(self):
        return len(self.offsets) - 1

    def __repr__(self):
        return f"TokenStore({str(self.directory)!r}, docs={len(self)}, tokens={self.offsets[-1]})"

    @property
    def num_sources(self) -> int:
        return len(self.meta["sources"])

    def doc(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = self.offsets[index], self.offsets[index + 1]
        return self.tokens[start:end], self.loss_mask[start:end]


@dataclass
class PairedStore:
    """DPO: two stores with the same documents count and order; pair i is (chosen[i], rejected[i])."""

    chosen: TokenStore
    rejected: TokenStore

    def __post_init__(self):
        if len(self.chosen) != len(self.rejected):
            raise ValueError(f"{self.chosen.directory} and {self.rejected.directory} are not aligned: "
                             f"{len(self.chosen)} vs {len(self.rejected)} documents")

    def __len__(self):
        return len(self.chosen)

    @property
    def source(self) -> np.ndarray:
        return self.chosen.source

    @property
    def num_sources(self) -> int:
        return self.chosen.num_sources
