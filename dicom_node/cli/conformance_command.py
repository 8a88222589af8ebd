"""``petnode conformance``: print the DICOM conformance statement (or check a file against it)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_subparsers(sub: Any) -> None:
    p = sub.add_parser("conformance", help="print the DICOM conformance statement generated from the code "
                                           "(docs/conformance.md is its output)")
    p.add_argument("--check", type=Path, default=None, metavar="FILE",
                   help="exit 1 when FILE differs from what the code generates (CI, docs review)")
    p.set_defaults(func=cmd_conformance)


def cmd_conformance(args: argparse.Namespace) -> int:
    from dicom_node.conformance import conformance_statement

    text = conformance_statement()
    if args.check is None:
        sys.stdout.write(text)
        return 0
    try:
        current = args.check.read_text(encoding="utf-8")
    except OSError as exc:
        print(f"petnode: cannot read {args.check}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    if current != text:
        print(f"petnode: {args.check} differs from the conformance statement the code generates; regenerate it "
              f"with: petnode conformance > {args.check}", file=sys.stderr)
        return 1
    print(f"{args.check}: up to date")
    return 0
