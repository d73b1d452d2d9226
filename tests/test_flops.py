import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from model import (KVCache, ModelConfig, Transformer, attention_flops, forward_flops, generate, generation_bytes_read,
                   generation_flops, training_flops)

# (preset, batch, seq_len): the larger presets run short sequences to stay fast.
CASES = [("tiny", 2, 64), ("small", 1, 32), ("tiny-moe", 2, 64), ("moe", 1, 32)]
TOLERANCE = 0.02


def counted_flops(preset: str, batch: int, seq_len: int, backward: bool) -> int:
    torch.manual_seed(0)
    # The math kernel computes the whole T x T score matrix and masks it afterwards, so it does the
    # non-causal attention work, and its explicit matmuls are visible to the counter.
    model = Transformer(ModelConfig.from_preset(preset, attn_impl="math"))
    input_ids = torch.randint(0, model.config.vocab_size, (batch, seq_len + 1))
    with FlopCounterMode(display=False) as counter:
        out = model(input_ids[:, :-1])
        if backward:
            loss = F.cross_entropy(out.logits.flatten(0, 1), input_ids[:, 1:].flatten())
            if out.aux_loss is not None:
                loss = loss + out.aux_loss
            loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("preset,batch,seq_len", CASES)
def test_flops_match_flop_counter(preset, batch, seq_len, backward):
    config = ModelConfig.from_preset(preset)
    analytic = (training_flops if backward else forward_flops)(config, [seq_len] * batch, causal=False)
    measured = counted_flops(preset, batch, seq_len, backward=backward)
    relative = measured / analytic - 1
    print(f"{'forward+backward' if backward else 'forward'} {preset} B={batch} T={seq_len}: counter {measured:,} "
          f"analytic {analytic:,} relative difference {relative:+.3%}")
    assert abs(relative) < TOLERANCE


def test_causal_attention_is_half_of_full():
    config = ModelConfig.from_preset("small")
    lengths = [7, 100, 512]
    assert 2 * attention_flops(config, lengths, causal=True) == attention_flops(config, lengths, causal=False)
    saved = forward_flops(config, lengths, causal=False) - forward_flops(config, lengths, causal=True)
    assert saved == attention_flops(config, lengths, causal=True)


def test_packed_documents_cost_sum_of_squares():
    config = ModelConfig.from_preset("small")
    lengths = [100, 300, 112]
    per_unit_square = attention_flops(config, [1])
    assert attention_flops(config, lengths) == per_unit_square * sum(length ** 2 for length in lengths)
    assert attention_flops(config, lengths) < attention_flops(config, [sum(lengths)])
    assert forward_flops(config, lengths) == sum(forward_flops(config, [length]) for length in lengths)


def test_doc_lengths_accept_tensor_and_tuple():
    config = ModelConfig.from_preset("tiny")
    lengths = [3, 5, 8]
    expected = forward_flops(config, lengths)
    assert forward_flops(config, tuple(lengths)) == expected
    assert forward_flops(config, torch.tensor(lengths)) == expected


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_generation_flops_match_flop_counter(preset):
    """KV-cache decoding of one prompt (no padding, so every counted matmul is useful work), forced to run all
    its steps: prefill with the LM head at the last position, then one single-token forward per new token."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset(preset, attn_impl="math"))
    prompt, new_tokens = torch.randint(0, model.config.vocab_size, (1, 23)), 9
    with FlopCounterMode(display=False) as counter:
        generation = generate(model, prompt, new_tokens, temperature=1.0, eos_token_id=None)
    assert generation.lengths.tolist() == [new_tokens]
    analytic = generation_flops(model.config, [23], [new_tokens], causal=False)
    assert counter.get_total_flops() == analytic


def test_generation_flops_count_a_shared_prompt_once():
    """Two prompts, three answers each: each prompt's prefill runs (and is counted) once."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", attn_impl="math"))
    prompts = torch.randint(0, model.config.vocab_size, (2, 11)).tolist()
    with FlopCounterMode(display=False) as counter:
        generation = generate(model, prompts, 5, temperature=1.0, eos_token_id=None, samples_per_prompt=3)
    assert generation.lengths.tolist() == [5] * 6
    analytic = generation_flops(model.config, [11] * 6, [5] * 6, causal=False, samples_per_prompt=3)
    assert counter.get_total_flops() == analytic
    assert analytic < generation_flops(model.config, [11] * 6, [5] * 6, causal=False)


@pytest.mark.parametrize("samples_per_prompt", [1, 2])
@pytest.mark.parametrize("tied", [True, False])
def test_generation_bytes_read_match_the_tensors_a_real_generation_reads(tied, samples_per_prompt):
    """MBU's numerator against the generation itself: the bytes of every parameter the forwards use (the embedding
    table only as the tied LM head) once per forward, plus the keys and values each layer's attention gets back
    from the cache, with left padding, a row that stops early, and prompts prefilled once for two rows."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", attn_impl="math", tie_embeddings=tied))
    forwards, kv_bytes = [], []
    model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    update = KVCache.update

    def counting_update(cache, layer, k, v):
        keys, values = update(cache, layer, k, v)
        kv_bytes.append(keys.numel() * keys.element_size() + values.numel() * values.element_size())
        return keys, values

    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(KVCache, "update", counting_update)
        generation = generate(model, prompts, 7, temperature=1.0, eos_token_id=int(model.config.vocab_size // 2),
                              samples_per_prompt=samples_per_prompt)
    read_weights = [p for name, p in model.named_parameters() if tied or name != "embed.weight"]
    weight_bytes = sum(p.numel() * p.element_size() for p in read_weights)
    measured = len(forwards) * weight_bytes + sum(kv_bytes)
    rows = len(prompts) * samples_per_prompt
    assert generation_bytes_read(model.config, rows, 5, generation.tokens.shape[1], 4, samples_per_prompt) == measured
