"""Learning curves of the preference and RL stages of one pipeline run, from their metrics.jsonl, in one PNG.

    python scripts/plot_learning.py out docs/learning.png

Panels: DPO and the reward model's held-out pair accuracy (chance 0.5); PPO's and GRPO's reward of the sampled
answers (train, per step and its running mean) and of greedy and sampled answers to the held-out prompts (eval). A
stage that did not run is left out.
"""
import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

RL_SERIES = [("objective/reward", "train (sampled)", "-"), ("eval/reward", "eval (greedy, held-out)", "o-"),
             ("eval/reward_sampled", "eval (sampled, held-out)", "s-")]
PANELS = [
    ("dpo", "DPO: held-out pair accuracy", [("eval/rewards/accuracies", "eval", "o-")], 0.5),
    ("reward", "Reward model: held-out pair accuracy", [("eval/reward/accuracy", "eval", "o-")], 0.5),
    ("ppo", "PPO: rule reward", RL_SERIES, None),
    ("grpo", "GRPO: rule reward", RL_SERIES, None),
]
SMOOTHING = 10  # steps in the running mean drawn over a per-step train curve: one step's 16-64 answers are noisy


def curve(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["train/global_step"], r[key]) for r in records if r.get(key) is not None]
    return [step for step, _ in points], [value for _, value in points]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_root", type=Path)
    parser.add_argument("png", type=Path)
    args = parser.parse_args()
    panels = [(stage, *rest) for stage, *rest in PANELS if (args.out_root / stage / "metrics.jsonl").is_file()]
    if not panels:
        raise SystemExit(f"{args.out_root}: none of {', '.join(p[0] for p in PANELS)} has a metrics.jsonl")
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for axis, (stage, title, series, chance) in zip(axes[0], panels):
        records = [json.loads(line) for line in (args.out_root / stage / "metrics.jsonl").read_text().splitlines()]
        for key, label, style in series:
            steps, values = curve(records, key)
            if style == "-" and len(values) > SMOOTHING:
                axis.plot(steps, values, style, alpha=0.3, color="tab:blue")
                means = [sum(values[i - SMOOTHING:i]) / SMOOTHING for i in range(SMOOTHING, len(values) + 1)]
                axis.plot(steps[SMOOTHING - 1:], means, style, color="tab:blue", label=f"{label}, {SMOOTHING}-step mean")
            else:
                color = {"o-": "tab:orange", "s-": "tab:green"}.get(style, "tab:blue") if len(series) > 1 else "tab:blue"
                axis.plot(steps, values, style, label=label, markersize=3, color=color)
        if chance is not None:
            axis.axhline(chance, color="grey", linestyle=":", label="chance")
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    args.png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.png, dpi=110)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
