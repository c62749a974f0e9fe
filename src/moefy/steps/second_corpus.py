"""Step second_corpus: draw the second corpus's texts that every evaluation measures perplexity on.

Writes <out> ({"text"} per line), a seeded draw of at most --max-texts distinct non-blank texts.
"""

from __future__ import annotations

from pathlib import Path

from moefy.data.corpus import draw_texts, write_texts
from moefy.data.tables import load_table
from moefy.errors import MoefyError
from moefy.workflow import tracking
from moefy.workflow.cli import run_step, step_parser


def parse_args(argv: list[str] | None):
    parser = step_parser("second_corpus", __doc__, "seed", out="output JSONL file")
    parser.add_argument("--path", required=True, type=Path, help="the corpus file (config second_corpus.path)")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--max-texts", type=int, default=200)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.path.is_file():
        raise MoefyError(f"second corpus file {args.path} does not exist (or is not a file); fix second_corpus.path")
    with tracking.job_run("second_corpus", vars(args)) as run:
        texts = draw_texts(load_table(args.path, args.text_column, None)["text"], args.max_texts, args.seed)
        write_texts(args.out, texts)
        run.log_metrics({"texts": len(texts)})
        print(f"{len(texts)} texts from {args.path} to {args.out}", flush=True)


if __name__ == "__main__":
    run_step(main)
