"""The model in Hugging Face `transformers`' format, both ways, and MiniMind's `.pth` checkpoints.

zerostage's Transformer is, weight for weight, one of transformers' standard decoders:

    llama      RMSNorm, RoPE, grouped-query attention, SwiGLU (the plain presets)
    qwen2      llama + biases on the q, k and v projections (qkv_bias)
    qwen3      llama + an RMSNorm on each head's queries and keys (qk_norm)
    qwen3_moe  qwen3 with routed experts only (no shared experts)
    mixtral    llama with routed experts only, top-k >= 2

Anything else (shared experts, both biases and q/k norms, RoPE scaling, sliding windows, ...) has no exact
counterpart and is refused with the reason, never approximated. Files read here are data: safetensors, or
torch.load(weights_only=True) for MiniMind's `.pth`; nothing is downloaded and no remote code runs.
"""

import json
import math
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model.config import ModelConfig
from model.model import Transformer
from model.weights import load_pretrained, load_strict

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM"}
MAX_SHARD_BYTES = 5 * 2**30  # transformers' own default shard size before v5

# zerostage name -> the standard checkpoint name (transformers reads these, and converts MoE experts itself).
_RENAMES = [
    (r"^embed\.", "model.embed_tokens."),
    (r"^norm\.", "model.norm."),
    (r"^layers\.(\d+)\.attn_norm\.", r"model.layers.\1.input_layernorm."),
    (r"^layers\.(\d+)\.ffn_norm\.", r"model.layers.\1.post_attention_layernorm."),
    (r"^layers\.(\d+)\.attn\.", r"model.layers.\1.self_attn."),
    (r"^layers\.(\d+)\.ffn\.router\.", r"model.layers.\1.mlp.gate."),
    (r"^layers\.(\d+)\.ffn\.", r"model.layers.\1.mlp."),
]
_MIXTRAL_RENAMES = [
    (r"\.mlp\.gate\.", ".block_sparse_moe.gate."),
    (r"\.mlp\.experts\.(\d+)\.gate_proj\.", r".block_sparse_moe.experts.\1.w1."),
    (r"\.mlp\.experts\.(\d+)\.down_proj\.", r".block_sparse_moe.experts.\1.w2."),
    (r"\.mlp\.experts\.(\d+)\.up_proj\.", r".block_sparse_moe.experts.\1.w3."),
]


def hf_name(name: str, model_type: str) -> str:
    """The checkpoint name transformers (and MiniMind, which uses Qwen3's) gives zerostage's weight `name`."""
    for pattern, replacement in _RENAMES:
        if re.match(pattern, name):
            name = re.sub(pattern, replacement, name)
            break
    if model_type == "mixtral":
        for pattern, replacement in _MIXTRAL_RENAMES:
            name = re.sub(pattern, replacement, name)
    return name


def hf_model_type(config: ModelConfig) -> str:
    """The transformers architecture that computes exactly what Transformer(config) does; ValueError if none."""
    if config.qk_norm and config.qkv_bias:
        raise ValueError("no standard transformers architecture has both q/k norms and q/k/v biases "
                         "(Qwen3's attention_bias puts a bias on o_proj too)")
    if not config.use_moe:
        return "qwen3" if config.qk_norm else "qwen2" if config.qkv_bias else "llama"
    if config.num_shared_experts:
        raise ValueError(f"no standard transformers architecture has {config.num_shared_experts} always-on shared "
                         "expert(s) beside GQA attention (Qwen2-MoE gates its shared expert by a sigmoid, "
                         "DeepSeek-V2/V3 use latent attention); use num_shared_experts=0 for a Qwen3-MoE (qk_norm) "
                         "or Mixtral model")
    if config.qkv_bias:
        raise ValueError("no standard transformers MoE architecture has q/k/v biases")
    if config.qk_norm:
        return "qwen3_moe"
    if config.num_experts_per_tok < 2:
        raise ValueError("Mixtral renormalises the chosen experts' weights, so one expert a token would get weight 1 "
                         "where zerostage keeps its router probability; use qk_norm (Qwen3-MoE) or top-k >= 2")
    return "mixtral"


def hf_config(config: ModelConfig, special_ids: dict) -> dict:
    """config.json for transformers; special_ids: bos/eos/pad_token_id of the tokenizer."""
    model_type = hf_model_type(config)
    values = dict(
        architectures=[ARCHITECTURES[model_type]], model_type=model_type, vocab_size=config.vocab_size,
        hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim, hidden_act="silu",
        max_position_embeddings=config.max_seq_len, rms_norm_eps=config.rms_norm_eps,
        # rope_parameters is transformers 5's place for theta; rope_theta is where 4.x, vLLM and llama.cpp read it.
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta}, rope_theta=config.rope_theta,
        tie_word_embeddings=config.tie_embeddings, initializer_range=config.init_std, attention_dropout=0.0,
        use_cache=True, dtype="float32", **special_ids)
    if model_type == "llama":
        values.update(attention_bias=False, mlp_bias=False)
    if model_type in ("qwen2", "qwen3", "qwen3_moe"):
        values.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.num_layers)
    if model_type in ("qwen3", "qwen3_moe"):
        values.update(attention_bias=False)
    if model_type == "qwen3_moe":
        values.update(num_experts=config.num_experts, num_experts_per_tok=config.num_experts_per_tok,
                      moe_intermediate_size=config.intermediate_size, norm_topk_prob=config.num_experts_per_tok > 1,
                      decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=config.moe_aux_loss_coef)
    if model_type == "mixtral":
        values.update(num_local_experts=config.num_experts, num_experts_per_tok=config.num_experts_per_tok,
                      sliding_window=None, router_aux_loss_coef=config.moe_aux_loss_coef, router_jitter_noise=0.0)
    return values


def special_token_ids(tokenizer) -> dict:
    """bos/eos/pad_token_id of a data.tokenizer.Tokenizer, leaving out the tokens it names none of (as transformers)."""
    ids = {}
    for name in ("bos", "eos", "pad"):
        try:
            ids[f"{name}_token_id"] = getattr(tokenizer, f"{name}_id")
        except ValueError:
            continue
    return ids


def save_hf(state_dict: dict[str, torch.Tensor], config: ModelConfig, directory: str | Path,
            tokenizer_dir: str | Path | None = None, special_ids: dict | None = None, chat_template: str | None = None,
            max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write a full Transformer(config) state dict as a transformers model directory: config.json,
    generation_config.json, safetensors (sharded with an index above max_shard_bytes), the tokenizer's files and
    chat_template (as chat_template.jinja) when given."""
    directory = Path(directory)
    special_ids = special_ids or {}
    values = hf_config(config, special_ids)
    model_type = values["model_type"]
    tied = {"lm_head.weight"} if config.tie_embeddings else set()
    tensors = {hf_name(name, model_type): tensor.detach().cpu().contiguous()
               for name, tensor in state_dict.items() if name not in tied}
    directory.mkdir(parents=True, exist_ok=True)
    _write_weights(tensors, directory, max_shard_bytes)
    (directory / CONFIG_FILE).write_text(json.dumps(values, indent=2) + "\n")
    (directory / GENERATION_CONFIG_FILE).write_text(json.dumps(special_ids, indent=2) + "\n")
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copyfile(Path(tokenizer_dir) / name, directory / name)
    if chat_template is not None:
        (directory / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    return directory


def _write_weights(tensors: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int):
    for stale in [*directory.glob("model-*-of-*.safetensors"), directory / WEIGHTS_FILE, directory / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    shards, size = [{}], 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})
        return
    weight_map = {}
    for index, shard in enumerate(shards, 1):
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (directory / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                   indent=2) + "\n")


class _Fields:
    """A foreign config read strictly: every key is used, checked or known to leave the logits unchanged."""

    def __init__(self, values: dict, source: str):
        self.values, self.source, self.seen = values, source, set()

    def take(self, key, default=None):
        self.seen.add(key)
        value = self.values.get(key, default)
        if value is None and default is None:
            raise ValueError(f"{self.source}: no '{key}'")
        return value

    def require(self, key, allowed, why: str):
        """key may be absent; if present its value must pass allowed(value), else the model is not zerostage's."""
        self.seen.add(key)
        if key in self.values and not allowed(self.values[key]):
            raise ValueError(f"{self.source}: {key} = {self.values[key]!r} is not supported: {why}")

    def ignore(self, *keys):
        self.seen.update(keys)

    def finish(self):
        unknown = sorted(set(self.values) - self.seen)
        if unknown:
            raise ValueError(f"{self.source}: unknown config fields {unknown}: zerostage cannot tell whether they "
                             f"change the model, so it does not load it")


# Fields that do not change what the model computes: metadata, token ids, training-only settings.
_NO_EFFECT = ("architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "bos_token_id",
              "eos_token_id", "pad_token_id", "use_cache", "attention_dropout", "output_router_logits",
              "router_jitter_noise", "pretraining_tp", "auto_map", "_name_or_path")


def config_from_hf(values: dict, source: str, has_qk_norm: bool = False) -> ModelConfig:
    """The ModelConfig of a transformers config.json (llama, qwen2, qwen3, qwen3_moe, mixtral) or of MiniMind's own
    (model_type minimind; has_qk_norm: its weights have q/k norms, i.e. MiniMind-3 rather than MiniMind2)."""
    model_type = values.get("model_type")
    if model_type == "minimind":
        return _config_from_minimind(values, source, has_qk_norm)
    if model_type not in ARCHITECTURES:
        raise ValueError(f"{source}: model_type {model_type!r} cannot be loaded; zerostage reads "
                         f"{', '.join(ARCHITECTURES)} (and MiniMind's minimind)")
    fields = _Fields(values, source)
    fields.ignore(*_NO_EFFECT)
    heads = fields.take("num_attention_heads")
    hidden = fields.take("hidden_size")
    fields.require("head_dim", lambda v: v in (None, hidden // heads),
                   f"zerostage's heads split hidden_size: head_dim must be {hidden // heads}")
    fields.require("hidden_act", lambda v: v == "silu", "zerostage's FFN is SwiGLU (silu)")
    fields.require("rope_scaling", lambda v: v is None, "RoPE scaling is not implemented")
    fields.require("rope_parameters", lambda v: v is None or (v.get("rope_type", "default") == "default" and set(v)
                   <= {"rope_type", "rope_theta"}), "only plain RoPE (rope_type default, no scaling) is implemented")
    fields.require("partial_rotary_factor", lambda v: v == 1.0, "RoPE rotates every channel here")
    rope_theta = (values.get("rope_parameters") or {}).get("rope_theta", values.get("rope_theta", 10000.0))
    fields.ignore("rope_theta")
    config = dict(
        vocab_size=fields.take("vocab_size"), hidden_size=hidden, num_layers=fields.take("num_hidden_layers"),
        num_heads=heads, num_kv_heads=fields.take("num_key_value_heads", heads),
        max_seq_len=fields.take("max_position_embeddings"), rms_norm_eps=fields.take("rms_norm_eps"),
        rope_theta=float(rope_theta), tie_embeddings=bool(fields.take("tie_word_embeddings", False)),
        init_std=fields.take("initializer_range", 0.02), qk_norm=model_type in ("qwen3", "qwen3_moe"),
        qkv_bias=model_type == "qwen2")
    no_bias = "zerostage's projections have no biases (but Qwen2's q/k/v ones)"
    fields.require("attention_bias", lambda v: not v, no_bias)
    fields.require("mlp_bias", lambda v: not v, no_bias)
    fields.require("use_sliding_window", lambda v: not v, "sliding-window attention is not implemented")
    # Qwen's sliding_window counts only with use_sliding_window (layer_types then says where); Mixtral's when set.
    fields.require("sliding_window", lambda v: v is None or model_type != "mixtral",
                   "sliding-window attention is not implemented")
    fields.require("layer_types", lambda v: set(v) <= {"full_attention"}, "every layer attends fully here")
    fields.ignore("max_window_layers")
    if model_type == "qwen3_moe":
        top_k = fields.take("num_experts_per_tok")
        fields.require("decoder_sparse_step", lambda v: v == 1, "every layer is MoE here")
        fields.require("mlp_only_layers", lambda v: not v, "every layer is MoE here")
        fields.require("norm_topk_prob", lambda v: bool(v) == (top_k > 1),
                       "zerostage renormalises the chosen experts' weights exactly when top-k > 1")
        fields.ignore("intermediate_size")  # the width of dense layers, which mlp_only_layers = [] leaves none of
        config.update(use_moe=True, num_experts=fields.take("num_experts"), num_experts_per_tok=top_k,
                      num_shared_experts=0, intermediate_size=fields.take("moe_intermediate_size"),
                      moe_aux_loss_coef=fields.take("router_aux_loss_coef", 0.001))
    elif model_type == "mixtral":
        top_k = fields.take("num_experts_per_tok")
        if top_k < 2:
            raise ValueError(f"{source}: Mixtral with one expert a token gives it weight 1; zerostage's router "
                             "probability would differ")
        config.update(use_moe=True, num_experts=fields.take("num_local_experts"), num_experts_per_tok=top_k,
                      num_shared_experts=0, intermediate_size=fields.take("intermediate_size"),
                      moe_aux_loss_coef=fields.take("router_aux_loss_coef", 0.001))
    else:
        config.update(intermediate_size=fields.take("intermediate_size"))
    fields.finish()
    return ModelConfig.from_dict(config, source)


def _config_from_minimind(values: dict, source: str, has_qk_norm: bool) -> ModelConfig:
    """MiniMindConfig's fields with its defaults: MiniMind-3's (2026) when the weights have q/k norms, else
    MiniMind2's (2025-10), whose MoE has shared experts and other field names."""
    fields = _Fields(values, source)
    fields.ignore(*_NO_EFFECT, "flash_attn", "aux_loss_alpha", "seq_aux", "dropout", "intermediate_size")
    hidden = fields.take("hidden_size", 768 if has_qk_norm else 512)
    heads = fields.take("num_attention_heads", 8)
    fields.require("head_dim", lambda v: v == hidden // heads,
                   f"head_dim must be hidden_size/heads = {hidden // heads}")
    fields.require("hidden_act", lambda v: v == "silu", "zerostage's FFN is SwiGLU (silu)")
    fields.require("inference_rope_scaling", lambda v: not v, "YaRN RoPE scaling is not implemented")
    fields.require("rope_scaling", lambda v: v is None, "RoPE scaling is not implemented")
    fields.require("scoring_func", lambda v: v == "softmax", "the router is a softmax")
    width = math.ceil(hidden * math.pi / 64) * 64 if has_qk_norm else None  # MiniMind2: zerostage's default rule
    config = dict(
        vocab_size=fields.take("vocab_size", 6400), hidden_size=hidden,
        num_layers=fields.take("num_hidden_layers", 8), num_heads=heads,
        num_kv_heads=fields.take("num_key_value_heads", 4 if has_qk_norm else 2),
        intermediate_size=values.get("intermediate_size") or width,
        max_seq_len=fields.take("max_position_embeddings", 32768),
        rms_norm_eps=fields.take("rms_norm_eps", 1e-6 if has_qk_norm else 1e-5),
        rope_theta=float(fields.take("rope_theta", 1e6)), qk_norm=has_qk_norm,
        tie_embeddings=bool(fields.take("tie_word_embeddings", True)) if has_qk_norm else True,
        use_moe=bool(fields.take("use_moe", False)))
    if has_qk_norm:
        top_k = fields.take("num_experts_per_tok", 1)
        fields.require("moe_intermediate_size", lambda v: v == config["intermediate_size"],
                       "zerostage's experts are intermediate_size wide")
        if config["use_moe"] and bool(values.get("norm_topk_prob", True)) != (top_k > 1):
            raise ValueError(f"{source}: norm_topk_prob {values.get('norm_topk_prob', True)} with top-{top_k}: "
                             "zerostage renormalises the chosen experts' weights exactly when top-k > 1 (MiniMind-3's "
                             "top-1 MoE gives its expert weight 1, zerostage the router probability)")
        fields.ignore("norm_topk_prob")
        experts, shared, coef = fields.take("num_experts", 4), 0, fields.take("router_aux_loss_coef", 5e-4)
    else:
        top_k = fields.take("num_experts_per_tok", 2)
        fields.require("norm_topk_prob", lambda v: v or top_k == 1, "zerostage renormalises top-k > 1 weights")
        experts, shared = fields.take("n_routed_experts", 4), fields.take("n_shared_experts", 1)
        coef = values.get("aux_loss_alpha", 0.1)
    if config["use_moe"]:
        config.update(num_experts=experts, num_experts_per_tok=top_k, num_shared_experts=shared,
                      moe_aux_loss_coef=coef)
    fields.finish()
    return ModelConfig.from_dict({k: v for k, v in config.items() if v is not None}, source)


def is_hf_directory(directory: str | Path) -> bool:
    """A transformers model directory: a config.json that names its model_type."""
    config_path = Path(directory) / CONFIG_FILE
    try:
        return config_path.is_file() and "model_type" in json.loads(config_path.read_text(encoding="utf-8"))
    except ValueError:
        return False


def load_hf(directory: str | Path, map_location: str | torch.device = "cpu") -> Transformer:
    """A transformers Llama / Qwen2 / Qwen3 / Qwen3-MoE / Mixtral directory (safetensors, sharded or not)."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    try:
        values = json.loads(config_path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ValueError(f"corrupt model config {config_path}: {error}") from error
    config = config_from_hf(values, str(config_path))
    files = _weight_files(directory)
    tensors, origin = {}, {}
    for file in files:
        try:
            with safe_open(file, framework="pt", device=str(map_location)) as weights:
                for name in weights.keys():
                    tensors[name], origin[name] = weights.get_tensor(name), file.name
        except SafetensorError as error:
            raise ValueError(f"corrupt weights file {file}: {error}") from error
    source = str(files[0] if len(files) == 1 else directory / INDEX_FILE)
    return _load_renamed(tensors, config, values["model_type"], source, map_location)


def _weight_files(directory: Path) -> list[Path]:
    if (directory / INDEX_FILE).is_file():
        weight_map = json.loads((directory / INDEX_FILE).read_text(encoding="utf-8"))["weight_map"]
        files = [directory / name for name in sorted(set(weight_map.values()))]
    elif (directory / WEIGHTS_FILE).is_file():
        files = [directory / WEIGHTS_FILE]
    else:
        other = sorted(p.name for p in directory.glob("*.bin")) or "none"
        raise ValueError(f"{directory} holds no {WEIGHTS_FILE} or {INDEX_FILE} (other weight files: {other}); "
                         f"zerostage reads safetensors only")
    for file in files:
        if not file.is_file():
            raise ValueError(f"{directory / INDEX_FILE} names {file.name}, which does not exist")
    return files


def load_minimind(path: str | Path, config: ModelConfig | None = None,
                  map_location: str | torch.device = "cpu") -> Transformer:
    """A MiniMind checkpoint (a `.pth` state dict under MiniMind's Qwen3-style names, often fp16). Its config is
    a config.json beside it (zerostage's, transformers' or MiniMind's own), else `config` (from --model)."""
    path = Path(path)
    try:
        tensors = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # pickle, zip and weights_only refusals all mean: not a plain state dict
        raise ValueError(f"{path} is not a state dict torch.load(weights_only=True) can read: {error}") from error
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise ValueError(f"{path} is not a state dict of tensors (a MiniMind resume checkpoint? give the model's .pth)")
    config_path = path.parent / CONFIG_FILE
    has_qk_norm = any(name.endswith("self_attn.q_norm.weight") for name in tensors)
    values = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else None
    if values is not None and "model_type" in values:
        return _load_renamed(tensors, config_from_hf(values, str(config_path), has_qk_norm), "minimind", str(path),
                             map_location)
    if values is not None:
        config = ModelConfig.from_dict(values, str(config_path))
    elif config is None:
        raise ValueError(f"{path}: a MiniMind checkpoint holds no config; give the model as --model (a preset such as "
                         f"minimind3 or small, or a directory with config.json), or put its config.json beside it")
    if has_qk_norm and config.use_moe and config.num_experts_per_tok == 1:
        raise ValueError(f"{path}: MiniMind-3's top-1 MoE gives the chosen expert weight 1 (norm_topk_prob), "
                         "zerostage's the router probability: not the same model; its MoE loads with top-k >= 2")
    return _load_renamed(tensors, config, "minimind", str(path), map_location)


def _load_renamed(tensors: dict, config: ModelConfig, model_type: str, source: str, map_location) -> Transformer:
    """Transformer(config) holding these checkpoint-named tensors, all of them and nothing else."""
    with torch.device("meta"):
        expected = list(Transformer(config).state_dict())
    tied = config.tie_embeddings
    names = {hf_name(name, model_type): name for name in expected if not (tied and name == "lm_head.weight")}
    if tied and "lm_head.weight" in tensors:  # a checkpoint may store the tied head too: it must be the embedding
        embedding = tensors.get(hf_name("embed.weight", model_type))
        if embedding is not None and not torch.equal(tensors.pop("lm_head.weight"), embedding):
            raise ValueError(f"{source}: tie_word_embeddings is set but lm_head.weight differs from the embedding")
    missing, unexpected = sorted(set(names) - set(tensors)), sorted(set(tensors) - set(names))
    if missing or unexpected:
        raise ValueError(f"{source} does not match its config ({model_type} names): "
                         f"missing {missing or 'none'}, unexpected {unexpected or 'none'}")
    state_dict = {names[name]: tensor for name, tensor in tensors.items()}
    if tied:
        state_dict["lm_head.weight"] = state_dict["embed.weight"]
    return load_strict(Transformer, config, state_dict, Path(source), map_location)


def load_language_model(source: str | Path, config: ModelConfig | None = None,
                        map_location: str | torch.device = "cpu") -> Transformer:
    """What --from_weight names: a MiniMind .pth (config: beside it, else `config`), a transformers directory, or
    zerostage's own export."""
    source = Path(source)
    if source.suffix == ".pth":
        return load_minimind(source, config, map_location)
    if is_hf_directory(source):
        return load_hf(source, map_location)
    return load_pretrained(source, map_location)
