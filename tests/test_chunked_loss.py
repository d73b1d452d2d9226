"""Transformer.label_logps with chunk_tokens: the LM head and cross-entropy over chunks, each chunk's logits recomputed
in the backward — the same loss, log-probs, entropies and gradients as the whole logits, without ever keeping
[tokens, vocab] logits for the backward; and the DPO and RL log-prob reads built on it."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from model import ModelConfig, Transformer
from train.dpo import sequence_logps
from train.rl_losses import response_logps

TOKENS = 50


def model_and_hidden(seed: int = 0):
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_preset("tiny"))
    hidden = torch.randn(TOKENS, model.config.hidden_size, requires_grad=True)
    labels = torch.randint(0, model.config.vocab_size, (TOKENS,))
    labels[::7] = -100  # ignored positions (prompt tokens, padding)
    return model, hidden, labels


def gradients(model, hidden):
    return [hidden.grad.clone(), model.lm_head.weight.grad.clone()]


@pytest.mark.parametrize("chunk_tokens", [1, 7, TOKENS, 4 * TOKENS])
def test_chunked_loss_and_gradients_equal_the_whole_logits(chunk_tokens):
    model, hidden, labels = model_and_hidden()
    loss = F.cross_entropy(model.logits_from_hidden(hidden).float(), labels, ignore_index=-100, reduction="sum")
    loss.backward()
    expected = gradients(model, hidden)
    model.zero_grad()
    hidden.grad = None
    logps, entropy = model.label_logps(hidden, labels, chunk_tokens)
    assert entropy is None and logps.dtype == torch.float32
    assert torch.all(logps[::7] == 0)
    chunked = -logps.sum()
    chunked.backward()
    torch.testing.assert_close(chunked, loss, rtol=1e-6, atol=0)
    for got, want in zip(gradients(model, hidden), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)


def test_chunked_entropy_equals_the_softmax_entropy():
    model, hidden, labels = model_and_hidden()
    with torch.no_grad():
        logits = model.logits_from_hidden(hidden).float()
        _, entropy = model.label_logps(hidden, labels, chunk_tokens=8, with_entropy=True)
    expected = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    torch.testing.assert_close(entropy, expected, rtol=1e-5, atol=1e-6)


def saved_logit_rows(model, hidden, labels, chunk_tokens) -> int:
    """The most rows of any vocabulary-wide tensor autograd keeps for the backward."""
    rows = [0]

    def pack(tensor):
        weight = tensor.untyped_storage().data_ptr() == model.lm_head.weight.untyped_storage().data_ptr()
        if tensor.dim() == 2 and tensor.shape[-1] == model.config.vocab_size and not weight:
            rows.append(tensor.shape[0])
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logps, _ = model.label_logps(hidden, labels, chunk_tokens)
        (-logps.sum()).backward()
    return max(rows)


def test_the_backward_never_keeps_the_whole_logits():
    """Whole logits: [tokens, vocab] kept from the forward for the backward; chunked: none (each chunk's logits are
    recomputed when its backward runs, and freed after it)."""
    model, hidden, labels = model_and_hidden()
    assert saved_logit_rows(model, hidden, labels, chunk_tokens=0) == TOKENS
    assert saved_logit_rows(model, hidden, labels, chunk_tokens=8) == 0


def test_dpo_and_rl_log_prob_reads_chunked_equal_whole():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny"))
    ids = torch.randint(0, model.config.vocab_size, (4, 20))
    labels = torch.randint(0, model.config.vocab_size, (4, 20))
    batch = {"input_ids": ids, "doc_ids": torch.zeros(4, 20, dtype=torch.long),
             "position_ids": torch.arange(20).expand(4, -1), "labels": labels,
             "target_positions": torch.arange(5, 80), "real_pairs": torch.ones(2, dtype=torch.bool)}
    batch["target_answers"] = torch.arange(80)[5:] // 20
    whole, _ = sequence_logps(model, batch)
    torch.testing.assert_close(sequence_logps(model, batch, chunk_tokens=9)[0], whole, rtol=1e-6, atol=1e-5)

    rollout = SimpleNamespace(input_ids=ids, doc_ids=batch["doc_ids"], position_ids=batch["position_ids"],
                              prompt_width=8, response=labels[:, :13])
    logps, entropy, _ = response_logps(model, rollout, with_entropy=True)
    chunked_logps, chunked_entropy, _ = response_logps(model, rollout, with_entropy=True, chunk_tokens=5)
    torch.testing.assert_close(chunked_logps, logps, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chunked_entropy, entropy, rtol=1e-6, atol=1e-6)
    assert logps.shape == (4, 13)
