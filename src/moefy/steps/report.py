"""Step 7, report: gather every evaluation into summary.csv and plot accuracy against FFN FLOPs.

Writes <out>/summary.csv (one row per evaluated budget or threshold; flops_at_99pct is the
smallest FFN FLOPs fraction of its (penalty, split, E, selector, rule) that keeps 99% of dense
accuracy) and <out>/accuracy_vs_flops.png, and logs both to MLflow.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moefy import tracking
from moefy.cli import run_step
from moefy.files import atomic_path
from moefy.report import flops_at_99, plot_accuracy_vs_flops, summarise


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m moefy.steps.report", description=__doc__.splitlines()[0])
    parser.add_argument("--evaluations", required=True, nargs="+", type=Path, help="evaluate/<penalty>/<split>-E<E>-<selector>.json files")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--title", default="", help="plot title")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tracking.job_run("report", {"evaluations": len(args.evaluations), "title": args.title}) as run:
        table = summarise(args.evaluations)
        summary, plot = args.out / "summary.csv", args.out / "accuracy_vs_flops.png"
        with atomic_path(summary) as tmp:
            table.to_csv(tmp, index=False, float_format="%.6g")
        plot_accuracy_vs_flops(table, plot, args.title)
        for path in (summary, plot):
            run.log_artifact(path)
            tracking.log_workflow_artifact(path)
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"), flush=True)
        print("\nsmallest FFN FLOPs fraction keeping 99% of dense accuracy:", flush=True)
        print(flops_at_99(table).to_string(index=False, float_format=lambda v: f"{v:.3f}"), flush=True)


if __name__ == "__main__":
    run_step(main)
