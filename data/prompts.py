"""Prompt batches for RL (PPO): the rl store's prompts and reference answers, laid out per epoch
and per rank exactly like training batches (data/layout.py)."""

from pathlib import Path
from typing import Optional

from data.formats import read_records
from data.layout import EMPTY_ROW, batches_from, check_loader_options, epoch_documents, rank_batches
from data.store import TokenStore


def prompt_without_answer(store: TokenStore) -> Optional[str]:
    """None when every prompt of the store has a reference answer; else 'FILE:LINE: ...' naming the first prompt
    without one in the file of the store's first such prompt, and how many of the store's prompts lack one."""
    missing = [index for index, answer in enumerate(store.answers) if answer is None]
    if not missing:
        return None
    path = Path(store.meta["sources"][store.source[missing[0]]]["path"])
    # The store keeps no line numbers: the file is read again, on this error path only.
    line = next(line for line, (_, answer) in read_records(path, "rl", bad_records=[]) if answer is None)
    return (f"{path}:{line}: the prompt has no reference answer (field 'answer'); {len(missing)} of the "
            f"{len(store.answers)} prompts of the {store.directory.name} split have none")


class PromptLoader:
    """Yields {"prompt_ids": [[int]], "answers": [str | None], "doc_index": [int]} per batch.

    prompt_ids end with the chat template's generation prompt ('<|im_start|>assistant\\n' in ChatML): generation
    continues from there.
    """

    def __init__(self, store: TokenStore, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 weights=None, drop_last: bool = True):
        check_loader_options(store, batch_size, rank, world_size, weights)
        if store.answers is None:
            raise ValueError(f"{store!r} is not an rl store (it has no answers.json)")
        self.store = store
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.weights, self.drop_last = weights, drop_last

    def batches(self, epoch: int):
        documents = epoch_documents(self.store.source, self.seed, epoch, self.weights)
        rows = rank_batches(len(documents), self.batch_size, self.rank, self.world_size, self.drop_last)
        return [[int(documents[row]) for row in batch if row != EMPTY_ROW] for batch in rows]

    def padding_fraction(self, epoch: int = 0) -> None:
        """Unknown here: prompts are padded per batch when they are generated from, not laid out in rows."""
        return None

    def __len__(self):
        """Batches of the first epoch on this rank."""
        return len(self.batches(0))

    def iterate(self, epoch: int, start_batch: int = 0):
        for documents in batches_from(self.batches(epoch), start_batch):
            yield {
                "prompt_ids": [self.store.doc(i)[0].astype(int).tolist() for i in documents],
                "answers": [self.store.answers[i] for i in documents],
                "doc_index": documents,
            }
