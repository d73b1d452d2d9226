"""A scalar-output model: the decoder's final hidden states through Linear(hidden, 1) instead of the LM head.

It is the reward model of the reward stage (one score per sequence, read at its last token) and what PPO
loads as its reward model or critic (a value per token). On disk it is a directory like a language model's,
config.json + model.safetensors, with the decoder under `backbone.*` and the head under `value_head.*`, so
neither loader can mistake one kind for the other.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from model.attention import Documents
from model.config import ModelConfig
from model.flops import forward_flops
from model.model import Transformer
from model.weights import CONFIG_FILE, WEIGHTS_FILE, load_strict

HEAD_WEIGHT = "value_head.weight"


@dataclass
class ValueOutput:
    values: torch.Tensor  # [B, T]: the score of each position, having seen the tokens up to it
    aux_loss: torch.Tensor | None = None  # MoE load balancing, as in ModelOutput


class RewardModel(nn.Module):
    def __init__(self, config: ModelConfig, backbone: Transformer | None = None):
        super().__init__()
        self.config = config
        self.backbone = Transformer(config) if backbone is None else backbone
        # The vocabulary projection is never used here; an untied one would be a parameter without gradients.
        self.backbone.lm_head = nn.Identity()
        self.value_head = nn.Linear(config.hidden_size, 1)
        # Every sequence scores 0 at the start: the untrained model is exactly at chance, not randomly biased.
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, documents: Documents | None = None) -> ValueOutput:
        out = self.backbone(input_ids, doc_ids=doc_ids, position_ids=position_ids, return_hidden=True,
                            documents=documents)
        return ValueOutput(values=self.value_head(out.hidden).squeeze(-1), aux_loss=out.aux_loss)


def value_forward_flops(config: ModelConfig, doc_lengths) -> int:
    """Forward FLOPs of RewardModel on documents of these lengths: the decoder without its LM head, plus the
    value head (2·H per token)."""
    tokens = int(sum(int(length) for length in doc_lengths))
    return forward_flops(config, doc_lengths, lm_head_tokens=0) + 2 * config.hidden_size * tokens


def save_reward_model(state_dict: dict[str, torch.Tensor], config: ModelConfig, directory: str | Path) -> Path:
    """Write a full (unsharded) RewardModel state dict, e.g. one a trainer gathered itself."""
    directory = Path(directory)
    with torch.device("meta"):
        expected = set(RewardModel(config).state_dict())
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise ValueError(f"reward model state dict for {directory} does not match the model config: "
                         f"missing {missing or 'none'}, unexpected {unexpected or 'none'}")
    directory.mkdir(parents=True, exist_ok=True)
    save_file({name: tensor.detach().cpu().contiguous() for name, tensor in state_dict.items()},
              directory / WEIGHTS_FILE, metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    return directory


def is_reward_model(directory: str | Path) -> bool:
    if not (Path(directory) / WEIGHTS_FILE).is_file():  # a MiniMind .pth or a sharded transformers directory
        return False
    with safe_open(Path(directory) / WEIGHTS_FILE, framework="pt") as weights:
        return HEAD_WEIGHT in weights.keys()


def load_reward_model(directory: str | Path, map_location: str | torch.device = "cpu") -> RewardModel:
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"reward model file {path} does not exist")
    try:
        state_dict = load_file(weights_path, device=str(map_location))
    except SafetensorError as error:
        raise ValueError(f"corrupt weights file {weights_path}: {error}") from error
    if HEAD_WEIGHT not in state_dict:
        raise ValueError(f"{directory} is not a reward model: its weights have no {HEAD_WEIGHT} (a language model "
                         f"export?); train one with the reward stage (bash launch/run_reward.sh)")
    config = ModelConfig.from_dict(json.loads(config_path.read_text(encoding="utf-8")), str(config_path))
    return load_strict(RewardModel, config, state_dict, weights_path, map_location)
