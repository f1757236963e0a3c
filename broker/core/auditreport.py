"""The governance report over an audit log (pure: records and a time window in, a report out).

What a governance review asks of autonomous actions (NIST AI RMF GOVERN, OWASP's
agentic top 10): per action class and its owner, how much was issued and denied,
who approved what and how fast (approvals decided in seconds are rubber-stamping),
how often the emergency path was taken and whether every use was reviewed, and
which freezes were made and who lifted them. Everything is counted from the
records themselves; nothing here reads a file or the clock.
"""

from __future__ import annotations

import html
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from broker.core.records import parse_time

#: An approval decided faster than this (request to decision) is flagged.
DEFAULT_RUBBER_STAMP_SECONDS = 30


@dataclass(slots=True)
class ApprovalSeen:
    approval_id: str
    action_class: str
    spiffe_id: str
    requested_at: datetime | None = None
    decided_at: datetime | None = None
    decided_by: str = ""
    outcome: str = ""  # approved, denied, expired

    @property
    def seconds(self) -> float | None:
        if self.requested_at is None or self.decided_at is None:
            return None
        return (self.decided_at - self.requested_at).total_seconds()


@dataclass(slots=True)
class ClassReport:
    action_class: str
    owner: str = ""
    issued: int = 0
    reused: int = 0
    allowed: int = 0
    denied: int = 0
    needed_approval: int = 0
    denials_by_code: Counter[str] = field(default_factory=Counter)
    approvals: list[ApprovalSeen] = field(default_factory=list)
    break_glass_uses: int = 0
    break_glass_refused: int = 0
    break_glass_unreviewed: list[str] = field(default_factory=list)
    freezes: int = 0

    def decided(self, outcome: str) -> list[ApprovalSeen]:
        return [a for a in self.approvals if a.outcome == outcome]


@dataclass(frozen=True, slots=True, kw_only=True)
class FreezeSeen:
    time: datetime
    kind: str
    pattern: str
    by: str
    reason: str
    lifted_by: str = ""
    lifted_at: datetime | None = None
    lift_reason: str = ""


@dataclass(slots=True)
class Report:
    since: datetime | None
    until: datetime | None
    rubber_stamp_seconds: int
    records: int = 0
    classes: dict[str, ClassReport] = field(default_factory=dict)
    freezes: list[FreezeSeen] = field(default_factory=list)
    denials_by_identity: Counter[str] = field(default_factory=Counter)

    def cls(self, name: str) -> ClassReport:
        if name not in self.classes:
            self.classes[name] = ClassReport(action_class=name)
        return self.classes[name]

    def rubber_stamped(self) -> list[ApprovalSeen]:
        return [a for c in self.classes.values() for a in c.decided("approved")
                if a.seconds is not None and a.seconds < self.rubber_stamp_seconds]

    def by_owner(self) -> dict[str, list[ClassReport]]:
        out: dict[str, list[ClassReport]] = {}
        for c in sorted(self.classes.values(), key=lambda c: c.action_class):
            out.setdefault(c.owner or "(no owner recorded)", []).append(c)
        return dict(sorted(out.items()))


def build_report(records: Iterable[Mapping[str, Any]], *, since: datetime | None = None,
                 until: datetime | None = None,
                 rubber_stamp_seconds: int = DEFAULT_RUBBER_STAMP_SECONDS) -> Report:
    """Count the records whose time is in [since, until).

    An approval requested before ``since`` and decided inside the window counts
    (with its real latency), so a window never hides how fast something was approved.

    Raises:
        ValueError: a record's time is not RFC 3339.
    """
    report = Report(since=since, until=until, rubber_stamp_seconds=rubber_stamp_seconds)
    approvals: dict[str, ApprovalSeen] = {}
    glass: dict[str, tuple[str, bool]] = {}  # approval id -> (class, reviewed)
    open_freezes: dict[tuple[str, str], list[int]] = {}
    for r in records:
        kind = str(r.get("type", ""))
        when = parse_time(str(r["time"]))
        if until is not None and when >= until:
            continue
        if kind == "approval.requested":  # latency needs it even before the window
            a = approvals.setdefault(str(r.get("approval_id", "")), ApprovalSeen(
                approval_id=str(r.get("approval_id", "")),
                action_class=str(r.get("action_class", "")),
                spiffe_id=str(r.get("spiffe_id", ""))))
            a.requested_at = when
        if since is not None and when < since:
            continue
        report.records += 1
        cls_name = str(r.get("action_class") or "")
        if kind == "decision":
            d = r.get("decision") or {}
            c = report.cls(str(d.get("action_class") or cls_name or "(unknown)"))
            owner = d.get("owner") or {}
            if owner.get("team"):
                c.owner = str(owner["team"])
            outcome = d.get("outcome")
            if outcome == "allow":
                c.allowed += 1
            elif outcome == "needs_approval":
                c.needed_approval += 1
            elif outcome == "deny":
                c.denied += 1
                c.denials_by_code[str(d.get("deny_code") or "denied")] += 1
                report.denials_by_identity[str(r.get("spiffe_id", ""))] += 1
        elif kind == "credential.minted":
            report.cls(cls_name).issued += 1
        elif kind == "credential.reused":
            report.cls(cls_name).reused += 1
        elif kind in ("approval.approved", "approval.denied", "approval.expired"):
            aid = str(r.get("approval_id", ""))
            a = approvals.setdefault(aid, ApprovalSeen(approval_id=aid, action_class=cls_name,
                                                       spiffe_id=str(r.get("spiffe_id", ""))))
            a.decided_at = when
            a.decided_by = str(r.get("approver") or "")
            a.outcome = kind.split(".", 1)[1]
            if kind == "approval.approved" and str(r.get("state")) == "pending":
                a.outcome = "partly approved"
            mine = report.cls(a.action_class or cls_name).approvals
            if not any(x is a for x in mine):  # several votes: one approval
                mine.append(a)
        elif kind == "approval.break_glass":
            report.cls(cls_name).break_glass_uses += 1
            glass[str(r.get("approval_id", ""))] = (cls_name, False)
        elif kind == "approval.break_glass_refused":
            report.cls(cls_name).break_glass_refused += 1
        elif kind == "approval.reviewed":
            aid = str(r.get("approval_id", ""))
            if aid in glass:
                glass[aid] = (glass[aid][0], True)
        elif kind == "freeze":
            fz = FreezeSeen(time=when, kind=str(r.get("kind", "")),
                            pattern=str(r.get("pattern", "")), by=str(r.get("by", "")),
                            reason=str(r.get("reason", "")))
            report.freezes.append(fz)
            open_freezes.setdefault((fz.kind, fz.pattern), []).append(len(report.freezes) - 1)
            if fz.kind == "action_class":
                report.cls(fz.pattern).freezes += 1
        elif kind == "unfreeze":
            key = (str(r.get("kind", "")), str(r.get("pattern", "")))
            for i in open_freezes.pop(key, []):
                f = report.freezes[i]
                report.freezes[i] = FreezeSeen(
                    time=f.time, kind=f.kind, pattern=f.pattern, by=f.by, reason=f.reason,
                    lifted_by=str(r.get("by", "")), lifted_at=when,
                    lift_reason=str(r.get("reason", "")))
    for aid, (cls_name, reviewed) in glass.items():
        if not reviewed:
            report.cls(cls_name).break_glass_unreviewed.append(aid)
    return report


def _fmt_seconds(s: float | None) -> str:
    if s is None:
        return "?"
    if s < 120:
        return f"{s:.0f}s"
    return f"{s / 60:.0f}m"


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    v = sorted(values)
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2


def _window(report: Report) -> str:
    since = report.since.isoformat() if report.since else "the first record"
    until = report.until.isoformat() if report.until else "the last record"
    return f"{since} to {until}"


def to_json(report: Report) -> dict[str, Any]:
    return {
        "window": {"since": report.since.isoformat() if report.since else None,
                   "until": report.until.isoformat() if report.until else None},
        "records": report.records,
        "rubber_stamp_seconds": report.rubber_stamp_seconds,
        "owners": {owner: [{
            "action_class": c.action_class, "issued": c.issued, "reused": c.reused,
            "allowed": c.allowed, "denied": c.denied, "needed_approval": c.needed_approval,
            "denials_by_code": dict(c.denials_by_code),
            "approvals": [{"approval_id": a.approval_id, "outcome": a.outcome,
                           "by": a.decided_by, "seconds": a.seconds,
                           "spiffe_id": a.spiffe_id} for a in c.approvals],
            "break_glass": {"uses": c.break_glass_uses, "refused": c.break_glass_refused,
                            "unreviewed": c.break_glass_unreviewed},
            "freezes": c.freezes,
        } for c in classes] for owner, classes in report.by_owner().items()},
        "rubber_stamped": [{"approval_id": a.approval_id, "action_class": a.action_class,
                            "by": a.decided_by, "seconds": a.seconds}
                           for a in report.rubber_stamped()],
        "freezes": [{"time": f.time.isoformat(), "kind": f.kind, "pattern": f.pattern,
                     "by": f.by, "reason": f.reason, "lifted_by": f.lifted_by or None,
                     "lifted_at": f.lifted_at.isoformat() if f.lifted_at else None,
                     "lift_reason": f.lift_reason or None} for f in report.freezes],
        "denials_by_identity": dict(report.denials_by_identity.most_common()),
    }


def to_markdown(report: Report) -> str:
    out = ["# credbroker governance report", "",
           f"Window: {_window(report)}; {report.records} records. Approvals decided in under "
           f"{report.rubber_stamp_seconds}s are flagged as possible rubber-stamping.", ""]
    for owner, classes in report.by_owner().items():
        out += [f"## Owner: {owner}", "",
                "| action class | issued | cache reuses | allowed | denied | needed approval "
                "| approved | denied by a person | expired | median approval | break-glass "
                "(refused) | unreviewed | class freezes |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for c in classes:
            secs = [a.seconds for a in c.decided("approved") if a.seconds is not None]
            out.append(
                f"| `{c.action_class}` | {c.issued} | {c.reused} | {c.allowed} | {c.denied} | "
                f"{c.needed_approval} | {len(c.decided('approved'))} | "
                f"{len(c.decided('denied'))} | {len(c.decided('expired'))} | "
                f"{_fmt_seconds(_median(secs))} | {c.break_glass_uses} "
                f"({c.break_glass_refused}) | {len(c.break_glass_unreviewed)} | {c.freezes} |")
        out.append("")
        for c in classes:
            decided = [a for a in c.approvals if a.outcome in ("approved", "denied")]
            if decided:
                out.append(f"Approvals of `{c.action_class}`: " + "; ".join(
                    f"{a.approval_id} {a.outcome} by {a.decided_by or '?'} in "
                    f"{_fmt_seconds(a.seconds)}" for a in decided))
            if c.denials_by_code:
                out.append(f"Denials of `{c.action_class}` by rule: " + ", ".join(
                    f"{code} {n}" for code, n in c.denials_by_code.most_common()))
            if c.break_glass_unreviewed:
                out.append(f"Break-glass uses of `{c.action_class}` awaiting review: "
                           + ", ".join(c.break_glass_unreviewed))
        out.append("")
    stamped = report.rubber_stamped()
    out += ["## Possible rubber-stamping", ""]
    out += [f"- {a.approval_id} ({a.action_class}) approved by {a.decided_by or '?'} in "
            f"{_fmt_seconds(a.seconds)}" for a in stamped] or ["None."]
    out += ["", "## Freezes", ""]
    out += [f"- {f.time.isoformat()} {f.kind} `{f.pattern}` by {f.by}: {f.reason}; "
            + (f"lifted by {f.lifted_by} at {f.lifted_at.isoformat() if f.lifted_at else '?'}"
               f": {f.lift_reason}" if f.lifted_by else "still in force")
            for f in report.freezes] or ["None."]
    out += ["", "## Denials by identity", ""]
    out += [f"- `{sid}`: {n}" for sid, n in report.denials_by_identity.most_common(20)] \
        or ["None."]
    return "\n".join(out) + "\n"


def _bar_chart(title: str, rows: list[tuple[str, list[tuple[str, int, str]]]]) -> str:
    """An inline SVG of horizontal stacked bars: (label, [(series, value, colour)])."""
    width, label_w, bar_h = 720, 260, 22
    top = max((sum(v for _, v, _ in parts) for _, parts in rows), default=0) or 1
    height = 30 + bar_h * len(rows) + 10
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'role="img" aria-label="{html.escape(title)}">',
           f'<text x="0" y="16" font-size="14" font-weight="bold">{html.escape(title)}</text>']
    for i, (label, parts) in enumerate(rows):
        y = 28 + i * bar_h
        svg.append(f'<text x="0" y="{y + 15}" font-size="12">{html.escape(label)}</text>')
        x = float(label_w)
        for series, value, colour in parts:
            w = (width - label_w - 60) * value / top
            if value:
                svg.append(f'<rect x="{x:.1f}" y="{y + 3}" width="{max(w, 1):.1f}" '
                           f'height="{bar_h - 6}" fill="{colour}"><title>{html.escape(series)}'
                           f': {value}</title></rect>')
            x += w
        total = sum(v for _, v, _ in parts)
        svg.append(f'<text x="{x + 4:.1f}" y="{y + 15}" font-size="12">{total}</text>')
    svg.append("</svg>")
    return "".join(svg)


def to_html(report: Report) -> str:
    """A self-contained page (inline SVG charts, no scripts) with the markdown's content."""
    classes = sorted(report.classes.values(), key=lambda c: c.action_class)
    chart1 = _bar_chart("Decisions per action class (allowed / needed approval / denied)", [
        (c.action_class, [("allowed", c.allowed, "#2e7d32"),
                          ("needed approval", c.needed_approval, "#f9a825"),
                          ("denied", c.denied, "#c62828")]) for c in classes])
    approved = [(c.action_class, [a.seconds for a in c.decided("approved")
                                  if a.seconds is not None]) for c in classes]
    chart2 = _bar_chart("Median seconds from request to approval", [
        (name, [("median seconds", math.ceil(_median(s) or 0), "#1565c0")])
        for name, s in approved if s])
    chart3 = _bar_chart("Break-glass uses (reviewed / awaiting review)", [
        (c.action_class, [("reviewed", c.break_glass_uses - len(c.break_glass_unreviewed),
                           "#6a1b9a"),
                          ("awaiting review", len(c.break_glass_unreviewed), "#ef6c00")])
        for c in classes if c.break_glass_uses])
    body = html.escape(to_markdown(report))
    return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<title>credbroker governance report</title>"
            "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:70em}"
            "pre{white-space:pre-wrap;background:#f5f5f5;padding:1em}</style></head><body>"
            f"<h1>credbroker governance report</h1><p>{html.escape(_window(report))}; "
            f"{report.records} records</p>{chart1}<br>{chart2}<br>{chart3}"
            f"<h2>Details</h2><pre>{body}</pre></body></html>\n")
