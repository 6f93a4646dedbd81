"""The `mlit` command line: one sub-command per job."""

from __future__ import annotations

import argparse
import sys


def cmd_params(args: argparse.Namespace) -> int:
    from .params import format_table, parameter_table

    print(format_table(parameter_table()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlit", description="mLiT / mmLiT: lightweight MoE vision transformers")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("params", help="print the parameter counts of S, XS, XXS beside the paper's")
    p.set_defaults(func=cmd_params)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
