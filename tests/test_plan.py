"""bench/plan.py against the real thing, in process: parameter counts of the built model, the bytes autograd saves in a
real forward and loss, the optimizer state a real AdamW step makes, and a 64-rank job computed by hand."""
import math

import pytest
import torch

from bench.plan import Job, activation_bytes_per_token_layer, activations, communication, load_config, \
    parameter_sizes, plan
from model import ModelConfig, Transformer
from model.attention import Documents
from model.flops import num_params


def terms(result) -> dict[str, int]:
    return {name: size for name, size, _ in result.memory}


@pytest.mark.parametrize("preset", ["tiny", "small", "minimind3"])
def test_parameter_count_is_the_built_model_s(preset):
    config = ModelConfig.from_preset(preset)
    real = sum(p.numel() for p in Transformer(config).parameters())
    assert sum(parameter_sizes(config).values()) == real == num_params(config)


@pytest.mark.parametrize("preset, dtype", [("tiny", torch.float32), ("small", torch.float32),
                                           ("small", torch.bfloat16), ("minimind3", torch.float32)])
def test_activations_are_the_bytes_a_real_forward_saves(preset, dtype):
    """Every tensor autograd saves in a packed forward and the (unchunked) loss, each storage once, weights left out:
    the plan's activations, plus the loss's saved fp32 log-softmax [N, vocab] and int64 labels."""
    rows, width = 2, 128
    config = ModelConfig.from_preset(preset, max_seq_len=width)
    torch.manual_seed(0)
    model = Transformer(config).to(dtype)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    ids = torch.randint(0, config.vocab_size, (rows, width))
    labels = torch.randint(0, config.vocab_size, (rows * width,))
    doc_ids = torch.zeros(rows, width, dtype=torch.long)
    doc_ids[:, 50:], doc_ids[:, 90:] = 1, 2  # three packed documents a row
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = model(ids, doc_ids=doc_ids, return_hidden=True, documents=Documents(doc_ids))
        model.label_logps(output.hidden.flatten(0, 1), labels)
    tokens = rows * width
    kept, _, _ = activations(Job(config, 2, "zero2", rows, width, "bf16" if dtype == torch.bfloat16 else "fp32"))
    loss_saved = tokens * config.vocab_size * 4 + tokens * 8
    assert 0 <= sum(saved.values()) - (kept + loss_saved) <= 8  # nll_loss's scalar total weight


def test_activation_arithmetic_by_hand():
    config = ModelConfig.from_preset("small")  # H 512, 2 KV heads of 64, I 1408, 8 heads
    bf16 = 2 * (2 * 512 + 512 + 2 * 128 + 2 * 512 + 4 * 1408) + 4 * (2 * (2 * 512 + 1) + 8)
    assert activation_bytes_per_token_layer(config, 2) == bf16 == 25_128
    checkpointed, loss_or_block, _ = activations(Job(config, 2, "zero2", 1, 1024, "bf16",
                                                     activation_checkpointing=True, loss_chunk_tokens=256))
    top = 8 + 2 * 64 * 4 + (2 * 512 + 1) * 4 + 512 * 2
    assert checkpointed == 8 * 512 * 2 * 1024 + top * 1024
    assert loss_or_block == max(3 * 256 * 6400 * 4, (bf16 + 3 * 1408 * 2) * 1024)


@pytest.mark.parametrize("world_size", [2, 3, 64])
def test_partitions_of_a_real_optimizer_state(world_size):
    """AdamW's state after a real step, split as ZeRO/FSDP split their flat fp32 buffers: ⌈P/N⌉ elements a rank."""
    model = Transformer(ModelConfig.from_preset("tiny"))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randint(0, 6400, (1, 16))).logits.sum().backward()
    optimizer.step()
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if t.dim())
    for backend in ("zero1", "zero2", "zero3", "fsdp"):
        moments = terms(plan(Job(model.config, world_size, backend, 1, 16)))
        moments = next(size for name, size in moments.items() if name.startswith("Adam moments"))
        assert state <= world_size * moments < state + world_size * 8
    replicated = terms(plan(Job(model.config, world_size, "zero0", 1, 16)))["Adam moments (fp32, replicated)"]
    assert replicated == state


def test_a_64_gpu_zero3_job_by_hand():
    config = load_config("base", 4096)
    job = Job(config, 64, "zero3", 8, 4096, "bf16", activation_checkpointing=True)
    result = plan(job)
    P = num_params(config)
    shard = math.ceil(P / 64)
    memory = terms(result)
    assert memory["parameter partition (bf16)"] == 2 * shard
    assert memory["fp32 master partition"] == memory["gradient partition (fp32)"] == 4 * shard
    assert memory["Adam moments (fp32, partitioned)"] == 8 * shard
    tokens = 8 * 4096
    assert memory[f"activations (bf16, {tokens:,} tokens a rank) [fwd/bwd]"] == \
        16 * 768 * 2 * tokens + (8 + 2 * 96 * 4 + (2 * 768 + 1) * 4 + 768 * 2) * tokens
    small = sum(n for n in parameter_sizes(config).values() if n < 100_000)  # norms: never partitioned
    sent = dict((name, size) for name, size, _ in result.communication)
    assert sent["parameter all-gather, forward"] == sent["parameter all-gather, backward"] == \
        int(63 / 64 * (P - small) * 2)
    assert sent["gradient reduce-scatter"] == int(63 / 64 * P * 4)


def test_communication_follows_the_stage_and_the_micro_batches():
    config = ModelConfig.from_preset("small")
    P = num_params(config)
    sizes = parameter_sizes(config)
    zero0 = communication(Job(config, 8, "zero0", 1, 512, accumulation_steps=4), sizes)
    assert zero0 == [("gradient all-reduce", int(2 * 7 / 8 * 4 * P), "once per step")]
    zero2 = dict((name, size) for name, size, _ in communication(Job(config, 8, "zero2", 1, 512, "bf16",
                                                                      accumulation_steps=4), sizes))
    assert zero2 == {"gradient reduce-scatter": int(7 / 8 * 4 * P * 4), "parameter all-gather": int(7 / 8 * 2 * P)}
    assert communication(Job(config, 1, "fsdp", 1, 512), sizes) == []
