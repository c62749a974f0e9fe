"""Step report: gather every evaluation into tables and plot the metric against FFN FLOPs.

Writes <out>/summary.csv (one row per evaluated budget or threshold of every seed;
flops_at_99pct is the smallest FFN FLOPs fraction of its curve that keeps 99% of dense accuracy),
<out>/by_method.csv (each method's points as mean and std over seeds), <out>/flops_at_99pct.csv
(each method's flops_at_99pct over seeds) and <out>/accuracy_vs_flops.png, and logs them to MLflow.
"""

from __future__ import annotations

from pathlib import Path

from moefy.report.summary import flops_at_99_by_method, summarise, summary_files
from moefy.workflow import tracking
from moefy.workflow.cli import run_step, step_parser


def parse_args(argv: list[str] | None):
    parser = step_parser("report", __doc__)
    parser.add_argument(
        "--evaluations", required=True, nargs="+", type=Path, help="evaluate/<variant>/<split>-E<E>-<router>.json files"
    )
    parser.add_argument("--title", default="", help="plot title")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tracking.job_run("report", {"evaluations": len(args.evaluations), "title": args.title}) as run:
        table = summarise(args.evaluations)
        run.publish(summary_files(table, args.out, args.title).values())
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"), flush=True)
        print("\nsmallest FFN FLOPs fraction keeping 99% of dense accuracy, over seeds:", flush=True)
        print(flops_at_99_by_method(table).to_string(index=False, float_format=lambda v: f"{v:.3f}"), flush=True)


if __name__ == "__main__":
    run_step(main)
