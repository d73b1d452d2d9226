import importlib

import pytest
import torch

from model import KVCache, ModelConfig, Transformer, generate

generate_module = importlib.import_module("model.generate")  # the package exports the function under the same name

PROMPTS = [[5, 17, 3, 99, 42, 7], [11, 2], [250, 31, 8, 64]]
NEW_TOKENS = 8


def make_model(preset="tiny") -> Transformer:
    torch.manual_seed(0)
    # Sharper than the training init, so that a token attending to the wrong context changes the
    # greedy choice instead of being averaged away by near-uniform attention.
    return Transformer(ModelConfig.from_preset(preset, init_std=0.1)).eval()


def greedy_without_cache(model: Transformer, prompt: list[int], new_tokens: int) -> list[int]:
    ids = list(prompt)
    for _ in range(new_tokens):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_decoding_in_chunks_with_a_cache_matches_one_full_forward(preset):
    model = make_model(preset)
    chunks = [6, 3, 1, 1, 1]  # a prefill, a multi-token step (fewer queries than keys), single steps
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, model.config.vocab_size, (2, sum(chunks)), generator=generator)
    cache = KVCache(model.config.num_layers, capacity=sum(chunks))
    pieces = [model(chunk, kv_cache=cache).logits for chunk in input_ids.split(chunks, dim=1)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), model(input_ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_cached_greedy_matches_full_recompute(preset):
    model = make_model(preset)
    out = generate(model, [PROMPTS[0]], NEW_TOKENS, greedy=True)
    assert out.tokens[0].tolist() == greedy_without_cache(model, PROMPTS[0], NEW_TOKENS)


def test_left_padded_batch_matches_each_prompt_alone():
    model = make_model()
    batched = generate(model, PROMPTS, NEW_TOKENS, greedy=True)
    for row, prompt in enumerate(PROMPTS):
        alone = generate(model, [prompt], NEW_TOKENS, greedy=True)
        assert batched.tokens[row].tolist() == alone.tokens[0].tolist()


def test_padded_tensor_input_matches_list_input():
    model = make_model()
    width = max(len(prompt) for prompt in PROMPTS)
    pad = 0
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in PROMPTS])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    from_tensor = generate(model, input_ids, NEW_TOKENS, attention_mask=attention_mask, greedy=True)
    from_lists = generate(model, PROMPTS, NEW_TOKENS, greedy=True)
    assert torch.equal(from_tensor.tokens, from_lists.tokens)


def test_right_padded_prompts_are_rejected():
    with pytest.raises(ValueError, match="left-padded"):
        generate(make_model(), torch.tensor([[1, 2, 0]]), 2, attention_mask=torch.tensor([[1, 1, 0]]))


def test_eos_stops_each_row_and_pads_after_it():
    model = make_model()
    free = generate(model, PROMPTS, NEW_TOKENS, greedy=True).tokens
    eos = int(free[0, 2])  # row 0 is guaranteed to stop by its third token
    pad = (eos + 1) % model.config.vocab_size

    out = generate(model, PROMPTS, NEW_TOKENS, greedy=True, eos_token_id=eos, pad_token_id=pad)
    expected_lengths = []
    for row in range(len(PROMPTS)):
        hits = (free[row] == eos).nonzero()
        expected_lengths.append(int(hits[0]) + 1 if len(hits) else NEW_TOKENS)
    assert out.lengths.tolist() == expected_lengths
    assert out.tokens.shape[1] == max(expected_lengths)  # stops once every row has finished
    for row, length in enumerate(expected_lengths):
        assert out.tokens[row, :length].tolist() == free[row, :length].tolist()
        assert (out.tokens[row, length:] == pad).all()
        assert out.mask[row].tolist() == [i < length for i in range(out.tokens.shape[1])]


def test_top_k_one_and_tiny_top_p_equal_greedy():
    model = make_model()
    greedy = generate(model, PROMPTS, NEW_TOKENS, greedy=True).tokens
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(generate(model, PROMPTS, NEW_TOKENS, top_k=1, generator=generator).tokens, greedy)
    assert torch.equal(generate(model, PROMPTS, NEW_TOKENS, top_p=1e-6, generator=generator).tokens, greedy)
    assert torch.equal(generate(model, PROMPTS, NEW_TOKENS, temperature=0.0).tokens, greedy)


def test_sampling_is_reproducible_with_a_seeded_generator():
    model = make_model()

    def sample(seed):
        generator = torch.Generator().manual_seed(seed)
        return generate(model, PROMPTS, NEW_TOKENS, top_k=50, top_p=0.9, generator=generator).tokens

    assert torch.equal(sample(0), sample(0))
    assert not torch.equal(sample(0), sample(1))


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
def test_prompts_run_once_for_their_samples_draw_as_repeated_prompts(greedy):
    """samples_per_prompt=3 prefills each prompt once and copies its cache to its rows: the same tokens, greedy or
    drawn with the same seed, as the prompts repeated row by row."""
    model = make_model()

    def run(prompts, samples_per_prompt):
        generator = torch.Generator().manual_seed(0)
        return generate(model, prompts, NEW_TOKENS, greedy=greedy, generator=generator,
                        samples_per_prompt=samples_per_prompt).tokens

    shared = run(PROMPTS, 3)
    assert shared.shape[0] == 3 * len(PROMPTS)
    assert torch.equal(shared, run([prompt for prompt in PROMPTS for _ in range(3)], 1))
    if not greedy:  # the rows of a prompt draw apart
        assert not torch.equal(shared[0], shared[1])


def test_sampling_draws_tokens_with_their_probabilities():
    """The inverse-CDF draw against the softmax, over 200,000 rows: every frequency within 5 standard deviations of
    its probability, and a token masked out by top_k never drawn."""
    probabilities = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
    rows = 200_000
    logits = probabilities.log().expand(rows, -1)
    generator = torch.Generator().manual_seed(0)
    counts = torch.bincount(generate_module._sample(logits, 1.0, None, None, False, generator), minlength=5)
    frequencies = counts / rows
    tolerance = 5 * (probabilities * (1 - probabilities) / rows).sqrt()
    assert ((frequencies - probabilities).abs() < tolerance).all(), frequencies
    top4 = generate_module._sample(logits, 1.0, 4, None, False, generator)
    assert int((top4 == 4).sum()) == 0
    kept = probabilities[:4] / probabilities[:4].sum()
    assert ((torch.bincount(top4, minlength=4)[:4] / rows - kept).abs() < 5 * (kept * (1 - kept) / rows).sqrt()).all()


def test_a_row_of_non_finite_logits_is_refused_not_sampled():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 1.0, float("nan"), 2.0]])
    with pytest.raises(ValueError, match=r"logits of rows \[1\] are not finite"):
        generate_module._sample(logits, 1.0, None, None, False, torch.Generator().manual_seed(0))


def test_repeated_cache_rows_hold_their_prompts_tokens_and_nothing_after():
    model = make_model()
    cache = KVCache(model.config.num_layers, capacity=9)
    model(torch.tensor([[5, 6, 7], [8, 9, 10]]), kv_cache=cache)
    keys = cache.keys[0].clone()
    cache.repeat_rows(3)
    assert cache.keys[0].shape == (6, 9, *keys.shape[2:]) and cache.doc_ids.shape == (6, 9)
    torch.testing.assert_close(cache.keys[0], keys.repeat_interleave(3, dim=0), rtol=0, atol=0)
    assert (cache.keys[0][:, 3:] == 0).all() and cache.length == 3
    with pytest.raises(ValueError, match="nothing is cached yet"):
        KVCache(2, capacity=4).repeat_rows(2)


def test_generate_restores_training_mode():
    model = make_model().train()
    generate(model, PROMPTS, 2)
    assert model.training
    model.eval()
    generate(model, PROMPTS, 2)
    assert not model.training
