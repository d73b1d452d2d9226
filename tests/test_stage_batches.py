"""A padded language-model batch is cut to its widest row before the forward: same loss, counts and FLOPs."""
from __future__ import annotations

import torch

from data.loader import IGNORE_INDEX
from model import ModelConfig, Transformer
from tests.launch import same_work
from train.stage import LanguageModelStage


def padded_batch(lengths: list[int], seq_len: int, vocab_size: int) -> dict:
    """One document per row, right-padded to seq_len, labels pre-shifted as data/loader.py makes them."""
    generator = torch.Generator().manual_seed(0)
    rows = len(lengths)
    input_ids = torch.zeros(rows, seq_len, dtype=torch.long)
    doc_ids = torch.full((rows, seq_len), -1, dtype=torch.long)
    position_ids = torch.zeros(rows, seq_len, dtype=torch.long)
    labels = torch.full((rows, seq_len), IGNORE_INDEX, dtype=torch.long)
    for row, length in enumerate(lengths):
        input_ids[row, :length] = torch.randint(1, vocab_size, (length,), generator=generator)
        doc_ids[row, :length] = 0
        position_ids[row, :length] = torch.arange(length)
        labels[row, :length - 1] = input_ids[row, 1:length]
    return {"input_ids": input_ids, "labels": labels, "doc_ids": doc_ids, "position_ids": position_ids}


def test_padding_columns_are_dropped_and_nothing_else_changes():
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny", max_seq_len=64)
    model = Transformer(config)
    stage = LanguageModelStage("sft", data_kind="sft", default_packing="padded")
    batch = padded_batch([5, 23, 9], seq_len=64, vocab_size=config.vocab_size)

    trimmed = stage.prepare_batch(batch)
    assert all(value.shape == (3, 23) for value in trimmed.values())
    assert stage.loss_weight(trimmed) == stage.loss_weight(batch) == 4 + 22 + 8
    assert same_work(stage.batch_stats(trimmed, config), stage.batch_stats(batch, config))
    assert stage.batch_stats(trimmed, config).computed_tokens == trimmed["input_ids"].numel() < batch["input_ids"].numel()
    with torch.no_grad():
        full_loss = stage.loss(model, batch).loss_sum
        trimmed_loss = stage.loss(model, trimmed).loss_sum
    torch.testing.assert_close(trimmed_loss, full_loss, rtol=1e-6, atol=1e-5)
