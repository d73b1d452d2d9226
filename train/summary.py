"""The table that ends a pipeline run: one row per stage, from each stage's summary.json.

    python -m train.summary out pretrain midtrain sft dpo reward ppo
"""
import json
import sys
from pathlib import Path


def _cell(value, spec):
    return "n/a" if value is None else format(value, spec)


# The held-out preference accuracy of a pair stage (its losses are per pair, not per token); an RL stage's
# eval reward is the mean score of its greedy answers to the held-out prompts.
ACCURACY_KEYS = ("eval/rewards/accuracies", "eval/reward/accuracy")


def table(out_root: Path, stages: list[str]) -> str:
    rows = ["| stage | steps | final loss | eval loss | eval accuracy | eval reward | tokens seen | mean tokens/s "
            "| mean MFU % | wall time (s) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for stage in stages:
        path = out_root / stage / "summary.json"
        if not path.is_file():
            rows.append(f"| {stage} | not run ({path} missing) | | | | | | | | |")
            continue
        s = json.loads(path.read_text())
        evaluation = s.get("eval", {})
        accuracy = next((evaluation[key] for key in ACCURACY_KEYS if evaluation.get(key) is not None), None)
        rows.append(f"| {stage} | {s['global_step']} | {_cell(s['final_loss'], '.4f')} | {_cell(s['eval_loss'], '.4f')} "
                    f"| {_cell(accuracy, '.3f')} | {_cell(evaluation.get('eval/reward'), '.3f')} "
                    f"| {s['tokens_seen']:,} | {_cell(s['mean_tokens_per_second'], ',.0f')} "
                    f"| {_cell(s['mean_mfu_percent'], '.2f')} | {s['wall_time_s']:.1f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table(Path(sys.argv[1]), sys.argv[2:]))
