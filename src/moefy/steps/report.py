"""Step report: gather every evaluation into tables and plot the metric against FFN FLOPs.

Writes <out>/summary.csv (one row per evaluated budget or threshold of every seed;
flops_at_99pct is the smallest FFN FLOPs fraction of its curve that keeps 99% of dense accuracy),
<out>/by_method.csv (each method's points as mean and std over seeds), <out>/flops_at_99pct.csv
(each method's flops_at_99pct over seeds) and <out>/accuracy_vs_flops.png, and logs them to MLflow.
Each relative accuracy has its interval from the test set's size, each crossing of the 99% line
says whether the interval supports it, by_method ranks only what the intervals separate
(moefy.report.intervals), and every row names the training stages that stopped at their cap while
still improving (stopped_at_cap; the log lists those methods).
"""

from __future__ import annotations

from pathlib import Path

from moefy.report.summary import METHOD, flops_at_99_by_method, summarise, summary_files
from moefy.training import convergence
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
        capped = table.loc[table[convergence.KEY].ne(""), [*METHOD, convergence.KEY]].drop_duplicates()
        if len(capped):
            print("\nWARNING: these methods' training stopped at its cap while still improving:", flush=True)
            print(capped.to_string(index=False), flush=True)


if __name__ == "__main__":
    run_step(main)
