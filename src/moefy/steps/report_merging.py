"""Step report_merging: merged and compressed SMoEs against the full SMoE, in a table and a plot.

Writes <out>/merging.csv (one row per model and seed: task metric, relative to the full SMoE and
to the dense continuation, memory, parameters, FFN FLOPs, experts per layer, distillation steps)
and <out>/merging.png (task metric against memory); the methods ranked per metric at each share
of experts kept, with another study's merging arm beside this one's if given (a classification arm
beside a causal LM's: moefy.report.ranking), in <out>/merging_ranks.csv, and each metric's order and
where two metrics order methods opposite ways in <out>/merging_flips.txt. Logs them to MLflow and
prints the ranking and the flips.
"""

from __future__ import annotations

from pathlib import Path

from moefy.files import atomic_path
from moefy.report.merging import merging_by_method, merging_table, plot_merging
from moefy.report.ranking import flips, metric_ranks
from moefy.report.tables import write_csv
from moefy.workflow import tracking
from moefy.workflow.cli import run_step, step_parser


def parse_args(argv: list[str] | None):
    parser = step_parser("report_merging", __doc__)
    parser.add_argument("--evaluations", required=True, nargs="+", type=Path, help="merge/<variant>/<model>/evaluate/*.json")
    parser.add_argument("--dense", nargs="*", type=Path, default=[], help="upcycle/<variant>/dense/metrics.json files")
    parser.add_argument("--title", default="", help="plot title")
    parser.add_argument(
        "--other-evaluations", nargs="*", type=Path, default=[], help="another study's merging records, ranked beside these"
    )
    parser.add_argument("--other-dense", nargs="*", type=Path, default=[], help="that study's dense continuations")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tracking.job_run("report_merging", {"models": len(args.evaluations), "title": args.title}) as run:
        table = merging_table(args.evaluations, args.dense)
        tables = [table] + ([merging_table(args.other_evaluations, args.other_dense)] if args.other_evaluations else [])
        ranks = metric_ranks(tables)
        statements = flips(ranks)
        files = {
            "table": args.out / "merging.csv",
            "plot": args.out / "merging.png",
            "ranks": args.out / "merging_ranks.csv",
            "flips": args.out / "merging_flips.txt",
        }
        write_csv(table, files["table"])
        plot_merging(table, files["plot"], args.title)
        write_csv(ranks, files["ranks"])
        with atomic_path(files["flips"]) as tmp:
            tmp.write_text("\n".join(statements) + "\n")
        run.publish(files.values())
        print(merging_by_method(table).to_string(index=False, float_format=lambda v: f"{v:.4f}"), flush=True)
        print("\n".join(statements), flush=True)


if __name__ == "__main__":
    run_step(main)
