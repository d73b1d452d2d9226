"""DPO and reward-model losses, log-probs and FLOPs on hand-made pair batches, against direct computations."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from model import (ModelConfig, RewardModel, Transformer, attention_flops, load_pretrained, load_reward_model,
                   save_pretrained, save_reward_model)
from train.config import parse_config
from train.dpo import DPOConfig, DPOStage, dpo_loss, sequence_logps
from train.reward import RewardStage

IGNORE = -100


def pair_batch(pairs: list[tuple[tuple[int, int], tuple[int, int]]], seq_len: int, vocab: int, seed: int = 0) -> dict:
    """A collated [2B, T] pair batch: each side is (prompt length, answer length); only the answer is a target.
    An empty side ((0, 0)) is a padding pair, as evaluation batches end with."""
    generator = torch.Generator().manual_seed(seed)
    sides = [chosen for chosen, _ in pairs] + [rejected for _, rejected in pairs]
    batch = {"input_ids": torch.zeros(len(sides), seq_len, dtype=torch.long),
             "labels": torch.full((len(sides), seq_len), IGNORE),
             "doc_ids": torch.full((len(sides), seq_len), -1),
             "position_ids": torch.zeros(len(sides), seq_len, dtype=torch.long)}
    for row, (prompt, answer) in enumerate(sides):
        length = prompt + answer
        batch["input_ids"][row, :length] = torch.randint(1, vocab, (length,), generator=generator)
        batch["doc_ids"][row, :length] = 0
        batch["position_ids"][row, :length] = torch.arange(length)
        # Pre-shifted: position t is scored on token t+1 when that token is part of the answer.
        for t in range(max(prompt - 1, 0), length - 1):
            batch["labels"][row, t] = batch["input_ids"][row, t + 1]
    return batch


@torch.no_grad()
def direct_logps(model: Transformer, batch: dict) -> torch.Tensor:
    """Per row, alone and unpadded: full log-softmax, then a loop over the supervised positions."""
    totals = []
    for row in range(batch["input_ids"].shape[0]):
        length = int((batch["doc_ids"][row] >= 0).sum())
        if length == 0:
            totals.append(0.0)
            continue
        logits = model(batch["input_ids"][row:row + 1, :length]).logits[0]
        log_probs = F.log_softmax(logits.double(), dim=-1)
        total = 0.0
        for t in range(length):
            label = int(batch["labels"][row, t])
            if label != IGNORE:
                total += float(log_probs[t, label])
        totals.append(total)
    return torch.tensor(totals, dtype=torch.float64)


def tiny(seed: int, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_preset("tiny", **overrides))


def dpo_stage(reference: torch.nn.Module, beta: float, kind: str = "sigmoid") -> DPOStage:
    stage = DPOStage()
    stage.beta, stage.kind, stage.reference = beta, kind, reference.eval()
    return stage


PAIRS = [((5, 3), (5, 4)), ((9, 2), (9, 6)), ((4, 7), (4, 1)), ((0, 0), (0, 0))]


def test_sequence_logps_match_a_direct_computation():
    model = tiny(0)
    batch = pair_batch(PAIRS, seq_len=32, vocab=model.config.vocab_size)
    prepared = DPOStage().prepare_batch(batch)
    assert prepared["input_ids"].shape[1] == 15 and prepared["pairs"] == 3  # padding columns and the empty pair go
    logps, _ = sequence_logps(model, prepared)
    assert torch.allclose(logps.double(), direct_logps(model, batch), rtol=1e-5, atol=1e-4)


def test_dpo_loss_matches_hand_computation():
    policy = torch.tensor([-3.0, -5.0, -4.0, -4.5])  # chosen of pairs 1, 2, then their rejected
    reference = torch.tensor([-3.5, -4.0, -4.0, -6.0])
    beta = 0.5
    losses, chosen, rejected = dpo_loss(policy, reference, beta, "sigmoid")
    # pair 1: h = (−3 + 3.5) − (−4 + 4) = 0.5; pair 2: h = (−5 + 4) − (−4.5 + 6) = −2.5
    expected = [math.log(1 + math.exp(-beta * 0.5)), math.log(1 + math.exp(beta * 2.5))]
    assert losses.tolist() == pytest.approx(expected, rel=1e-6)
    assert chosen.tolist() == pytest.approx([0.25, -0.5]) and rejected.tolist() == pytest.approx([0.0, 0.75])
    losses, _, _ = dpo_loss(policy, reference, beta, "ipo")
    assert losses.tolist() == pytest.approx([(0.5 - 1.0) ** 2, (-2.5 - 1.0) ** 2], rel=1e-6)


@pytest.mark.parametrize("kind", ["sigmoid", "ipo"])
def test_dpo_stage_loss_and_metrics_against_direct_log_probs(kind):
    reference = tiny(0)
    policy = tiny(1)  # another model: the log-ratios are far from 0
    batch = pair_batch(PAIRS, seq_len=32, vocab=reference.config.vocab_size)
    stage, beta = dpo_stage(reference, beta=0.3, kind=kind), 0.3
    output = stage.loss(policy, stage.prepare_batch(batch))

    real = 3  # the last pair is padding
    pi, ref = direct_logps(policy, batch), direct_logps(reference, batch)
    pi_sums = pi  # logps/* are sums over the answer under either loss
    if kind == "ipo":
        tokens = (batch["labels"] != IGNORE).sum(dim=1).clamp_min(1)
        pi, ref = pi / tokens, ref / tokens
    half = len(PAIRS)
    chosen = [beta * (pi[i] - ref[i]).item() for i in range(real)]
    rejected = [beta * (pi[half + i] - ref[half + i]).item() for i in range(real)]
    h = [(c - r) / beta for c, r in zip(chosen, rejected)]
    losses = [math.log1p(math.exp(-beta * x)) if kind == "sigmoid" else (x - 1 / (2 * beta)) ** 2 for x in h]
    assert output.loss_sum.item() == pytest.approx(sum(losses), rel=1e-4)
    means = {name: value.item() / count for name, (value, count) in output.extras.items()}
    assert {count for _, count in output.extras.values()} == {real}
    assert means["rewards/chosen"] == pytest.approx(sum(chosen) / real, rel=1e-4)
    assert means["rewards/rejected"] == pytest.approx(sum(rejected) / real, rel=1e-4)
    assert means["rewards/margins"] == pytest.approx(sum(h) * beta / real, rel=1e-4)
    assert means["rewards/accuracies"] == pytest.approx(sum(c > r for c, r in zip(chosen, rejected)) / real)
    assert means["logps/chosen"] == pytest.approx(pi_sums[:real].sum().item() / real, rel=1e-4)
    assert means["logps/rejected"] == pytest.approx(pi_sums[half:half + real].sum().item() / real, rel=1e-4)


def test_dpo_at_the_reference_is_log_2_per_pair_with_zero_rewards():
    policy = tiny(0)
    stage = dpo_stage(copy.deepcopy(policy), beta=0.1)
    output = stage.loss(policy, stage.prepare_batch(pair_batch(PAIRS, 32, policy.config.vocab_size)))
    assert output.loss_sum.item() == pytest.approx(3 * math.log(2), rel=1e-6)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert output.extras[name][0].item() == 0.0, name


def test_reward_loss_matches_hand_computation():
    torch.manual_seed(0)
    model = RewardModel(ModelConfig.from_preset("tiny"))
    torch.nn.init.normal_(model.value_head.weight, std=0.5)  # a trained head, not the zero start
    batch = pair_batch(PAIRS, seq_len=32, vocab=model.config.vocab_size)
    output = RewardStage().loss(model, RewardStage().prepare_batch(batch))
    scores = []
    for row in range(batch["input_ids"].shape[0]):
        length = int((batch["doc_ids"][row] >= 0).sum())
        scores.append(model(batch["input_ids"][row:row + 1, :length]).values[0, -1].item() if length else 0.0)
    half, real = len(PAIRS), 3
    margins = [scores[i] - scores[half + i] for i in range(real)]
    assert output.loss_sum.item() == pytest.approx(sum(math.log1p(math.exp(-m)) for m in margins), rel=1e-5)
    assert output.extras["reward/margin"][0].item() == pytest.approx(sum(margins), rel=1e-5)
    assert output.extras["reward/accuracy"][0].item() == sum(m > 0 for m in margins)
    assert output.extras["reward/accuracy"][1] == real


def count_flops(step) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


# Equal lengths, no padding: the math kernel then computes exactly the documents' full T×T scores, which the
# analytic count halves for the causal mask; `passes` forward-equivalents each add that other half back.
FLOP_PAIRS = [((20, 12), (20, 12)), ((26, 6), (26, 6))]


def test_dpo_flops_match_flop_counter():
    policy = tiny(0, attn_impl="math")
    stage = dpo_stage(tiny(1, attn_impl="math"), beta=0.1)
    batch = stage.prepare_batch(pair_batch(FLOP_PAIRS, 32, policy.config.vocab_size))
    counted = count_flops(lambda: stage.loss(policy, batch).loss_sum.backward())
    lengths = [32] * 4
    analytic = stage.batch_stats(batch, policy.config).model_flops + 4 * attention_flops(policy.config, lengths)
    assert abs(counted / analytic - 1) < 0.02, (counted, analytic)


def test_reward_flops_match_flop_counter():
    torch.manual_seed(0)
    model = RewardModel(ModelConfig.from_preset("tiny", attn_impl="math"))
    stage = RewardStage()
    batch = stage.prepare_batch(pair_batch(FLOP_PAIRS, 32, model.config.vocab_size))
    counted = count_flops(lambda: stage.loss(model, batch).loss_sum.backward())
    analytic = stage.batch_stats(batch, model.config).model_flops + 3 * attention_flops(model.config, [32] * 4)
    assert abs(counted / analytic - 1) < 0.02, (counted, analytic)


def test_reward_export_round_trip_and_kinds_are_not_confused(tmp_path):
    torch.manual_seed(0)
    model = RewardModel(ModelConfig.from_preset("tiny"))
    torch.nn.init.normal_(model.value_head.weight)
    save_reward_model(model.state_dict(), model.config, tmp_path / "reward")
    loaded = load_reward_model(tmp_path / "reward")
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    assert torch.equal(loaded(ids).values, model(ids).values)
    with pytest.raises(ValueError, match="holds a reward model"):
        load_pretrained(tmp_path / "reward")
    save_pretrained(tiny(0), tmp_path / "lm")
    with pytest.raises(ValueError, match="is not a reward model: its weights have no value_head.weight"):
        load_reward_model(tmp_path / "lm")


def test_dpo_flags_are_validated():
    config = parse_config({"stage": "dpo", "data_config": "x.yaml"}, ["--beta", "0.5", "--dpo_loss", "ipo"],
                          cls=DPOConfig)
    assert (config.beta, config.dpo_loss) == (0.5, "ipo")
    with pytest.raises(ValueError, match="--beta: must be > 0"):
        parse_config({"stage": "dpo", "data_config": "x.yaml"}, ["--beta", "0"], cls=DPOConfig)
    with pytest.raises(ValueError, match="--dpo_loss: 'hinge' is not one of sigmoid, ipo"):
        parse_config({"stage": "dpo", "data_config": "x.yaml"}, ["--dpo_loss", "hinge"], cls=DPOConfig)
