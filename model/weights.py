"""Checkpoints as a directory: config.json (the ModelConfig) and model.safetensors (the weights)."""

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.config import ModelConfig
from model.model import Transformer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def save_pretrained(model: Transformer, directory: str | Path) -> Path:
    return save_state_dict(model.state_dict(), model.config, directory)


def save_state_dict(state_dict: dict[str, torch.Tensor], config: ModelConfig, directory: str | Path) -> Path:
    """Write a full (unsharded) state dict of Transformer(config), e.g. one a trainer gathered itself."""
    directory = Path(directory)
    tied = Transformer.tied_weights if config.tie_embeddings else {}
    _check_names(set(state_dict) | set(tied), config, f"state dict for {directory}")
    for name, source in tied.items():
        if name in state_dict and not torch.equal(state_dict[name], state_dict[source]):
            raise ValueError(f"{name} should be tied to {source} but holds different values")
    # safetensors refuses tensors that share memory, so a tied weight is stored once, as its source.
    tensors = {name: tensor.detach().cpu().contiguous()
               for name, tensor in state_dict.items() if name not in tied}
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    return directory


def load_pretrained(directory: str | Path, map_location: str | torch.device = "cpu",
                    **config_overrides) -> Transformer:
    """Rebuild the model saved in directory; config_overrides replace saved fields (e.g. attn_impl)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint file {path} does not exist")
    try:
        saved_config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"corrupt model config {config_path}: {error}") from error
    config = ModelConfig.from_dict({**saved_config, **config_overrides}, str(config_path))
    try:
        state_dict = load_file(weights_path, device=str(map_location))
    except SafetensorError as error:
        raise ValueError(f"corrupt weights file {weights_path}: {error}") from error
    if "value_head.weight" in state_dict:
        raise ValueError(f"{directory} holds a reward model (it has a value head), not a language model; "
                         f"load it with model.value_head.load_reward_model")

    if config.tie_embeddings:
        for name, source in Transformer.tied_weights.items():
            if source in state_dict:
                state_dict[name] = state_dict[source]
    return load_strict(Transformer, config, state_dict, weights_path, map_location)


def load_strict(model_class, config: ModelConfig, state_dict: dict, weights_path: Path, map_location):
    """model_class(config) built on map_location with exactly these weights; a mismatch names the file."""
    with torch.device(map_location):
        model = model_class(config)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise ValueError(f"weights in {weights_path} do not fit the model config: {error}") from error
    return model


def _check_names(names: set[str], config: ModelConfig, source: str):
    with torch.device("meta"):
        expected = set(Transformer(config).state_dict())
    missing, unexpected = sorted(expected - names), sorted(names - expected)
    if missing or unexpected:
        raise ValueError(f"{source} does not match the model config: "
                         f"missing {missing or 'none'}, unexpected {unexpected or 'none'}")
