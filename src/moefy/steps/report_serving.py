"""Step report_serving: every served model beside the dense model it came from, in one table.

Writes <out>/serving.csv (one row per served folder and per dense model: the export's class, experts
and logit difference from moefy's model; per GGUF type llama.cpp's file size, perplexity, prompt and
decode tokens/s and their ratio to the dense model; lm-eval's perplexity), logs it to MLflow and
prints the decode summary.
"""

from __future__ import annotations

from pathlib import Path

from moefy.report.serving import decode_summary, serving_table
from moefy.report.tables import write_csv
from moefy.workflow import tracking
from moefy.workflow.cli import run_step, step_parser


def parse_args(argv: list[str] | None):
    parser = step_parser("report_serving", __doc__)
    parser.add_argument("--served", required=True, nargs="+", type=Path, help="serve/<variant>/<served>/served.json files")
    parser.add_argument("--gguf", nargs="*", type=Path, default=[], help="serve/<variant>/<served>/gguf/gguf.json files")
    parser.add_argument("--harness", nargs="*", type=Path, default=[], help="serve/<variant>/<served>/harness.json files")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tracking.job_run("report_serving", {"served": len(args.served)}) as run:
        table = serving_table(args.served, args.gguf, args.harness)
        path = args.out / "serving.csv"
        write_csv(table, path)
        run.publish([path])
        print(decode_summary(table).to_string(index=False, float_format=lambda v: f"{v:.4g}"), flush=True)


if __name__ == "__main__":
    run_step(main)
