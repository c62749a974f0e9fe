"""Step data: read the task's texts (and labels) and make the seeded train / validation / test subsets.

Identical texts always land in the same split (no leakage). Writes <out>/train.jsonl,
validation.jsonl, test.jsonl ({"text", "label"} per line; {"text"} for causal_lm, which ignores
the label column) and labels.json (label names, subset sizes, rows read and dropped by reason).
Dropped rows (blank text, no label, a label not in --labels) are counted, logged to MLflow and
warned about; more than --max-dropped-fraction of them stops the step.
"""

from __future__ import annotations

import sys
from pathlib import Path

from moefy.data.subsets import DROP_REASONS, write_subsets
from moefy.data.tables import MAX_DROPPED_FRACTION, load_hub, load_table, prepare_subsets, prepare_texts
from moefy.workflow import tracking
from moefy.workflow.cli import run_step, step_parser


def parse_args(argv: list[str] | None):
    parser = step_parser("data", __doc__, "task", "seed")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--path", type=Path, help="local CSV / TSV / JSONL / JSON / Parquet file")
    source.add_argument("--hub-name", help="Hugging Face dataset id")
    parser.add_argument("--hub-config", help="Hugging Face dataset configuration")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--labels", nargs="+", help="classes to keep, in label-id order")
    parser.add_argument("--validation-fraction", type=float, default=0.1)
    parser.add_argument("--test-fraction", type=float, default=0.1)
    parser.add_argument(
        "--max-dropped-fraction",
        type=float,
        default=MAX_DROPPED_FRACTION,
        help="largest share of rows that may be dropped (blank text, no label, a label not in --labels)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tracking.job_run("data", vars(args)) as run:
        label_column = args.label_column if args.task == "classification" else None
        if args.path is not None:
            table = load_table(args.path, args.text_column, label_column)
        else:
            table = load_hub(args.hub_name, args.hub_config, args.text_column, label_column)
        fractions = (args.validation_fraction, args.test_fraction, args.seed, args.max_dropped_fraction)
        if label_column is None:
            (splits, dropped), names = prepare_texts(table, *fractions), []
        else:
            splits, names, dropped = prepare_subsets(table, args.labels, *fractions)
        write_subsets(args.out, splits, names, dropped)
        sizes = {name: len(frame) for name, frame in splits.items()}
        run.log_metrics(
            {f"{name}_examples": n for name, n in sizes.items()}
            | {"classes": len(names), "rows_read": dropped.rows, "dropped_rows": dropped.total}
            | {f"dropped_{reason}": dropped.counts.get(reason, 0) for reason in DROP_REASONS}
        )
        if dropped.total:
            print(f"moefy: warning: {dropped.describe()}", file=sys.stderr, flush=True)
        print(
            (f"classes {names}; " if names else "texts only; ") + ", ".join(f"{name} {n}" for name, n in sizes.items()),
            flush=True,
        )


if __name__ == "__main__":
    run_step(main)
