"""The `rayrag` command: each package registers its own subcommands."""

from __future__ import annotations

import argparse
import logging
import sys

from cluster import cli as cluster_cli
from services.serving import cli as services_cli
from training import cli as training_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rayrag", description=__doc__)
    subcommands = parser.add_subparsers(dest="command", required=True)
    for module in (cluster_cli, services_cli, training_cli):
        module.register(subcommands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(message)s")  # progress on stderr; results on stdout
    for package in ("cluster", "services", "training"):
        logging.getLogger(package).setLevel(logging.INFO)
    try:
        return int(args.run(args) or 0)
    except ValueError as error:
        print(f"rayrag {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
