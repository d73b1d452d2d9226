"""--activation_checkpointing: the same losses and gradients as keeping the activations (one process, and under every
backend at 2 ranks in one launch), the recomputation's FLOPs as torch's FLOP counter counts them, and
train/hfu_percent = MFU with them counted."""
from __future__ import annotations

import copy
import json
import os
from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from model import ModelConfig, Transformer, training_flops
from model.attention import Documents
from model.flops import recomputed_flops
from tests.launch import REPO_ROOT, TORCHRUN, free_port, run_command
from train.activation_checkpointing import checkpoint_blocks
from train.compile import compile_blocks, trace_count
from train.config import TrainConfig
from train.metrics import BatchStats, MetricsTracker
from train.grpo import GRPOConfig, GRPOStage
from train.rollout import RolloutMaker
from train.stage import LanguageModelStage

DOC_IDS = torch.tensor([0] * 30 + [1] * 34).expand(2, -1)  # two packed documents a row
POSITION_IDS = torch.cat([torch.arange(30), torch.arange(34)]).expand(2, -1)


def train_step(model: Transformer, tokens: torch.Tensor, chunk_tokens: int = 0) -> torch.Tensor:
    output = model(tokens[:, :-1], DOC_IDS, POSITION_IDS, return_hidden=True, documents=Documents(DOC_IDS))
    logps, _ = model.label_logps(output.hidden.flatten(0, 1), tokens[:, 1:].flatten(), chunk_tokens)
    loss = -logps.mean() + (output.aux_loss if output.aux_loss is not None else 0)
    loss.backward()
    return loss.detach()


def twins(preset: str, **overrides) -> tuple[Transformer, Transformer]:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset(preset, **overrides))
    checkpointed = copy.deepcopy(model)
    assert checkpoint_blocks(checkpointed) == model.config.num_layers
    return model, checkpointed


@pytest.mark.parametrize("preset,overrides", [("tiny", {}), ("tiny-moe", {}), ("tiny", {"dropout": 0.1})],
                         ids=["dense", "moe", "dropout"])
def test_checkpointed_blocks_give_the_same_loss_and_gradients(preset, overrides):
    """fp32, packed rows; with dropout the recomputation replays the forward's random masks."""
    model, checkpointed = twins(preset, **overrides)
    tokens = torch.randint(0, model.config.vocab_size, (2, 65), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(3)
    expected = train_step(model, tokens)
    torch.manual_seed(3)
    torch.testing.assert_close(train_step(checkpointed, tokens), expected, rtol=1e-6, atol=0)
    for (name, param), twin in zip(model.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(twin.grad, param.grad, rtol=1e-5, atol=1e-7, msg=name)


def counted(model: Transformer, tokens: torch.Tensor, chunk_tokens: int) -> int:
    with FlopCounterMode(display=False) as counter:
        output = model(tokens[:, :-1], return_hidden=True)
        logps, _ = model.label_logps(output.hidden.flatten(0, 1), tokens[:, 1:].flatten(), chunk_tokens)
        (-logps.mean() + (output.aux_loss if output.aux_loss is not None else 0)).backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("preset,overrides", [("tiny", {}), ("tiny-moe", {}), ("tiny", {"dropout": 0.1})],
                         ids=["dense", "moe", "dropout"])
@pytest.mark.parametrize("chunk_tokens", [0, 48])
def test_recomputed_flops_are_what_the_flop_counter_counts(preset, overrides, chunk_tokens):
    """Hardware FLOPs = model FLOPs + recomputed_flops: exactly the counter's extra FLOPs over the plain step (the math
    kernel does the full T² attention: causal=False), and within 2% of the counter's total, as model FLOPs are."""
    model, checkpointed = twins(preset, attn_impl="math", **overrides)
    tokens = torch.randint(0, model.config.vocab_size, (2, 65), generator=torch.Generator().manual_seed(1))
    plain, hardware = counted(model, tokens, 0), counted(checkpointed, tokens, chunk_tokens)
    extra = recomputed_flops(model.config, [64, 64], blocks=True, lm_head_tokens=128 if chunk_tokens else 0,
                             causal=False)
    assert hardware - plain == extra
    assert abs(hardware / (training_flops(model.config, [64, 64], causal=False) + extra) - 1) < 0.02


@pytest.mark.parametrize("chunk_tokens", [0, 16])
def test_rl_update_counts_its_recomputation(chunk_tokens):
    """An RL update's forward + backward over a rollout (train/rl.py's policy objective, GRPO): the flop counter's
    extra FLOPs with checkpointing are the recomputation the stage logs for each epoch (HFU's numerator)."""
    model, checkpointed = twins("tiny", attn_impl="math")
    generator = torch.Generator().manual_seed(2)
    prompts = torch.randint(0, model.config.vocab_size, (4, 5), generator=generator).tolist()
    answers = torch.randint(0, model.config.vocab_size, (4, 6), generator=generator)
    full = torch.ones(4, 6, dtype=torch.bool)  # no padding: the counter counts the layout, the formula real tokens
    rollout = RolloutMaker.layout(SimpleNamespace(pad_id=0, device=torch.device("cpu")), prompts,
                                  SimpleNamespace(tokens=answers, mask=full, lengths=torch.full((4,), 6)))
    rollout.old_logps = rollout.ref_logps = torch.zeros(4, 6)
    rollout.advantages = torch.ones(4, 6)
    stages = {}
    for chunks in (0, chunk_tokens):  # the plain step, and the run's options
        stages[chunks] = GRPOStage()
        stages[chunks].ctx = SimpleNamespace(cfg=GRPOConfig(data_config="unused", activation_checkpointing=True,
                                                            loss_chunk_tokens=chunks), model_config=model.config)

    def counted_update(policy: Transformer, stage: GRPOStage) -> int:
        with FlopCounterMode(display=False) as counter:
            stage._policy_objective(policy, rollout).loss_sum.backward()
        return counter.get_total_flops()

    stage = stages[chunk_tokens]
    extra = counted_update(checkpointed, stage) - counted_update(model, stages[0])
    head_tokens = 24 if chunk_tokens else 0
    assert extra == recomputed_flops(model.config, [10] * 4, blocks=True, lm_head_tokens=head_tokens, causal=False)
    assert stage.update_recomputed_flops(rollout) == recomputed_flops(model.config, [10] * 4, blocks=True,
                                                                      lm_head_tokens=head_tokens)


def test_language_model_stage_counts_its_recomputation():
    """Blocks over the documents' tokens, the LM head over every position (padding included) when chunked."""
    config = ModelConfig.from_preset("tiny")
    batch = {"input_ids": torch.zeros(2, 8, dtype=torch.long), "doc_ids": torch.tensor([[0] * 5 + [-1] * 3, [0] * 8]),
             "labels": torch.zeros(2, 8, dtype=torch.long)}
    stage = LanguageModelStage("pretrain", "pretrain", "packed")
    for checkpointing, chunk, expected in [(False, 0, 0), (True, 0, recomputed_flops(config, [5, 8], True)),
                                           (True, 4, recomputed_flops(config, [5, 8], True, lm_head_tokens=16)),
                                           (False, 4, recomputed_flops(config, [5, 8], False, lm_head_tokens=16))]:
        cfg = TrainConfig(data_config="unused", activation_checkpointing=checkpointing, loss_chunk_tokens=chunk)
        stage.ctx = SimpleNamespace(cfg=cfg, model_config=config)
        stats = stage.counted_stats(batch)
        assert stats.recomputed_flops == expected
        assert stats.model_flops == stage.batch_stats(batch, config).model_flops


def test_hfu_is_mfu_with_the_recomputed_flops():
    metrics = MetricsTracker(world_size=1, device=torch.device("cpu"), peak_flops=1e15, total_steps=10,
                             warmup_steps=0)
    for recomputed in (0.5e9, 1.5e9):
        stats = BatchStats(computed_tokens=8, input_tokens=8, supervised_tokens=8, samples=1, model_flops=4e9,
                           recomputed_flops=recomputed)
        metrics.add_micro_batch(torch.tensor(1.0), 8, stats)
        metrics.add_optimizer_step(torch.tensor(1.0), True)
    record = metrics.collect(global_step=2, learning_rate=1e-3)
    assert record["train/hfu_percent"] == pytest.approx(record["train/mfu_percent"] * 10 / 8)


def test_compile_traces_the_checkpointed_block_once():
    """--compile with --activation_checkpointing: torch.compile traces torch.utils.checkpoint inside the block (one
    graph, no break) and trains as the eager model does."""
    model, checkpointed = twins("tiny")
    before = trace_count()
    compile_blocks(checkpointed)
    tokens = torch.randint(0, model.config.vocab_size, (2, 65), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(train_step(checkpointed, tokens), train_step(model, tokens), rtol=1e-5, atol=0)
    assert trace_count() - before == 1
    for param, twin in zip(model.parameters(), checkpointed.parameters()):
        torch.testing.assert_close(twin.grad, param.grad, rtol=1e-4, atol=1e-6)


# ----- every backend at 2 ranks, in one launch (tests/checkpointing_probe.py) -----
@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    out = tmp_path_factory.mktemp("checkpointing")
    port = free_port()
    command = [str(TORCHRUN), "--nproc_per_node", "2", "--master_port", str(port),
               str(REPO_ROOT / "tests" / "checkpointing_probe.py"), str(out)]
    run_command(command, {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}, port, True, 600)
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("backend", ["zero0", "zero1", "zero2", "zero3", "fsdp"])
def test_every_backend_trains_the_same_with_checkpointing_and_the_chunked_loss(probe, backend):
    """Step 2's loss follows step 1's update; Adam's update of near-zero gradients amplifies their rounding, so the
    gradients are compared through their norms (the single-process test compares them element by element)."""
    plain, checkpointed = probe[f"{backend}_plain"], probe[f"{backend}_checkpointed"]
    torch.testing.assert_close(checkpointed["losses"], plain["losses"], rtol=1e-6, atol=0)
    torch.testing.assert_close(checkpointed["grad_norms"], plain["grad_norms"], rtol=1e-6, atol=0)
