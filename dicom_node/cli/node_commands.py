"""Commands that run or inspect a node: ``serve``, ``status``, ``series ...``, ``config check``."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicom_node.errors import DicomNodeError

if TYPE_CHECKING:  # the settings (pydantic, YAML) are built when a node verb runs, not for every command
    from dicom_node.settings import NodeSettings

logger = logging.getLogger(__name__)


def add_subparsers(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the node (C-STORE/C-ECHO SCP, processing, sending)")
    p.add_argument("--rules", type=Path, default=None, help="rules YAML (default: config/rules.yaml)")
    p.add_argument("--port", type=int, default=None, help="listen port (overrides the config)")
    p.add_argument("--ae-title", default=None, help="AE title (overrides the config)")
    p.add_argument("--data-dir", type=Path, default=None, help="data directory (overrides the config)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("status", help="series in the node with counts, states, attempts, errors; associations")
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--all", action="store_true", help="include delivered and unrouted series")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("series", help="list, show, force-complete or retry series")
    ssub = p.add_subparsers(dest="series_command", metavar="ACTION")
    ssub.required = True
    q = ssub.add_parser("list", help="one line per series")
    q.add_argument("--state", action="append", default=[], help="only series in this state (repeatable)")
    q.add_argument("--data-dir", type=Path, default=None)
    q.set_defaults(func=cmd_series_list)
    for name, helptext, func in (
        ("show", "everything known about one series", cmd_series_show),
        ("complete", "force completion now, whatever the count (the running node picks it up)", cmd_series_complete),
        ("retry", "send failed destinations again, or reprocess a series whose processing failed", cmd_series_retry),
    ):
        q = ssub.add_parser(name, help=helptext)
        q.add_argument("uid", help="Series Instance UID (or a unique prefix)")
        q.add_argument("--data-dir", type=Path, default=None)
        q.set_defaults(func=func)

    q = ssub.add_parser("reprocess", help="route and process a finished series again (after a rules fix) and "
                        "send the result in full")
    q.add_argument("uid", help="Series Instance UID (or a unique prefix)")
    q.add_argument("--rule", default=None, help="process with this rule instead of routing again")
    q.add_argument("--data-dir", type=Path, default=None)
    q.set_defaults(func=cmd_series_reprocess)

    p = sub.add_parser("config", help="configuration tools")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION")
    csub.required = True
    q = csub.add_parser("check", help="validate node settings and rules without starting anything")
    q.add_argument("--rules", type=Path, default=None)
    q.add_argument("--data-dir", type=Path, default=None, help="data directory whose model registry rules use")
    q.set_defaults(func=cmd_config_check)


def settings_from(args: argparse.Namespace, **overrides: Any) -> NodeSettings:
    from dicom_node.settings import load_settings

    return load_settings(args.config, **overrides)


def load_node_config(args: argparse.Namespace, **overrides: Any) -> tuple[NodeSettings, Any]:
    from dicom_node.rules import load_rules

    settings = settings_from(args, **overrides)
    rules_path = getattr(args, "rules", None) or settings.resolved_rules_file()
    ruleset = load_rules(rules_path, peer_names=[p.name for p in settings.peers])
    return settings, ruleset


def cmd_config_check(args: argparse.Namespace) -> int:
    settings, ruleset = load_node_config(args, data_dir=args.data_dir)
    print(f"settings ok: AE {settings.ae_title} port {settings.port} data {settings.data_dir} "
          f"peers {len(settings.peers)}")
    rules_path = args.rules or settings.resolved_rules_file()
    print(f"rules ok: {rules_path}: {len(ruleset.rules)} rule(s): "
          + ", ".join(r.name + (" (disabled)" if r.disabled else "") for r in ruleset.rules))
    problems = []
    with_models = [r for r in ruleset.rules if r.denoiser is not None and r.denoiser.model and not r.disabled]
    if with_models:
        from denoisers.errors import DenoiserError
        from dicom_node.node import open_model_store

        store = open_model_store(settings)
        for rule in with_models:
            try:
                resolved = store.resolve(str(rule.denoiser.model))  # type: ignore[union-attr]
                print(f"model ok: rule {rule.name!r} -> {resolved.ref}")
            except DenoiserError as exc:
                problems.append(f"rule {rule.name!r}: model {rule.denoiser.model!r}: {exc}")  # type: ignore[union-attr]
    for problem in problems:
        print(f"petnode: {problem}", file=sys.stderr)
    return 1 if problems else 0


def cmd_serve(args: argparse.Namespace) -> int:
    from dicom_node.cli import configure_logging
    from dicom_node.node import Node

    settings, ruleset = load_node_config(args, port=args.port, ae_title=args.ae_title, data_dir=args.data_dir)
    configure_logging(args.log_level or settings.log_level)
    node = Node(settings, ruleset)
    stop = threading.Event()

    def _on_signal(signum: int, _frame: Any) -> None:
        logger.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    node.start()
    # One line on stdout that scripts (and tests) can wait for.
    print(f"petnode listening ae={settings.ae_title} port={node.port} data={settings.data_dir}"
          + (f" tls_port={node.tls_port}" if node.tls_port is not None else "")
          + (f" web={node.web_url}" if node.web_url is not None else ""), flush=True)
    try:
        stop.wait()
    finally:
        node.stop()
    return 0


def _open_db(args: argparse.Namespace) -> Any:
    from dicom_node.state import StateDB

    settings = settings_from(args, data_dir=args.data_dir)
    if settings.state.database_url is not None:  # a shared PostgreSQL (or a SQLite file named by URL)
        return StateDB(settings.state.database_url)
    data_dir = settings.data_dir
    db_path = data_dir / "state.sqlite3"
    if not db_path.exists():
        raise DicomNodeError(f"no state database at {str(db_path)!r}: has a node run with this data directory? "
                             "(use --data-dir or --config)")
    return StateDB(db_path)


def _age(ts: float | None) -> str:
    if not ts:
        return "-"
    s = time.time() - ts
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.0f}m" if s < 7200 else f"{s / 3600:.1f}h"


def _when(ts: float) -> str:
    """A time stamp an operator reads at a glance: the clock time today, the date otherwise."""
    fmt = "%H:%M:%S" if time.strftime("%Y%m%d", time.localtime(ts)) == time.strftime("%Y%m%d") else "%Y-%m-%d %H:%M"
    return time.strftime(fmt, time.localtime(ts))


def send_progress(send: dict[str, Any]) -> str:
    """What one destination's send is doing, in words (``retrying, next attempt at 03:12:40 ...``)."""
    state = send["state"]
    if state == "pending" and send.get("held"):
        return (f"held until every series of the study is complete and processed and the study is quiet for "
                f"{send.get('hold_quiet_s') or 0:g} s")
    if state == "pending" and send["attempts"]:
        return (f"retrying, next attempt at {_when(send['next_attempt_at'])} (attempt {send['attempts'] + 1}; "
                f"{send['sent']}/{send['total']} stored)")
    if state == "pending":
        return "queued"
    if state == "sending":
        return f"sending ({send['sent']}/{send['total']} stored before this attempt)"
    if state == "failed":
        return f"gave up after {send['attempts']} attempt(s) (petnode series retry)"
    return f"{state}, {send['sent']}/{send['total']} stored"


def _print_series_table(db: Any, rows: list[dict[str, Any]]) -> None:
    if not rows:
        print("(no series)")
        return
    print(f"{'SERIES INSTANCE UID':<64} {'MOD':<3} {'RECV':>9} {'STATE':<11} {'RULE':<16} {'SENT':<5} "
          f"{'AGE':>5}  DETAIL")
    for r in rows:
        sends = db.sends(r["series_uid"])
        done = sum(1 for s in sends if s["state"] == "done")
        sends_txt = f"{done}/{len(sends)}" if sends else "-"
        recv = f"{r['received_count']}/{r['expected_count'] or '?'}"
        open_sends = [s for s in sends if s["state"] != "done"]
        detail = "; ".join(f"{s.get('kind', 'derived')} to {s['destination']}: {send_progress(s)}"
                           + (f": {s['last_error']}" if s["last_error"] else "") for s in open_sends)
        if r["error"]:
            detail = f"{r['error']}" + (f"; {detail}" if detail else "")
        if r["purged_at"]:
            detail = f"files removed {_age(r['purged_at'])} ago (retention)" + (f"; {detail}" if detail else "")
        print(f"{r['series_uid']:<64} {r['modality'] or '':<3} {recv:>9} {r['state']:<11} {r['rule'] or '-':<16} "
              f"{sends_txt:<5} {_age(r['last_received']):>5}  {detail[:200]}")


def _print_disk(settings: NodeSettings, data_dir: Path | None, db: Any) -> None:
    """The disk budget, and what retention and disk pressure would remove next."""
    from dicom_node.retention import eviction_candidates, max_age_h
    from dicom_node.settings import DiskSettings
    from dicom_node.spool import Spool, disk_usage_mb

    data_dir = data_dir or settings.data_dir
    disk: DiskSettings = settings.disk
    free_mb, total_mb, used = disk_usage_mb(data_dir)
    evict_free = disk.min_free_mb + disk.evict_headroom_mb
    evict_used = disk.max_used_percent - disk.evict_headroom_percent
    pressed = free_mb < evict_free or used > evict_used
    print(f"\ndisk: {free_mb:,.0f} MB free of {total_mb:,.0f} MB ({used:.1f} % used); finished series are removed "
          f"below {evict_free:,.0f} MB free or above {evict_used:.1f} % used, C-STOREs refused below "
          f"{disk.min_free_mb:,.0f} MB / above {disk.max_used_percent:.1f} %"
          + ("  [UNDER PRESSURE]" if pressed else ""))
    candidates = eviction_candidates(db, Spool(data_dir, disk), limit=5)
    if not candidates:
        print("next to remove: nothing (no finished series with files)")
        return
    print("next to remove (disk pressure order; retention removes each at the time shown):")
    for c in candidates:
        age = max_age_h(settings.retention, c.state)
        when = _when(c.finished_at + age * 3600.0) if age is not None else "never"
        print(f"  {c.series_uid:<64} {c.state:<11} {c.modality:<3} {c.size_bytes / 2**20:8.1f} MB  "
              f"finished {_age(c.finished_at)} ago, retention at {when}")


def _print_tls(settings: NodeSettings) -> None:
    """DICOM TLS: the listener and every certificate with its subject and days left (nothing when TLS is off)."""
    from dicom_node import tls

    lines = tls.describe(settings)
    if lines:
        print("\nTLS (" + tls.TLS_PROFILE_NAME + "):")
        for line in lines:
            print(f"  {line}")


def cmd_status(args: argparse.Namespace) -> int:
    db = _open_db(args)
    try:
        active = ["receiving", "complete", "processing", "sending", "incomplete", "failed", "refused"]
        rows = db.list_series([] if args.all else active)
        _print_series_table(db, rows)
        _print_disk(settings_from(args), args.data_dir, db)
        assocs = db.associations()
        print(f"\nactive associations: {len(assocs)}")
        for a in assocs:
            print(f"  {a['calling_ae']} -> {a['called_ae']} from {a['peer']} for {_age(a['started_at'])}")
        if db.shared:  # several nodes on one PostgreSQL state: which are alive
            nodes = db.nodes()
            print(f"\nnodes sharing {db.describe()}: {len(nodes)}")
            for n in nodes:
                print(f"  {n['node_id']}: {n['ae_title']} port {n['port']} (pid {n['pid']} on {n['host']}), "
                      f"last heartbeat {_age(n['heartbeat_at'])} ago")
        _print_tls(settings_from(args))
    finally:
        db.close()
    return 0


def cmd_series_list(args: argparse.Namespace) -> int:
    db = _open_db(args)
    try:
        _print_series_table(db, db.list_series(args.state))
    finally:
        db.close()
    return 0


def _one_series(db: Any, uid: str) -> dict[str, Any]:
    found = db.find_series(uid)
    if not found:
        raise DicomNodeError(f"no series {uid!r} in this node")
    if len(found) > 1:
        raise DicomNodeError(f"{uid!r} matches {len(found)} series; give more of the UID")
    return dict(found[0])


def cmd_series_show(args: argparse.Namespace) -> int:
    db = _open_db(args)
    try:
        row = _one_series(db, args.uid)
        for key, value in row.items():
            if key.endswith(("_at", "received")) and isinstance(value, float):
                value = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
            print(f"{key:<18} {value}")
        print(f"{'instances':<18} {len(db.instances(row['series_uid']))} on disk")
        for s in db.sends(row["series_uid"]):
            print(f"send {s.get('kind', 'derived')} to {s['destination']}: {send_progress(s)}, {s['attempts']} "
                  "attempt(s)"
                  f"{', last error: ' + s['last_error'] if s['last_error'] else ''}")
    finally:
        db.close()
    return 0


def cmd_series_complete(args: argparse.Namespace) -> int:
    db = _open_db(args)
    try:
        row = _one_series(db, args.uid)
        if not db.request_complete(row["series_uid"]):
            print(f"series {row['series_uid']} is {row['state']}: only receiving or incomplete series can be "
                  "forced complete", file=sys.stderr)
            return 1
        print(f"series {row['series_uid']}: completion forced with {row['received_count']} instance(s); "
              "the node processes it at its next check")
    finally:
        db.close()
    return 0


def cmd_series_retry(args: argparse.Namespace) -> int:
    from dicom_node.state import SeriesState

    db = _open_db(args)
    try:
        row = _one_series(db, args.uid)
        uid = row["series_uid"]
        n = db.retry_sends(uid)
        if n:
            print(f"series {uid}: {n} failed destination(s) queued again")
            return 0
        if row["state"] == SeriesState.FAILED and not db.sends(uid):
            db.set_state(uid, SeriesState.COMPLETE, expect=[SeriesState.FAILED])
            print(f"series {uid}: queued for processing again")
            return 0
        print(f"series {uid} is {row['state']}: nothing to retry", file=sys.stderr)
        return 1
    finally:
        db.close()


def cmd_series_reprocess(args: argparse.Namespace) -> int:
    if args.rule is not None:
        _, ruleset = load_node_config(args)
        names = [r.name for r in ruleset.rules]
        if args.rule not in names:
            print(f"petnode: no rule {args.rule!r} in the rules file; rules: {', '.join(names)}", file=sys.stderr)
            return 2
    db = _open_db(args)
    try:
        row = _one_series(db, args.uid)
        uid = row["series_uid"]
        if row["purged_at"] is not None:
            print(f"series {uid}: its files were removed by retention; send it to the node again instead",
                  file=sys.stderr)
            return 1
        if not db.reprocess(uid, args.rule):
            print(f"series {uid} is {row['state']}: only {', '.join(db.REPROCESSABLE)} series can be "
                  "reprocessed (wait for it to finish)", file=sys.stderr)
            return 1
        how = f"with rule {args.rule!r}" if args.rule else "routed again with the current rules"
        print(f"series {uid}: queued for processing {how}; the result will be sent in full")
    finally:
        db.close()
    return 0
