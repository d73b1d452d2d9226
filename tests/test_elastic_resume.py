"""Resume on another number of ranks (docs/reliability.md): a checkpoint saved by 2 CPU ranks resumes on 1, whose
checkpoint resumes on 2 again, under ZeRO-2, ZeRO-3 and FSDP2. Each chain is checked against the uninterrupted 2-rank run of
the same backend: the rows each step read (counted from the loader, tests/row_trace), the token counters, the learning
rate, and the loss and gradient-norm curves.

The chain is a crash model, as in tests/test_resume_and_chain.py: the uninterrupted run saves steps 2, 4 and 6; a copy
cut back to step 2 resumes on 1 rank to step 6 (saving 4 and 6); a copy of that cut back to step 4 resumes on 2 ranks.
The 1-rank leg's curve is checked against the uninterrupted 2-rank run: 1- and 2-rank curves of the same global batch
agree to 1e-7 (fp32 sum order; measured 9e-8 on the loss, 9e-8 on the gradient norm, FSDP2 included since its norm is
taken per shard in float64).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.launch import read_metrics, read_run_config, run_stage

STEPS = 6
# 2 ranks × 2 rows × 2 micro-batches = 8 rows a step; 1 rank reads them as 4 micro-batches of 2.
RUN = ["--model", "tiny", "--batch_size", "2", "--accumulation_steps", "2", "--log_interval", "1",
       "--eval_interval", "0", "--eval_batches", "1", "--throughput_warmup_steps", "1", "--max_steps", str(STEPS),
       "--save_interval", "2", "--keep_checkpoints", "3"]
GLOBAL_BATCH = 8
TRACE = Path(__file__).parent / "row_trace"
# A resumed curve and the uninterrupted one differ by the order of fp32 sums only (how the step's rows
# fall into micro-batches, the merged shards of the universal checkpoint); measured up to 9e-8 relative on the loss and
# 9e-8 on the gradient norm.
# A step that read other rows differs by 1e-2 or more (the loss moves that much from one step to the next), and the
# slips fixed in DeepSpeed's ZeRO-3 universal load showed as 6e-4: 1e-5 lies two orders from each.
TOLERANCE = 1e-5


def run(out_dir: Path, world_size: int, backend: str, *extra: str) -> tuple[str, Path]:
    """A run with the loader's rows traced; its output and the trace folder."""
    trace = out_dir.parent / f"{out_dir.name}.rows"
    trace.mkdir()
    result = run_stage("pretrain", out_dir, *RUN, *extra, world_size=world_size, zero=backend,
                       env={"PYTHONPATH": str(TRACE), "ROW_TRACE_DIR": str(trace)})
    return result.stdout + result.stderr, trace


def cut_back(source: Path, target: Path, step: int) -> Path:
    """A copy of a run as a crash after its later steps were logged but before their checkpoints leaves it: the
    checkpoints after `step` gone, metrics.jsonl whole (the resume moves the later lines aside)."""
    shutil.copytree(source, target)
    for folder in (target / "checkpoints").glob("step_*"):
        if int(folder.name[5:]) > step:
            shutil.rmtree(folder)
    (target / "checkpoints" / "latest").write_text(f"step_{step:08d}")
    return target


def rows_per_step(trace: Path, world_size: int, accumulation: int, first_step: int) -> dict[int, list[int]]:
    """step -> the sorted rows every rank's loader gave it (a rank's k-th micro-batch is in step first + k // A)."""
    steps: dict[int, list[int]] = {}
    for rank in range(world_size):
        for k, line in enumerate((trace / f"rows-w{world_size}-r{rank}.jsonl").read_text().splitlines()):
            record = json.loads(line)
            assert record["epoch"] == 0
            steps.setdefault(first_step + k // accumulation, []).extend(record["rows"])
    return {step: sorted(rows) for step, rows in steps.items()}


@dataclass
class Chain:
    straight: Path  # the uninterrupted 2-rank run
    one: Path  # resumed from its step 2 on 1 rank, to the end
    two: Path  # resumed from the 1-rank run's step 4 on 2 ranks, to the end
    outputs: dict  # name -> what the run printed
    traces: dict  # name -> its row trace folder


@pytest.fixture(scope="module")
def chains(tmp_path_factory):
    """backend -> its Chain, made once."""
    made = {}

    def make(backend: str) -> Chain:
        if backend not in made:
            root = tmp_path_factory.mktemp(f"elastic_{backend}")
            outputs, traces = {}, {}
            outputs["straight"], traces["straight"] = run(root / "straight", 2, backend)
            one = cut_back(root / "straight", root / "one", 2)
            outputs["one"], traces["one"] = run(one, 1, backend, "--from_resume")
            two = cut_back(one, root / "two", 4)
            outputs["two"], traces["two"] = run(two, 2, backend, "--from_resume")
            made[backend] = Chain(root / "straight", one, two, outputs, traces)
        return made[backend]
    return make


BACKENDS = pytest.mark.parametrize("backend", ["2", "3", "fsdp"], ids=["zero2", "zero3", "fsdp"])


def relative(ours: float, theirs: float) -> float:
    return abs(ours - theirs) / abs(theirs)


@BACKENDS
def test_every_row_is_read_once_in_the_uninterrupted_order(chains, backend):
    chain = chains(backend)
    straight = rows_per_step(chain.traces["straight"], 2, 2, first_step=1)
    assert straight == {step: list(range((step - 1) * GLOBAL_BATCH, step * GLOBAL_BATCH))
                        for step in range(1, STEPS + 1)}
    one = rows_per_step(chain.traces["one"], 1, 4, first_step=3)
    two = rows_per_step(chain.traces["two"], 2, 2, first_step=5)
    assert sorted(one) == [3, 4, 5, 6] and sorted(two) == [5, 6]
    assert {**{step: straight[step] for step in (1, 2)}, 3: one[3], 4: one[4], **two} == straight
    assert {step: one[step] for step in (5, 6)} == {step: straight[step] for step in (5, 6)}


@BACKENDS
def test_the_resumes_say_what_changed_and_continue_the_counters_and_the_schedule(chains, backend):
    chain = chains(backend)
    assert ("layout: --batch_size 2 × --accumulation_steps 2 × 2 ranks = 8 rows -> --batch_size 2 × "
            "--accumulation_steps 4 × 1 rank = 8 rows (the same global batch)") in chain.outputs["one"]
    assert ("layout: --batch_size 2 × --accumulation_steps 4 × 1 rank = 8 rows -> --batch_size 2 × "
            "--accumulation_steps 2 × 2 ranks = 8 rows (the same global batch)") in chain.outputs["two"]
    assert f"resumed from {chain.one / 'checkpoints' / 'step_00000002'}: step 2, epoch 1, micro-batch 8 on 1 rank\n" \
        in chain.outputs["one"]
    assert f"resumed from {chain.two / 'checkpoints' / 'step_00000004'}: step 4, epoch 1, micro-batch 8 on each of " \
           f"2 ranks\n" in chain.outputs["two"]
    converted = "converting it to DeepSpeed's universal checkpoint"
    assert (converted in chain.outputs["one"] and converted in chain.outputs["two"]) == (backend != "fsdp")
    assert (read_run_config(chain.one)["train"]["accumulation_steps"],
            read_run_config(chain.two)["train"]["accumulation_steps"]) == (4, 2)

    # The lines the crash model left after each checkpoint moved aside, each step once in metrics.jsonl.
    assert f"4 line(s) after step 2, the checkpoint resumed, moved to {chain.one / 'metrics.redone.jsonl'}" \
        in chain.outputs["one"]
    assert f"2 line(s) after step 4, the checkpoint resumed, moved to {chain.two / 'metrics.redone.jsonl'}" \
        in chain.outputs["two"]
    redone = [json.loads(line)["train/global_step"] for line in (chain.two / "metrics.redone.jsonl").open()]
    assert redone == [3, 4, 5, 6, 5, 6]  # the first resume's, copied with the run, then the second's
    reference, ours = read_metrics(chain.straight), read_metrics(chain.two)
    assert [r["train/global_step"] for r in read_metrics(chain.one)] == list(range(1, STEPS + 1))
    assert [r["train/global_step"] for r in ours] == list(range(1, STEPS + 1))
    for name in ("train/num_input_tokens_seen", "train/num_supervised_tokens_seen", "train/epoch"):
        assert [r[name] for r in ours] == [r[name] for r in reference], name
    assert [r["train/learning_rate"] for r in ours] == pytest.approx([r["train/learning_rate"] for r in reference],
                                                                     rel=1e-12)
    summaries = [json.loads((run / "summary.json").read_text()) for run in (chain.straight, chain.one, chain.two)]
    assert {s["tokens_seen"] for s in summaries} == {summaries[0]["tokens_seen"]}


@BACKENDS
def test_the_loss_curve_after_each_resume_is_the_uninterrupted_one(chains, backend):
    chain = chains(backend)
    curves = {"2 -> 1 rank, steps 3-6": (read_metrics(chain.one)[2:], read_metrics(chain.straight)),
              "1 -> 2 ranks, steps 5-6": (read_metrics(chain.two)[4:], read_metrics(chain.straight))}
    for label, (records, reference) in curves.items():
        for name in ("train/loss", "train/grad_norm"):
            deviations = [relative(ours[name], reference[ours["train/global_step"] - 1][name]) for ours in records]
            print(f"{backend} {label} {name}: max relative deviation {max(deviations):.1e}")
            assert max(deviations) < TOLERANCE, (label, name, deviations)
