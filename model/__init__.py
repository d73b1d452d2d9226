"""MiniMind-style decoder-only language model: config, module, generation, FLOPs, checkpoints."""

from model.config import PRESETS, ModelConfig
from model.flops import (attention_flops, forward_flops, generation_bytes_read, generation_flops,
                         lm_head_flops_per_token, matmul_flops_per_token, num_params, training_flops)
from model.generate import Generation, generate
from model.kv_cache import KVCache
from model.model import ModelOutput, Transformer
from model.value_head import RewardModel, load_reward_model, save_reward_model
from model.weights import load_pretrained, save_pretrained, save_state_dict

__all__ = [
    "PRESETS", "ModelConfig", "Transformer", "ModelOutput", "KVCache", "Generation", "generate",
    "load_pretrained", "save_pretrained", "save_state_dict", "attention_flops", "forward_flops", "generation_flops",
    "generation_bytes_read", "lm_head_flops_per_token", "matmul_flops_per_token", "num_params", "training_flops",
    "RewardModel", "load_reward_model", "save_reward_model",
]
