"""Models in and out in Hugging Face format (model/hf.py), checked against `transformers` itself (fp32, logits within
1e-5): zerostage's exports load with AutoModelForCausalLM / AutoTokenizer, and --from_weight loads models built by
transformers and MiniMind-style .pth state dicts; what does not map is refused, naming the file and the keys."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from data.tokenizer import DEFAULT_TOKENIZER_DIR, load_tokenizer
from model import ModelConfig, Transformer, save_pretrained
from model.convert import main as convert
from model.hf import hf_model_type, hf_name, load_hf, load_language_model, load_minimind, save_hf
from train.config import REPO_ROOT, ConfigError, parse_config
from train.exports import export_language_model, resolve_from_weight
from train.stage import build_language_model

TOLERANCE = 1e-5
SPECIAL_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
MINIMIND3_TOKENIZER = REPO_ROOT / "tests/fixtures/minimind/minimind3-tokenizer"  # vendored with its LICENSE
DEFAULTS = dict(stage="sft", data_config="config/data/posttrain/sft/general.yaml")
SMALL = dict(vocab_size=6400, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=256,
             rope_parameters={"rope_type": "default", "rope_theta": 1e6})


def perturbed(model):
    """Every parameter moved off its initial value (norm weights off 1, biases off 0), so a swapped or dropped
    weight changes the logits."""
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model.eval()


def max_logit_difference(zerostage_model, hf_model) -> float:
    ids = torch.randint(0, zerostage_model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = zerostage_model.eval()(ids).logits, hf_model.eval()(ids).logits
    difference = (ours - theirs).abs().max().item()
    print(f"{type(hf_model).__name__}: max |logit difference| {difference:.2e}")
    return difference


EXPORTED = {
    "llama": ("LlamaForCausalLM", ModelConfig.from_preset("tiny")),
    "qwen3": ("Qwen3ForCausalLM", ModelConfig.from_preset("tiny", qk_norm=True, rms_norm_eps=1e-6)),
    "qwen2": ("Qwen2ForCausalLM", ModelConfig.from_preset("tiny", qkv_bias=True, tie_embeddings=False)),
    "qwen3_moe": ("Qwen3MoeForCausalLM", ModelConfig.from_preset("tiny-moe", num_shared_experts=0, qk_norm=True)),
    "qwen3_moe top-1": ("Qwen3MoeForCausalLM", ModelConfig.from_preset("tiny-moe", num_shared_experts=0, qk_norm=True,
                                                                       num_experts_per_tok=1)),
    "mixtral": ("MixtralForCausalLM", ModelConfig.from_preset("tiny-moe", num_shared_experts=0)),
}


@pytest.mark.parametrize("name", EXPORTED)
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, name):
    architecture, config = EXPORTED[name]
    model = perturbed(Transformer(config))
    save_hf(model.state_dict(), config, tmp_path, DEFAULT_TOKENIZER_DIR, SPECIAL_IDS)
    hf_model, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert type(hf_model).__name__ == architecture
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    assert hf_model.dtype == torch.float32
    assert max_logit_difference(model, hf_model) <= TOLERANCE
    # and zerostage reads its own Hugging Face export back, weight for weight
    assert max_logit_difference(model, load_language_model(tmp_path)) == 0.0


def test_minimind3_preset_exports_as_qwen3():
    config = ModelConfig.from_preset("minimind3")
    assert (config.hidden_size, config.num_layers, config.num_heads, config.num_kv_heads) == (768, 8, 8, 4)
    assert (config.intermediate_size, config.rms_norm_eps, config.qk_norm, config.tie_embeddings) == (2432, 1e-6,
                                                                                                      True, True)
    assert hf_model_type(config) == "qwen3"


def test_large_export_is_sharded_with_an_index_and_loads_both_ways(tmp_path):
    config = ModelConfig.from_preset("tiny", qk_norm=True)
    model = perturbed(Transformer(config))
    save_hf(model.state_dict(), config, tmp_path, DEFAULT_TOKENIZER_DIR, SPECIAL_IDS, max_shard_bytes=2**20)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (tmp_path / "model.safetensors").exists()
    assert max_logit_difference(model, AutoModelForCausalLM.from_pretrained(tmp_path)) <= TOLERANCE
    cfg = parse_config(DEFAULTS, ["--from_weight", str(tmp_path)])
    assert max_logit_difference(model, build_language_model(cfg, resolve_from_weight(cfg))) == 0.0


def test_stage_export_writes_hf_beside_zerostage_export_with_tokenizer_and_generation_config(tmp_path):
    tokenizer = load_tokenizer(DEFAULT_TOKENIZER_DIR)
    config = ModelConfig.from_preset("tiny")
    model = perturbed(Transformer(config))
    export_language_model(model.state_dict(), config, tmp_path, tokenizer)
    assert set(load_file(tmp_path / "model.safetensors")) == set(model.state_dict()) - {"lm_head.weight"}
    hf_dir = tmp_path / "hf"
    assert json.loads((hf_dir / "generation_config.json").read_text()) == SPECIAL_IDS
    assert max_logit_difference(model, AutoModelForCausalLM.from_pretrained(hf_dir)) <= TOLERANCE
    hf_tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    texts = ["Hello, world! 你好，世界。\n    def f(x):\n        return x ** 2", "tabs\tand  spaces \n\n end", ""]
    for text in texts:
        assert hf_tokenizer(text, add_special_tokens=False).input_ids == tokenizer.encode(text)
    assert (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id) == (
        tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)


@pytest.mark.parametrize("tokenizer_dir", [DEFAULT_TOKENIZER_DIR, MINIMIND3_TOKENIZER], ids=["shipped", "minimind3"])
def test_exported_tokenizer_renders_chats_as_zerostage_trained_on_them(tmp_path, tokenizer_dir):
    # The shipped tokenizer has no template of its own: the export carries the built-in ChatML it was trained with.
    tokenizer = load_tokenizer(tokenizer_dir)
    config = ModelConfig.from_preset("tiny")
    export_language_model(Transformer(config).state_dict(), config, tmp_path, tokenizer)
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello! 你好"}, {"role": "user", "content": "2+2?"}]
    for generation_prompt in (False, True):
        rendered = hf_tokenizer.apply_chat_template(chat, add_generation_prompt=generation_prompt)
        assert list(rendered["input_ids"]) == tokenizer.render_chat(chat, generation_prompt)[0]


def test_stage_export_of_a_model_without_a_standard_architecture_warns_and_keeps_its_own_export(tmp_path, capsys):
    config = ModelConfig.from_preset("tiny-moe")  # one always-on shared expert
    export_language_model(Transformer(config).state_dict(), config, tmp_path, load_tokenizer(DEFAULT_TOKENIZER_DIR))
    assert (tmp_path / "model.safetensors").is_file() and not (tmp_path / "hf").exists()
    assert "WARNING: no Hugging Face export" in capsys.readouterr().err


def test_convert_writes_an_existing_export_in_hf_format(tmp_path):
    model = perturbed(Transformer(ModelConfig.from_preset("tiny", qk_norm=True)))
    export = save_pretrained(model, tmp_path / "export")
    (export / "zerostage.json").write_text(json.dumps({"tokenizer": {"path": str(DEFAULT_TOKENIZER_DIR)}}))
    out = convert([str(export)])
    assert out == export / "hf" and (out / "tokenizer.json").is_file()
    assert max_logit_difference(model, AutoModelForCausalLM.from_pretrained(out)) <= TOLERANCE


def test_convert_refuses_a_model_no_standard_architecture_computes(tmp_path):
    export = save_pretrained(Transformer(ModelConfig.from_preset("tiny-moe")), tmp_path / "export")
    with pytest.raises(SystemExit, match="always-on shared expert"):
        convert([str(export), "--tokenizer", str(DEFAULT_TOKENIZER_DIR)])


# ----- import: models built by transformers -----
BUILT = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SMALL)),
    "llama tied": lambda: LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=True)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**SMALL, head_dim=16, tie_word_embeddings=True)),
}


@pytest.mark.parametrize("name", BUILT)
@pytest.mark.parametrize("shard", [None, "100KB"])
def test_from_weight_loads_a_transformers_model_with_the_same_logits(tmp_path, name, shard):
    hf_model = perturbed(BUILT[name]())
    hf_model.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    assert (tmp_path / "model.safetensors.index.json").is_file() == bool(shard)
    cfg = parse_config(DEFAULTS, ["--from_weight", str(tmp_path)])
    model = build_language_model(cfg, resolve_from_weight(cfg))
    assert (model.config.qk_norm, model.config.qkv_bias) == (name == "qwen3", name == "qwen2")
    assert max_logit_difference(model, hf_model) <= TOLERANCE


def minimind_state_dict(hf_model) -> dict:
    """What MiniMind's trainers torch.save: the model's state dict in fp16, the tied head included."""
    return {name: tensor.half() for name, tensor in hf_model.state_dict().items()}


def fp16_rounded(hf_model):
    with torch.no_grad():
        for parameter in hf_model.parameters():
            parameter.copy_(parameter.half().float())
    return hf_model


def test_from_weight_loads_a_minimind3_pth_with_its_config_from_model(tmp_path):
    # MiniMind-3 is Qwen3 under the same weight names (its scripts/convert_model.py relies on that).
    reference = fp16_rounded(perturbed(Qwen3ForCausalLM(Qwen3Config(**{**SMALL, "rms_norm_eps": 1e-6}, head_dim=16,
                                                                    tie_word_embeddings=True))))
    path = tmp_path / "full_sft_64.pth"
    torch.save(minimind_state_dict(reference), path)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    config = ModelConfig.from_preset("minimind3", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                     intermediate_size=96, max_seq_len=256)
    (model_dir / "config.json").write_text(json.dumps(config.to_dict()))
    cfg = parse_config(DEFAULTS, ["--from_weight", str(path), "--model", str(model_dir)])
    model = build_language_model(cfg, resolve_from_weight(cfg))
    assert max_logit_difference(model, reference) <= TOLERANCE


def test_minimind2_pth_with_minimind_config_json_beside_it(tmp_path):
    # MiniMind2 (2025-10): Llama-style (no q/k norms), tied, eps 1e-5, its own config.json fields.
    reference = fp16_rounded(perturbed(LlamaForCausalLM(LlamaConfig(**{**SMALL, "rms_norm_eps": 1e-5},
                                                                    tie_word_embeddings=True))))
    torch.save(minimind_state_dict(reference), tmp_path / "pretrain_64.pth")
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "minimind", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 6400, "rope_theta": 1e6,
        "max_position_embeddings": 256, "flash_attn": True, "use_moe": False, "n_routed_experts": 4,
        "n_shared_experts": 1, "scoring_func": "softmax", "aux_loss_alpha": 0.1, "seq_aux": True,
        "norm_topk_prob": True, "num_experts_per_tok": 2, "dropout": 0.0}))
    model = load_minimind(tmp_path / "pretrain_64.pth")
    assert model.config.rms_norm_eps == 1e-5 and not model.config.qk_norm
    assert max_logit_difference(model, reference) <= TOLERANCE


# ----- refusals -----
def test_pth_without_a_config_is_refused(tmp_path):
    torch.save(Transformer(ModelConfig.from_preset("tiny")).state_dict(), tmp_path / "x.pth")
    cfg = parse_config(DEFAULTS, ["--from_weight", str(tmp_path / "x.pth")])
    with pytest.raises(ConfigError, match=re.escape(f"--from_weight: {tmp_path / 'x.pth'}: a MiniMind checkpoint "
                                                    "holds no config; give the model as --model")):
        build_language_model(cfg, resolve_from_weight(cfg))


def test_pth_that_is_not_a_plain_state_dict_is_refused_without_running_it(tmp_path):
    torch.save({"model": {"w": torch.zeros(1)}, "optimizer": object()}, tmp_path / "resume.pth")
    with pytest.raises(ValueError, match="is not a state dict torch.load\\(weights_only=True\\) can read"):
        load_minimind(tmp_path / "resume.pth", ModelConfig.from_preset("tiny"))


@pytest.fixture
def llama_dir(tmp_path):
    perturbed(LlamaForCausalLM(LlamaConfig(**SMALL))).save_pretrained(tmp_path)
    return tmp_path


def edit_config(directory, **changes):
    values = json.loads((directory / "config.json").read_text())
    values.update(changes)
    (directory / "config.json").write_text(json.dumps(values))


def test_missing_and_unexpected_weights_are_refused_naming_file_and_keys(llama_dir):
    weights = load_file(llama_dir / "model.safetensors")
    weights["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, llama_dir / "model.safetensors")
    message = (f"{llama_dir / 'model.safetensors'} does not match its config (llama names): missing "
               "['model.layers.1.mlp.up_proj.weight'], unexpected ['model.layers.0.self_attn.q_norm.weight']")
    with pytest.raises(ValueError, match=re.escape(message)):
        load_hf(llama_dir)


def test_unknown_config_fields_are_refused(llama_dir):
    edit_config(llama_dir, attn_logit_softcapping=30.0)
    with pytest.raises(ValueError, match=re.escape(f"{llama_dir / 'config.json'}: unknown config fields "
                                                   "['attn_logit_softcapping']")):
        load_hf(llama_dir)


@pytest.mark.parametrize("changes, reason", [
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}), "only plain RoPE"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "RoPE scaling is not implemented"),
    (dict(attention_bias=True), "no biases"),
    (dict(mlp_bias=True), "no biases"),
    (dict(head_dim=32), "head_dim must be 16"),
    (dict(hidden_act="gelu"), "SwiGLU"),
    (dict(model_type="gemma"), "model_type 'gemma' cannot be loaded"),
])
def test_unsupported_features_are_refused(llama_dir, changes, reason):
    edit_config(llama_dir, **changes)
    with pytest.raises(ValueError, match=re.escape(reason)):
        load_hf(llama_dir)


def test_sliding_window_is_refused(tmp_path):
    Qwen2ForCausalLM(Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=8)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="sliding-window attention is not implemented"):
        load_hf(tmp_path)


def test_minimind3_top1_moe_pth_is_refused_with_a_config_from_model(tmp_path):
    config = ModelConfig.from_preset("tiny-moe", qk_norm=True, num_shared_experts=0, num_experts_per_tok=1)
    state_dict = Transformer(config).state_dict()
    torch.save({hf_name(name, "minimind"): tensor for name, tensor in state_dict.items()}, tmp_path / "x.pth")
    with pytest.raises(ValueError, match="MiniMind-3's top-1 MoE gives the chosen expert weight 1"):
        load_minimind(tmp_path / "x.pth", config)


def test_tied_head_that_differs_from_the_embedding_is_refused(tmp_path):
    reference = perturbed(Qwen3ForCausalLM(Qwen3Config(**SMALL, head_dim=16, tie_word_embeddings=True)))
    state_dict = minimind_state_dict(reference)
    state_dict["lm_head.weight"] = state_dict["lm_head.weight"].clone() + 1
    torch.save(state_dict, tmp_path / "x.pth")
    config = ModelConfig.from_preset("minimind3", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                     intermediate_size=96)
    with pytest.raises(ValueError, match="lm_head.weight differs from the embedding"):
        load_minimind(tmp_path / "x.pth", config)


def test_only_safetensors_are_read(llama_dir):
    (llama_dir / "model.safetensors").rename(llama_dir / "pytorch_model.bin")
    with pytest.raises(ValueError, match=re.escape("holds no model.safetensors or model.safetensors.index.json "
                                                   "(other weight files: ['pytorch_model.bin']); zerostage reads "
                                                   "safetensors only")):
        load_hf(llama_dir)
