"""``petnode worker``: run processing jobs from a node's Celery queues on this machine (distributed processing)."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from dicom_node.errors import ConfigError

logger = logging.getLogger(__name__)


def add_subparsers(sub: Any) -> None:
    p = sub.add_parser("worker", help="process series for a node on this machine (Celery worker; needs "
                                      "distributed.broker_url in node.yaml and the node's data directory mounted)")
    p.add_argument("--queues", default="cpu,gpu",
                   help="lanes to take jobs from, comma-separated: cpu, gpu (default: cpu,gpu)")
    p.add_argument("--concurrency", type=int, default=1,
                   help="jobs at once (default 1: one per GPU; a CPU worker may run one per few cores)")
    p.add_argument("-n", "--hostname", default=None,
                   help="this worker's name in logs and results, e.g. gpu1@%%h (default: petnode@<host name>)")
    p.add_argument("--pool", default="threads", choices=["threads", "solo", "prefork"],
                   help="Celery execution pool (default: threads; prefork forks a process per job slot)")
    p.set_defaults(func=cmd_worker)


def cmd_worker(args: argparse.Namespace) -> int:
    from dicom_node.cli import configure_logging
    from dicom_node.settings import load_settings

    settings = load_settings(args.config)
    configure_logging(args.log_level or settings.log_level)
    if not settings.distributed.enabled:
        raise ConfigError(f"{args.config or '(embedded defaults)'}: distributed.broker_url is not set: a worker "
                          "needs the broker the node sends its jobs to (e.g. redis://host:6379/0)")
    if args.concurrency < 1:
        raise ConfigError(f"--concurrency {args.concurrency}: must be at least 1")
    lanes = [part.strip() for part in args.queues.split(",") if part.strip()]
    from dicom_node.distributed import run_worker

    def ready(name: str) -> None:
        # One line on stdout that scripts (and tests) can wait for, like `petnode serve`'s.
        print(f"petnode worker ready name={name} queues={','.join(lanes)}", flush=True)

    return run_worker(settings, lanes, concurrency=args.concurrency, hostname=args.hostname, pool=args.pool,
                      on_ready=ready)
