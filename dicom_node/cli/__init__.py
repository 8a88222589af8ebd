"""The ``petnode`` command: ``main(argv) -> int`` so tests run it in-process.

Exit codes: 0 ok, 1 runtime failure, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from dicom_node import __version__
from dicom_node.cli import conformance_command, model_commands, node_commands, tool_commands, train_commands
from dicom_node.cli import worker_command
from dicom_node.errors import ConfigError, DicomNodeError

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", force=True)
    # pynetdicom logs every PDU at INFO; its warnings are what an operator needs.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING if level != "DEBUG" else logging.INFO)
    # APScheduler warns whenever a poll overlaps the previous one; coalescing makes that harmless.
    logging.getLogger("apscheduler").setLevel(logging.ERROR)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="petnode",
        description="A DICOM node that denoises PET series and sends labelled derived series back to PACS.",
    )
    parser.add_argument("--version", action="version", version=f"petnode {__version__}")
    parser.add_argument("-c", "--config", type=_path, default=None,
                        help="node settings YAML (default: the embedded defaults; see config/node.yaml)")
    parser.add_argument("--log-level", default=None, choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="log level (default: from the config, INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    node_commands.add_subparsers(sub)
    tool_commands.add_subparsers(sub)
    model_commands.add_subparsers(sub)
    train_commands.add_subparsers(sub)
    conformance_command.add_subparsers(sub)
    worker_command.add_subparsers(sub)
    return parser


def _path(text: str) -> object:
    from pathlib import Path

    return Path(text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    level = args.log_level or "INFO"
    configure_logging(level if args.command in ("serve", "worker") else (args.log_level or "WARNING"))
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"petnode: configuration error:\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    except DicomNodeError as exc:
        print(f"petnode: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE
