"""The read-only status page: one server-rendered HTML document, inline CSS, no script, nothing fetched from
elsewhere.

What a PACS administrator needs at a glance: series with state, rule, progress and last error; destinations and
their backlog; models and their active versions; the last derived series with a thumbnail. Patient name, ID and
birth date are never shown (series description, modality, dates and UIDs are what the PACS shows beside them
anyway). Every value is escaped.
"""

from __future__ import annotations

import html
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from pydicom import dcmread

from dicom_node.web.thumbs import pick_map

if TYPE_CHECKING:
    from dicom_node.node import Node

logger = logging.getLogger(__name__)

SERIES_SHOWN = 50
MODELS_TTL_S = 30.0  # model cards are read from the store at most this often
_HEADER_TAGS = ["SeriesDescription", "SeriesDate", "StudyDate"]

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.2em;color:#222;background:#fafafa}
h1{font-size:1.3em;margin:0 0 .3em} h2{font-size:1.1em;margin:1.4em 0 .4em}
table{border-collapse:collapse;background:#fff;width:100%} td,th{border:1px solid #ddd;padding:3px 6px;
text-align:left;vertical-align:top} th{background:#eee} .uid{font-family:monospace;font-size:12px}
.err{color:#a00} .muted{color:#777} .ok{color:#070} .state{font-weight:600}
.s-failed,.s-incomplete,.s-refused{color:#a00} .s-delivered{color:#070} .s-processing,.s-sending{color:#05a}
figure{margin:0} figcaption{color:#555;font-size:12px}
"""


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def age(ts: float | None, now: float | None = None) -> str:
    if not ts:
        return "-"
    s = max(0.0, (now or time.time()) - float(ts))
    return (f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h" if s < 172800
            else f"{s / 86400:.1f} d")


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], empty: str) -> str:
    """Cells are HTML already (escaped by the caller)."""
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    if not body:
        return f'<p class="muted">{esc(empty)}</p>'
    return "<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in headers) + "</tr>" + body + "</table>"


def _uid(uid: str | None) -> str:
    return f'<span class="uid">{esc(uid)}</span>' if uid else "-"


def send_text(send: dict[str, Any], now: float) -> str:
    """One send in words: destination, payload, progress."""
    state = send["state"]
    progress = f"{send['sent']}/{send['total']}"
    if state == "pending" and send.get("held"):
        what = "held for its study"
    elif state == "pending" and send["attempts"]:
        wait_s = float(send["next_attempt_at"] or 0) - now
        what = f"retrying (attempt {send['attempts'] + 1}" + (f" in {wait_s:.0f} s)" if wait_s > 0 else ")")
    else:
        what = {"pending": "queued", "sending": "sending", "done": "done", "failed": "gave up"}.get(state, state)
    cls = "err" if state == "failed" else "ok" if state == "done" else ""
    return (f'<span class="{cls}">{esc(send.get("kind", "derived"))} &rarr; {esc(send["ae_title"])}: '
            f'{esc(progress)} {esc(what)}</span>')


class StatusPage:
    """Renders the page for one node; keeps what is costly to read (series headers, model list) briefly."""

    def __init__(self, node: Node, refresh_s: float) -> None:
        self.node = node
        self.refresh_s = refresh_s
        self._headers: dict[str, dict[str, str]] = {}
        self._models: tuple[float, list[Any]] | None = None
        self._lock = threading.Lock()

    # --- data ------------------------------------------------------------------------------------------------
    def header(self, series_uid: str) -> dict[str, str]:
        """Series description and dates from one instance's header (read once per series; no patient data)."""
        with self._lock:
            cached = self._headers.get(series_uid)
        if cached is not None:
            return cached
        info: dict[str, str] = {}
        paths = self.node.db.instance_paths(series_uid)
        if paths:
            try:
                ds = dcmread(paths[0], stop_before_pixels=True, specific_tags=_HEADER_TAGS)
                info = {k: str(ds.get(k, "") or "") for k in _HEADER_TAGS}
            except Exception:  # noqa: BLE001 - a file retention removed meanwhile, or unreadable: shown empty
                logger.debug("series=%s: header unreadable for the status page", series_uid, exc_info=True)
        with self._lock:
            if len(self._headers) > 4 * SERIES_SHOWN:
                self._headers.clear()
            if paths:
                self._headers[series_uid] = info
        return info

    def models(self) -> list[Any]:
        now = time.monotonic()
        with self._lock:
            if self._models is not None and now - self._models[0] < MODELS_TTL_S:
                return self._models[1]
        try:
            listed = list(self.node.models.list())
        except Exception:  # noqa: BLE001 - an unreadable store is shown as such, the page still renders
            logger.warning("status page: the model store cannot be listed", exc_info=True)
            listed = []
        with self._lock:
            self._models = (now, listed)
        return listed

    # --- sections --------------------------------------------------------------------------------------------
    def _series_section(self, rows: list[dict[str, Any]], now: float) -> str:
        table_rows = []
        for r in rows:
            uid = r["series_uid"]
            info = self.header(uid)
            sends = self.node.db.sends(uid)
            expected = r.get("expected_count")
            progress = "<br>".join(send_text(s, now) for s in sends) or '<span class="muted">-</span>'
            error = r.get("error") or next((s["last_error"] for s in sends if s["state"] != "done"
                                            and s.get("last_error")), None)
            state = r["state"] + (" (files removed)" if r.get("purged_at") else "")
            table_rows.append([
                _uid(uid), esc(r.get("modality") or ""), esc(info.get("SeriesDescription", "")),
                esc(info.get("SeriesDate") or info.get("StudyDate") or ""), esc(r.get("calling_ae") or ""),
                f'<span class="state s-{esc(r["state"])}">{esc(state)}</span>', esc(r.get("rule") or "-"),
                esc(f"{r.get('received_count') or 0}/{expected if expected else '?'}"), progress,
                f'<span class="err">{esc(error)}</span>' if error else "", esc(age(r.get("last_received"), now)),
            ])
        return "<h2>Series</h2>" + _table(
            ["Series Instance UID", "Modality", "Description", "Date", "From", "State", "Rule", "Received",
             "Sends", "Last error", "Last instance"], table_rows, "No series received yet.")

    def _destinations_section(self, now: float) -> str:
        backlog: dict[str, dict[str, Any]] = {}
        for row in self.node.db.send_backlog():
            entry = backlog.setdefault(row["destination"], {"pending": 0, "sending": 0, "failed": 0,
                                                            "remaining": 0, "oldest": None, "last_error": None})
            entry[row["state"]] = row["sends"]
            if row["state"] != "failed":
                entry["remaining"] += int(row["remaining"] or 0)
                entry["oldest"] = min(x for x in (entry["oldest"], row["oldest"]) if x is not None) \
                    if row["oldest"] is not None else entry["oldest"]
            entry["last_error"] = entry["last_error"] or row["last_error"]
        names = {f"{p.ae_title}@{p.host}:{p.port}": p.name for p in self.node.settings.peers}
        keys = sorted(set(backlog) | set(names))
        rows = []
        for key in keys:
            b = backlog.get(key, {})
            rows.append([
                esc(names.get(key, "")), esc(key), esc(b.get("pending", 0)), esc(b.get("sending", 0)),
                f'<span class="err">{esc(b["failed"])}</span>' if b.get("failed") else "0",
                esc(b.get("remaining", 0)), esc(age(b.get("oldest"), now) if b.get("oldest") else "-"),
                f'<span class="err">{esc(b["last_error"])}</span>' if b.get("last_error") else "",
            ])
        return "<h2>Destinations</h2>" + _table(
            ["Peer", "Destination", "Pending sends", "Sending", "Failed", "Instances to send", "Oldest waiting",
             "Last error"], rows, "No destinations configured and nothing sent.")

    def _models_section(self) -> str:
        rows = []
        for info in self.models():
            versions = ", ".join(f"{v.version} ({v.state})" for v in info.versions)
            active = next((v for v in info.versions if v.version == info.active), None)
            method = active.card.denoiser if active is not None and active.card is not None else ""
            rows.append([esc(info.name), esc(info.active or "none"), esc(method), esc(versions)])
        return "<h2>Models</h2>" + _table(["Model", "Active version", "Denoiser", "Versions"], rows,
                                          "No models installed.")

    def _last_derived_section(self, rows: list[dict[str, Any]]) -> str:
        row = next((r for r in rows if r.get("output_series_uid") and not r.get("purged_at")
                    and r["state"] in ("sending", "delivered", "failed")), None)
        if row is None:
            return '<h2>Last derived series</h2><p class="muted">None yet.</p>'
        uid = row["series_uid"]
        outputs = self.node.db.outputs(uid)
        maps = sorted(f"{o['kind']} {o['format']}" for o in outputs if o["payload"] == "maps")
        shown = "input | output"
        chosen = pick_map(outputs)
        if chosen is not None:
            shown += f" | {chosen['kind']} map"
        processed = f"processed {age(row.get('processed_at'))} ago" if row.get("processed_at") else ""
        description = self.header(uid).get("SeriesDescription", "")
        return (
            "<h2>Last derived series</h2>"
            f"<p>Source {_uid(uid)} ({esc(description)}), rule {esc(row.get('rule'))}, derived series "
            f"{_uid(row['output_series_uid'])}" + (f", maps: {esc(', '.join(maps))}" if maps else "")
            + f"; {esc(processed)}</p>"
            f'<figure><img id="thumbnail" src="thumb/{quote(uid, safe="")}.png" '
            f'alt="central slice of {esc(uid)}: {esc(shown)}">'
            f"<figcaption>Central slice: {esc(shown)} (input and output in the input's window)</figcaption></figure>"
        )

    def _workers_section(self, now: float) -> str:
        """Distributed processing only: the broker's queues and the last jobs with the worker that ran each."""
        remote = getattr(self.node, "remote", None)
        if remote is None:
            return ""
        try:
            depths = remote.queue_depths()
            queues = ", ".join(f"{esc(lane)}: {esc(n)} waiting" for lane, n in depths.items())
        except Exception as exc:  # noqa: BLE001 - a broker that does not answer is shown, not raised
            queues = f'<span class="err">broker not answering: {esc(type(exc).__name__)}</span>'
        rows = [[_uid(uid), esc(r.lane), esc(r.state), esc(r.worker or ", ".join(r.started_on) or "-"),
                 esc(len(r.started_on)), esc(age(r.sent_at, now))] for uid, r in remote.recent_jobs()]
        return (f"<h2>Workers</h2><p>Broker queues: {queues}</p>"
                + _table(["Series", "Lane", "State", "Worker", "Starts", "Sent"], rows, "No jobs sent yet."))

    def render(self) -> str:
        from dicom_node import __version__

        now = time.time()
        node = self.node
        rows = node.db.list_series(limit=SERIES_SHOWN)
        ready = node.readiness()
        status = ("ready" if all(ready.values())
                  else "not ready: " + ", ".join(k for k, ok in ready.items() if not ok))
        refresh = f'<meta http-equiv="refresh" content="{self.refresh_s:g}">' if self.refresh_s > 0 else ""
        return (
            "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>petnode {esc(node.settings.ae_title)}</title>{refresh}<style>{_CSS}</style></head><body>"
            f"<h1>petnode {esc(node.settings.ae_title)}</h1>"
            f'<p>version {esc(__version__)} &middot; DICOM port {esc(node.port)} &middot; '
            f'<span class="{"ok" if status == "ready" else "err"}">{esc(status)}</span> &middot; '
            f'{esc(time.strftime("%Y-%m-%d %H:%M:%S"))} &middot; <a href="metrics">metrics</a></p>'
            + self._last_derived_section(rows)
            + self._series_section(rows, now)
            + self._destinations_section(now)
            + self._workers_section(now)
            + self._models_section()
            + "</body></html>"
        )
