"""Run under torchrun by tests/test_fsdp.py: the FSDP engine's grad norm against norms of the full gradients
gathered from the shards (in float64), written by rank 0 to the file named."""
import json
import sys

import torch

from model import ModelConfig, Transformer
from train import distributed
from train.config import TrainConfig
from train.backend import build_backend

distributed.init_distributed()
torch.manual_seed(0)
model = Transformer(ModelConfig.from_preset("tiny"))
cfg = TrainConfig(data_config="unused", backend="fsdp", grad_clip=0.5, learning_rate=1e-3, warmup_ratio=0.0)
engine = build_backend(cfg, distributed.world_size()).wrap(model, cfg, total_steps=10)
generator = torch.Generator().manual_seed(1 + distributed.rank())  # each rank its own batch
tokens = torch.randint(0, model.config.vocab_size, (2, 33), generator=generator)
logits = engine(tokens[:, :-1]).logits
engine.backward(torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()))
grads = [p.grad.full_tensor() for p in engine.module.parameters()]
float64 = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads]))
update = engine.step()
if distributed.is_main():
    json.dump({"engine": update.grad_norm.item(), "float64": float64.item(),
               "world_size": distributed.world_size()}, open(sys.argv[1], "w"))
distributed.shutdown()
