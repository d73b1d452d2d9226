"""Run under torchrun (2 CPU ranks) by tests/test_precision.py: each backend's mixed-precision model on the same
initial weights and tokens, written by rank 0 to the folder named (results.json, logits_<config>.pt).

Per configuration: the step-0 logits of the trained model and of its frozen copy (a DPO/PPO reference), the copy's
dtype, the dtypes DeepSpeed reduces and accumulates gradients in; under fp16 (ZeRO-0 and ZeRO-2, configs in the
folder named second) and ZeRO-0 bf16, the grad norm each reports after one step, and at ZeRO-0 the norm of the module's
gradients before the step with the loss scale it used and the norm of the (clipped) gradients its torch optimizer
received."""
import json
import sys
from pathlib import Path

import torch

from model import ModelConfig, Transformer
from train import distributed
from train.backend import build_backend
from train.config import TrainConfig

CONFIGS = {"zero0_bf16": ("deepspeed", "ds_configs/zero0.json", "bf16"),
           "zero2_bf16": ("deepspeed", "ds_configs/zero2.json", "bf16"),
           "zero3_bf16": ("deepspeed", "ds_configs/zero3.json", "bf16"),
           "fsdp_bf16": ("fsdp", "ds_configs/zero2.json", "bf16"),
           "zero0_fp16": ("deepspeed", f"{sys.argv[2]}/zero0.json", "fp16"),
           "zero2_fp16": ("deepspeed", f"{sys.argv[2]}/zero2.json", "fp16")}

def float64_norm(grads) -> float:
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64)
                                                      for g in grads])))


distributed.init_distributed()
out = Path(sys.argv[1])
received = []  # the norm of the gradients ZeRO-0's torch optimizer received, after every other hook


def receive(optimizer, args, kwargs) -> None:
    received.append(float64_norm([p.grad for group in optimizer.param_groups for p in group["params"]
                                  if p.grad is not None]))
tokens = torch.randint(0, 6400, (2, 65), generator=torch.Generator().manual_seed(7))
results = {}
for name, (backend_name, ds_config, dtype) in CONFIGS.items():
    torch.manual_seed(0)
    module = Transformer(ModelConfig.from_preset("tiny"))
    cfg = TrainConfig(data_config="unused", backend=backend_name, deepspeed=ds_config, dtype=dtype, batch_size=2)
    backend = build_backend(cfg, distributed.world_size())
    model = backend.wrap(module, cfg, total_steps=10)
    reference = backend.frozen_copy(model)
    with torch.no_grad():
        policy_logits = model(tokens[:, :-1]).logits
        reference_logits = reference(tokens[:, :-1]).logits
    result = {"reference_equal": bool(torch.equal(policy_logits, reference_logits)),
              "policy_dtype": str(policy_logits.dtype),
              "reference_dtypes": sorted({str(p.dtype) for p in reference.parameters()})}
    if backend_name == "deepspeed":
        engine = model.engine
        result["communication_dtype"] = str(engine.communication_data_type)
        result["accumulation_dtype"] = str(engine.get_data_types()[1])
        result["optimizer"] = type(engine.optimizer).__name__
        if result["optimizer"] == "FP16_UnfusedOptimizer":
            engine.optimizer.optimizer.register_step_pre_hook(receive)
    if dtype == "fp16" or name == "zero0_bf16":  # one step: the norm reported against the gradients' own
        logits = model(tokens[:, :-1]).logits.float()
        model.backward(torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()))
        grads = [p.grad for p in model.module.parameters() if p.grad is not None]  # ZeRO-2 holds them itself
        if grads:
            result["scale"] = model.engine.optimizer.loss_scale_config.cur_scale
            result["module_grad_norm"] = float64_norm(grads)
        received.clear()
        update = model.step()
        result.update(applied=update.applied, reported_norm=float(update.grad_norm), received_norms=received[:],
                      clip=cfg.grad_clip)
        if result["optimizer"] == "FP16_UnfusedOptimizer":  # the norm DeepSpeed's wrapper computed, of scaled gradients
            result["deepspeed_norm"] = float(model.engine.optimizer._global_grad_norm) / result["scale"]
    if distributed.is_main():
        torch.save(policy_logits.float(), out / f"logits_{name}.pt")
    results[name] = result
if distributed.is_main():
    (out / "results.json").write_text(json.dumps(results, indent=2))
distributed.shutdown()
