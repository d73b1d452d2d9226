"""One PNG page of a pipeline run for a person to look at, from each stage's metrics.jsonl (no W&B needed).

    python -m train.report out                 # writes out/report.png
    python -m train.report out --out report.png --stages pretrain sft

Panels: training loss, pre-clip grad norm, tokens/s, MFU and peak memory per rank, every stage on one axis of
wall-clock minutes (hours for a run over two) since the first stage's first metric line (stages run one after the other; a resumed run goes on
where it stopped), and the ZeRO/FSDP comparison's own figure (bench/compare.py) when out/compare_zero holds one.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402  (after the backend is chosen)
import matplotlib.pyplot as plt  # noqa: E402

from train.exports import STAGE_ORDER  # noqa: E402

PANELS = [("train/loss", "training loss"), ("train/grad_norm", "grad norm (pre-clip)"),
          ("train/tokens_per_second", "tokens/s"), ("train/mfu_percent", "MFU (%)"),
          ("system/peak_memory_gb", "peak memory per rank (GB)")]


def read_stages(out_root: Path, stages: list[str]) -> dict[str, list[dict]]:
    """Each stage's metric lines that carry a wall-clock time, in pipeline order; stages not run are left out."""
    found = {}
    for stage in stages:
        path = out_root / stage / "metrics.jsonl"
        if path.is_file():
            records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            found[stage] = [r for r in records if r.get("system/unix_time") is not None]
    return {stage: records for stage, records in found.items() if records}


def comparison_figures(out_root: Path) -> list[Path]:
    return sorted((out_root / "compare_zero").glob("*/results.png"))


def draw(out_root: Path, stages: list[str], png: Path) -> list[str]:
    """Write the page; returns the stages drawn."""
    data = read_stages(out_root, stages)
    if not data:
        raise SystemExit(f"{out_root}: no metrics.jsonl with timed lines for any of {', '.join(stages)}")
    times = [r["system/unix_time"] for records in data.values() for r in records]
    start = min(times)
    unit, seconds_per_unit = ("hours", 3600) if max(times) - start > 7200 else ("minutes", 60)
    comparisons = comparison_figures(out_root)
    rows = len(PANELS) + len(comparisons)
    figure, axes = plt.subplots(rows, 1, figsize=(11, 2.6 * len(PANELS) + 5 * len(comparisons)), squeeze=False)
    for axis, (key, title) in zip(axes[:, 0], PANELS):
        for stage, records in data.items():
            points = [((r["system/unix_time"] - start) / seconds_per_unit, r[key]) for r in records
                      if r.get(key) is not None]
            if points:
                axis.plot([h for h, _ in points], [v for _, v in points], ".-", markersize=3, label=stage)
        axis.set_title(title, fontsize=10, loc="left")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, ncol=len(data), loc="upper right")
    axes[len(PANELS) - 1, 0].set_xlabel(f"{unit} since the first metric line")
    for axis, path in zip(axes[len(PANELS):, 0], comparisons):
        axis.imshow(mpimg.imread(path))
        axis.set_title(f"ZeRO / FSDP comparison: {path.relative_to(out_root)}", fontsize=10, loc="left")
        axis.axis("off")
    figure.suptitle(f"zerostage run {out_root.resolve()}: {', '.join(data)}", fontsize=11)
    figure.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png, dpi=100)
    plt.close(figure)
    return list(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_root", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="the PNG (default: <out_root>/report.png)")
    parser.add_argument("--stages", nargs="+", default=STAGE_ORDER)
    args = parser.parse_args()
    png = args.out or args.out_root / "report.png"
    drawn = draw(args.out_root, args.stages, png)
    print(f"wrote {png} ({', '.join(drawn)})")


if __name__ == "__main__":
    main()
