"""Run under torchrun (2 CPU ranks) by tests/test_activation_checkpointing.py: under each backend, the tiny model
trained 2 steps from the same weights on the same packed tokens, fp32, once as before (blocks' activations kept,
whole logits) and once with --activation_checkpointing and --loss_chunk_tokens 24. Rank 0 writes results.json:
per run, each step's loss and pre-clip grad norm."""
import json
import sys
from pathlib import Path

import torch

from model import ModelConfig, Transformer
from train import distributed
from train.backend import build_backend, unwrap
from train.config import TrainConfig

BACKENDS = {"zero0": ("deepspeed", "ds_configs/zero0.json"), "zero1": ("deepspeed", "ds_configs/zero1.json"),
            "zero2": ("deepspeed", "ds_configs/zero2.json"), "zero3": ("deepspeed", "ds_configs/zero3.json"),
            "fsdp": ("fsdp", "")}

distributed.init_distributed()
out = Path(sys.argv[1])
rank = distributed.rank()
generator = torch.Generator().manual_seed(7 + rank)
tokens = torch.randint(0, 6400, (2, 2, 65), generator=generator)  # per step, this rank's rows
doc_ids = torch.tensor([0] * 30 + [1] * 34).expand(2, -1)  # two packed documents a row
position_ids = torch.cat([torch.arange(30), torch.arange(34)]).expand(2, -1)
results = {}
for name, (backend_name, ds_config) in BACKENDS.items():
    for checkpointed in (False, True):
        torch.manual_seed(0)
        module = Transformer(ModelConfig.from_preset("tiny"))
        cfg = TrainConfig(data_config="unused", backend=backend_name, deepspeed=ds_config or "ds_configs/zero2.json",
                          dtype="fp32", batch_size=2, activation_checkpointing=checkpointed,
                          loss_chunk_tokens=24 if checkpointed else 0)
        model = build_backend(cfg, distributed.world_size()).wrap(module, cfg, total_steps=10)
        losses, norms = [], []
        for step in range(2):
            output = model(tokens[step, :, :-1], doc_ids=doc_ids, position_ids=position_ids, return_hidden=True)
            logps, _ = unwrap(model).label_logps(output.hidden.flatten(0, 1), tokens[step, :, 1:].flatten(),
                                                 cfg.loss_chunk_tokens)
            loss = -logps.sum() / logps.numel() / distributed.world_size()
            model.backward(loss)
            norms.append(float(model.step().grad_norm))
            losses.append(float(distributed.sum_over_ranks(loss.detach())))
        results[f"{name}_{'checkpointed' if checkpointed else 'plain'}"] = {"losses": losses, "grad_norms": norms}
if distributed.is_main():
    (out / "results.json").write_text(json.dumps(results, indent=2))
distributed.shutdown()
