"""Run by tests/test_distributed_metrics.py in one process or under torchrun: one ZeRO-0 fp32 step of the `small` model
(where torch's fp32 CPU norm of the embedding gradient runs low) on each rank's own tokens, the norm of the gradients
its optimizer received (float64), the logged norm and torch's fp32 norm, written by rank 0 as JSON to the file named."""
import json
import sys

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from model import ModelConfig, Transformer
from train import distributed
from train.backend import build_backend
from train.config import TrainConfig


def float64_norm(grads) -> float:
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64)
                                                      for g in grads])))


distributed.init_distributed()
torch.manual_seed(0)
model = Transformer(ModelConfig.from_preset("small"))
cfg = TrainConfig(data_config="unused", deepspeed="ds_configs/zero0.json", grad_clip=1.0, learning_rate=1e-3,
                  warmup_ratio=0.0, batch_size=4)
engine = build_backend(cfg, distributed.world_size()).wrap(model, cfg, total_steps=10)
received = []
register_optimizer_step_pre_hook(
    lambda optimizer, args, kwargs: received.append(float64_norm(
        [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None])))
tokens = torch.randint(0, model.config.vocab_size, (4, 513),
                       generator=torch.Generator().manual_seed(1 + distributed.rank()))
logits = engine(tokens[:, :-1]).logits
engine.backward(torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()) * 30)
fp32 = float(torch.nn.utils.get_total_norm([p.grad for p in engine.module.parameters()]))
update = engine.step()
if distributed.is_main():
    json.dump({"received": received, "logged": update.grad_norm.item(), "fp32": fp32, "clip": cfg.grad_clip},
              open(sys.argv[1], "w"))
distributed.shutdown()
