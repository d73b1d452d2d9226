import dataclasses
import math
import re

import pytest
import torch

from model import (PRESETS, ModelConfig, Transformer, load_pretrained, num_params, save_pretrained,
                   save_state_dict)
from model.attention import DocumentMask, resolve_impl
from model.weights import CONFIG_FILE, WEIGHTS_FILE


def make_model(preset="tiny", **overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset(preset, **overrides)).eval()


def twin(model: Transformer, attn_impl: str) -> Transformer:
    """Same weights, other attention kernel."""
    other = Transformer(dataclasses.replace(model.config, attn_impl=attn_impl)).eval()
    other.load_state_dict(model.state_dict())
    return other


def pack(rows: list[list[int]], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """doc_ids and position_ids for rows holding documents of these lengths, right-padded to seq_len."""
    doc_ids = torch.full((len(rows), seq_len), -1)
    position_ids = torch.zeros(len(rows), seq_len, dtype=torch.long)
    for row, lengths in enumerate(rows):
        start = 0
        for doc, length in enumerate(lengths):
            doc_ids[row, start:start + length] = doc
            position_ids[row, start:start + length] = torch.arange(length)
            start += length
    return doc_ids, position_ids


def random_ids(config: ModelConfig, *shape: int) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, shape, generator=torch.Generator().manual_seed(1))


def test_output_shapes_and_hidden_path():
    model = make_model()
    config = model.config
    input_ids = random_ids(config, 2, 16)
    out = model(input_ids)
    assert out.logits.shape == (2, 16, config.vocab_size)
    assert out.aux_loss is None and out.hidden is None

    hidden_only = model(input_ids, return_hidden=True)
    assert hidden_only.logits is None
    assert hidden_only.hidden.shape == (2, 16, config.hidden_size)
    torch.testing.assert_close(model.logits_from_hidden(hidden_only.hidden), out.logits)


@pytest.mark.parametrize("rows", [None, [[16], [10]], [[5, 7, 4], [9, 3]]],
                         ids=["no-mask", "right-padding", "packed"])
def test_sdpa_and_math_kernels_agree(rows):
    model = make_model(attn_impl="sdpa")
    input_ids = random_ids(model.config, 2, 16)
    doc_ids, position_ids = pack(rows, 16) if rows else (None, None)
    sdpa = model(input_ids, doc_ids, position_ids).logits
    math_ = twin(model, "math")(input_ids, doc_ids, position_ids).logits
    real = doc_ids >= 0 if rows else torch.ones(2, 16, dtype=torch.bool)
    assert torch.isfinite(sdpa).all() and torch.isfinite(math_).all()  # padding included
    torch.testing.assert_close(sdpa[real], math_[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
@pytest.mark.parametrize("attn_impl", ["sdpa", "math"])
def test_packed_row_equals_documents_run_alone(preset, attn_impl):
    model = make_model(preset, attn_impl=attn_impl)
    rows = [[5, 7, 4], [9, 3]]
    input_ids = random_ids(model.config, 2, 16)
    doc_ids, position_ids = pack(rows, 16)
    packed = model(input_ids, doc_ids, position_ids).logits
    for row, lengths in enumerate(rows):
        start = 0
        for length in lengths:
            alone = model(input_ids[row:row + 1, start:start + length]).logits[0]
            torch.testing.assert_close(packed[row, start:start + length], alone, atol=1e-5, rtol=0)
            start += length


def test_rotary_positions_are_relative():
    model = make_model()
    input_ids = random_ids(model.config, 1, 16)
    positions = torch.arange(16)[None]
    logits = model(input_ids).logits
    torch.testing.assert_close(model(input_ids, position_ids=positions).logits, logits)
    # RoPE sees only q-k distances: shifting a document's positions changes nothing, which is why
    # restarting them per packed document is exact; stretching them changes the output.
    shifted = model(input_ids, position_ids=positions + 100).logits
    torch.testing.assert_close(shifted, logits, atol=1e-4, rtol=0)
    assert not torch.allclose(model(input_ids, position_ids=2 * positions).logits, logits, atol=1e-3)


def test_varlen_layout_cuts_documents_and_drops_padding():
    rows = [[2, 3], [4]]
    doc_ids, _ = pack(rows, 6)
    indices, cu_seqlens, max_seqlen = DocumentMask(doc_ids).varlen
    lengths = [length for row in rows for length in row]
    assert cu_seqlens.tolist() == [0] + torch.tensor(lengths).cumsum(0).tolist()
    assert cu_seqlens.dtype == torch.int32
    assert max_seqlen == max(lengths)
    assert indices.tolist() == (doc_ids.flatten() >= 0).nonzero().squeeze(1).tolist()


def test_auto_kernel_falls_back_to_sdpa_without_flash():
    q = torch.zeros(1, 4, 2, 8)
    assert resolve_impl("auto", q, q) == "sdpa"
    with pytest.raises(RuntimeError, match="flash"):
        resolve_impl("flash", q, q)


def test_moe_forward_returns_positive_aux_loss_with_router_gradient():
    model = make_model("tiny-moe")
    out = model(random_ids(model.config, 2, 16))
    assert out.logits.shape == (2, 16, model.config.vocab_size)
    assert out.aux_loss.dim() == 0
    assert torch.isfinite(out.aux_loss) and out.aux_loss > 0
    out.aux_loss.backward()
    assert model.layers[0].ffn.router.weight.grad.abs().sum() > 0


def test_embeddings_tied_only_when_asked():
    tied = make_model()
    assert tied.lm_head.weight is tied.embed.weight
    untied = make_model(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.embed.weight


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_backward_reaches_every_parameter(preset):
    model = make_model(preset).train()
    input_ids = random_ids(model.config, 2, 16)
    out = model(input_ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), input_ids[:, 1:].flatten())
    if out.aux_loss is not None:
        loss = loss + out.aux_loss
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_save_load_round_trip(tmp_path, preset, tie_embeddings):
    model = make_model(preset, tie_embeddings=tie_embeddings)
    save_pretrained(model, tmp_path)
    loaded = load_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    assert (loaded.lm_head.weight is loaded.embed.weight) == tie_embeddings
    input_ids = random_ids(model.config, 2, 16)
    assert torch.equal(loaded(input_ids).logits, model(input_ids).logits)


def test_load_override_replaces_saved_config_field(tmp_path):
    save_pretrained(make_model(), tmp_path)
    assert load_pretrained(tmp_path, attn_impl="math").config.attn_impl == "math"


def test_load_missing_directory_names_the_path(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_pretrained(missing)


@pytest.mark.parametrize("file_name", [WEIGHTS_FILE, CONFIG_FILE])
def test_load_corrupt_file_names_the_path(tmp_path, file_name):
    save_pretrained(make_model(), tmp_path)
    (tmp_path / file_name).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / file_name))):
        load_pretrained(tmp_path)


def test_load_is_strict(tmp_path):
    model = make_model()
    save_pretrained(model, tmp_path)
    with pytest.raises(ValueError, match="do not fit"):
        load_pretrained(tmp_path, num_layers=model.config.num_layers + 1)


def test_save_state_dict_rejects_foreign_keys(tmp_path):
    model = make_model()
    wrapped = {f"module.{name}": tensor for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match="module.embed.weight"):
        save_state_dict(wrapped, model.config, tmp_path)


def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError) as error:
        ModelConfig.from_preset("no-such-preset")
    for name in PRESETS:
        assert name in str(error.value)


def test_config_dict_round_trip_and_unknown_keys():
    config = ModelConfig.from_preset("moe")
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="not_a_field"):
        ModelConfig.from_dict({**config.to_dict(), "not_a_field": 1})


def test_config_validation():
    with pytest.raises(ValueError, match="hidden_size"):
        ModelConfig(hidden_size=100, num_heads=8)
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig(num_heads=8, num_kv_heads=3)
    with pytest.raises(ValueError, match="attn_impl"):
        ModelConfig(attn_impl="fast")


def test_default_intermediate_size_is_swiglu_width_rounded_to_64():
    config = ModelConfig.from_preset("small")
    assert config.intermediate_size % 64 == 0
    assert 0 <= config.intermediate_size - 8 * config.hidden_size / 3 < 64


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_analytic_param_count_matches_module(preset, tie_embeddings):
    config = ModelConfig.from_preset(preset, tie_embeddings=tie_embeddings)
    with torch.device("meta"):
        model = Transformer(config)
    counted = sum(parameter.numel() for parameter in model.parameters())
    print(f"{preset} (tie_embeddings={tie_embeddings}): {counted:,} parameters")
    assert num_params(config) == counted
    assert num_params(config, include_embedding=False) == counted - model.embed.weight.numel()


def test_small_preset_is_minimind2_small_size():
    # MiniMind2-small is published as a 26M-parameter model.
    assert math.isclose(num_params(ModelConfig.from_preset("small")), 26e6, rel_tol=0.05)
