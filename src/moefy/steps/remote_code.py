"""Step remote_code: an exported classifier rewritten for transformers' custom-code loading.

Reads an export folder (step export) and writes <out>: the same model with a modeling file moefy
writes into it (moefy.serving.remote_code), which transformers' AutoModelForSequenceClassification
loads with remote code allowed and no moefy installed, giving moefy's logits.
"""

from __future__ import annotations

from pathlib import Path

from moefy.serving.remote_code import write_remote_code
from moefy.workflow import tracking
from moefy.workflow.cli import run_step, step_parser


def parse_args(argv: list[str] | None):
    parser = step_parser("remote_code", __doc__, out="output folder (the remote-code model)")
    parser.add_argument("--export", required=True, type=Path, help="export/<variant>/<conversion>-<router>-b<budget>")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tracking.job_run("remote_code", vars(args)) as run:
        write_remote_code(args.export, args.out)
        print(f"wrote {args.export} for transformers' remote-code loading to {args.out}", flush=True)
        run.set_tags({"export.remote_code": str(args.out)})


if __name__ == "__main__":
    run_step(main)
