"""Run by tests/test_compile.py in one process (so one compile serves every run): the same steps on the tiny model
through the backend's wrap, eager under ZeRO-2 and with --compile under ZeRO-2 and FSDP2, then greedy
generation with the compiled ZeRO-2 model and an eager copy of it. Writes losses, grad norms, trace counts and
generated tokens as JSON.

The batches are padded rows of varying width, as SFT/DPO's trimmed batches are: the width changes at step 3.
"""
import json
import sys
import time

import torch
import torch.nn.functional as F

from model import ModelConfig, Transformer, generate
from train import distributed
from train.backend import build_backend, unwrap
from train.compile import compile_seconds, trace_count
from train.config import TrainConfig

WIDTHS = (40, 40, 24, 56)  # one static compile, then one retrace with the width dynamic
ROWS = 4


def batches():
    generator = torch.Generator().manual_seed(7)
    for width in WIDTHS:
        ids = torch.randint(0, 1000, (ROWS, width + 1), generator=generator)
        real = torch.arange(width + 1) < torch.randint(width // 2, width + 2, (ROWS, 1), generator=generator)
        yield ids[:, :-1], torch.where(real[:, :-1], 0, -1), torch.where(real[:, 1:], ids[:, 1:], -100)


def train(compile: bool, backend: str) -> dict:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny"))
    cfg = TrainConfig(data_config="unused", compile=compile, batch_size=ROWS, learning_rate=1e-3,
                      warmup_ratio=0.0, backend=backend, deepspeed="ds_configs/zero2.json")
    engine = build_backend(cfg, 1).wrap(model, cfg, total_steps=len(WIDTHS))
    losses, norms, step_seconds, compiling = [], [], [], []
    for input_ids, doc_ids, labels in batches():
        started, compiled_before = time.perf_counter(), compile_seconds()
        logits = engine(input_ids, doc_ids=doc_ids).logits
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        engine.backward(loss)
        update = engine.step()
        losses.append(loss.item())
        norms.append(float(update.grad_norm))
        step_seconds.append(time.perf_counter() - started)
        compiling.append(compile_seconds() - compiled_before)
    traces_after_training = trace_count()
    tokens = eval_difference = traces_after_generation = None
    if backend == "deepspeed":  # the rollout path (train/rollout.py generates with the trained module itself)
        prompts = [[5, 6, 7, 8], [9, 10]]
        compiled = generate(unwrap(engine), prompts, 12, greedy=True).tokens
        traces_after_generation = trace_count()
        eager = Transformer(model.config)
        eager.load_state_dict(unwrap(engine).state_dict())
        tokens = {"compiled": compiled.tolist(), "eager": generate(eager, prompts, 12, greedy=True).tokens.tolist()}
        with torch.no_grad():  # evaluation's path: eval mode, no grad, no cache
            engine.eval(), eager.eval()
            difference = (engine(input_ids, doc_ids=doc_ids).logits - eager(input_ids, doc_ids=doc_ids).logits)
            eval_difference = float(difference.abs().max())
    return {"loss": losses, "grad_norm": norms, "step_seconds": step_seconds, "compile_seconds": compiling,
            "traces_after_training": traces_after_training,
            "traces_after_generation": traces_after_generation, "tokens": tokens,
            "eval_logits_max_difference": eval_difference, "traces_at_end": trace_count()}


distributed.init_distributed()
results = {name: train(compile, backend) for name, compile, backend in
           (("eager_zero2", False, "deepspeed"), ("compiled_zero2", True, "deepspeed"), ("compiled_fsdp", True, "fsdp"))}
json.dump(results, open(sys.argv[1], "w"), indent=1)
distributed.shutdown()
