"""Decoding without the KV cache (the rollout benchmark's baseline) produces what the cached decoder produces."""
import torch

from model import ModelConfig, Transformer, generate

# Left-padded to 7 columns: rows start at different columns, so positions and padding masks differ per row.
PROMPTS = [[5, 17, 3, 99, 42, 7, 12], [11, 2], [250, 31, 8, 64], [9]]
NEW_TOKENS = 10


def make_model() -> Transformer:
    torch.manual_seed(0)
    # A sharp init, as in tests/test_generate.py: attending to the wrong context then changes the greedy choice.
    return Transformer(ModelConfig.from_preset("tiny", init_std=0.1)).eval()


def test_greedy_without_cache_is_token_identical_to_the_cache():
    model = make_model()
    cached = generate(model, PROMPTS, NEW_TOKENS, greedy=True)
    uncached = generate(model, PROMPTS, NEW_TOKENS, greedy=True, use_cache=False)
    assert torch.equal(uncached.tokens, cached.tokens)


@torch.no_grad()
def test_greedy_without_cache_matches_each_prompt_alone_without_padding():
    """The reference of tests/test_generate.py: one prompt at a time, a plain full forward per token."""
    model = make_model()
    uncached = generate(model, PROMPTS, NEW_TOKENS, greedy=True, use_cache=False)
    for row, prompt in enumerate(PROMPTS):
        ids = list(prompt)
        for _ in range(NEW_TOKENS):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        assert uncached.tokens[row].tolist() == ids[len(prompt):]


def test_rows_stop_at_eos_without_cache_as_with_it():
    model = make_model()
    free = generate(model, PROMPTS, NEW_TOKENS, greedy=True).tokens
    eos = int(free[1, 3])  # row 1 stops at its fourth token at the latest, the others when they reach it or never
    cached = generate(model, PROMPTS, NEW_TOKENS, greedy=True, eos_token_id=eos, pad_token_id=1)
    uncached = generate(model, PROMPTS, NEW_TOKENS, greedy=True, eos_token_id=eos, pad_token_id=1, use_cache=False)
    assert torch.equal(uncached.tokens, cached.tokens) and torch.equal(uncached.lengths, cached.lengths)
    assert uncached.lengths.min() <= 4


def test_seeded_sampling_without_cache_draws_the_same_tokens():
    model = make_model()

    def sample(use_cache: bool) -> torch.Tensor:
        generator = torch.Generator().manual_seed(3)
        return generate(model, PROMPTS, NEW_TOKENS, top_k=50, generator=generator, use_cache=use_cache).tokens

    assert torch.equal(sample(False), sample(True))
