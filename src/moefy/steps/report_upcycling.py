"""Step report_upcycling: the upcycled models against the dense continuation, in a table and a plot.

Writes <out>/upcycling.csv (one row per model and seed: task metric, its difference to the dense
model trained on for the same steps, parameters, active FFN FLOPs, training steps, tokens, FLOPs
and time, expert load) and <out>/upcycling.png, and logs them to MLflow.
"""

from __future__ import annotations

from pathlib import Path

from moefy.report.tables import write_csv
from moefy.report.upcycling import plot_upcycling, upcycling_by_model, upcycling_table
from moefy.workflow import tracking
from moefy.workflow.cli import run_step, step_parser


def parse_args(argv: list[str] | None):
    parser = step_parser("report_upcycling", __doc__)
    parser.add_argument(
        "--trained", required=True, nargs="+", type=Path, help="upcycle/<variant>/<name>/metrics.json files (name dense included)"
    )
    parser.add_argument("--title", default="", help="plot title")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tracking.job_run("report_upcycling", {"models": len(args.trained), "title": args.title}) as run:
        table = upcycling_table(args.trained)
        files = {"table": args.out / "upcycling.csv", "plot": args.out / "upcycling.png"}
        write_csv(table, files["table"])
        plot_upcycling(table, files["plot"], args.title)
        run.publish(files.values())
        print(upcycling_by_model(table).to_string(index=False, float_format=lambda v: f"{v:.4f}"), flush=True)


if __name__ == "__main__":
    run_step(main)
