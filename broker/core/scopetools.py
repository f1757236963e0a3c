"""The engineer's tools over scope maps: explain, test, diff, replay (pure: values in and out)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import yaml

from broker.core.models import Decision, Outcome
from broker.core.records import (
    RecordedDecision,
    decision_to_json,
    parse_time,
    request_from_json,
)
from broker.core.scopemap import ActionClass, ScopeMap, evaluate, yaml_error_text
from broker.core.spiffeid import SpiffeId
from broker.errors import InvalidSpiffeIdError

# --- explain ------------------------------------------------------------------


def explain_lines(d: Decision, scope_map: ScopeMap) -> list[str]:
    head = {Outcome.ALLOW: "ALLOW", Outcome.DENY: "DENY",
            Outcome.NEEDS_APPROVAL: "NEEDS APPROVAL"}[d.outcome]
    if d.deny_code is not None:
        head += f" ({d.deny_code.value})"
    lines = [f"decision:   {head}", f"identity:   {d.spiffe_id}"]
    cls = scope_map.classes.get(d.action_class)
    if cls is not None:
        lines += [
            f"class:      {cls.name} (risk {cls.risk}) defined at {cls.source}",
            f"owner:      {cls.owner.team} <{cls.owner.contact}>",
            f"escalation: {' → '.join(cls.escalation)}",
        ]
    lines.append(f"rule:       {d.rule}")
    lines += [f"why:        {r}" for r in d.reasons]
    if d.outcome is not Outcome.DENY:
        lines.append(f"credential: policies {', '.join(d.policies)}, TTL {d.ttl_seconds}s")
    lines.append(f"scope map:  {d.scope_map_version}")
    return lines


# --- test ---------------------------------------------------------------------

_EXPECT_KEYS = {"outcome", "deny_code", "rule", "reason_contains", "ttl_seconds"}


@dataclass(frozen=True, slots=True, kw_only=True)
class CaseResult:
    name: str
    passed: bool
    mismatches: tuple[str, ...]
    decision: Decision


class CasesError(ValueError):
    """A test-cases file is malformed (the message names the case and field)."""


def run_cases(scope_map: ScopeMap, text: str, source: str, *, default_now: datetime
              ) -> list[CaseResult]:
    """Evaluate every case of a cases document (like ``opa test``).

    Raises:
        CasesError: the cases document is malformed.
    """
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CasesError(yaml_error_text(source, text, exc)) from None
    cases = doc.get("cases") if isinstance(doc, dict) else None
    if not isinstance(cases, list) or not cases:
        raise CasesError(f"{source}: expected a mapping with a non-empty list `cases:`")
    results = []
    for i, case in enumerate(cases):
        where = f"{source}: cases[{i}]"
        if not isinstance(case, dict):
            raise CasesError(f"{where}: each case must be a mapping")
        name = str(case.get("name") or f"case {i}")
        where = f"{source}: case {name!r}"
        unknown = set(case) - {"name", "spiffe_id", "request", "now", "recent_issuances",
                               "expect"}
        if unknown:
            raise CasesError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        try:
            sid = SpiffeId.parse(str(case.get("spiffe_id", "")))
            request = request_from_json(case.get("request"), where)
            now = parse_time(str(case["now"])) if "now" in case else default_now
            recent = [parse_time(str(t)) for t in case.get("recent_issuances") or []]
        except (InvalidSpiffeIdError, ValueError) as exc:
            raise CasesError(str(exc) if str(exc).startswith(source) else f"{where}: {exc}"
                             ) from None
        expect = case.get("expect")
        if not isinstance(expect, dict) or "outcome" not in expect:
            raise CasesError(f"{where}: expect must be a mapping with at least outcome "
                             "(allow, deny or needs_approval)")
        bad = set(expect) - _EXPECT_KEYS
        if bad:
            raise CasesError(f"{where}: unknown expect field(s) {', '.join(sorted(bad))}; "
                             f"allowed: {', '.join(sorted(_EXPECT_KEYS))}")
        d = evaluate(scope_map, sid, request, now, recent)
        got = decision_to_json(d)
        mismatches = []
        for key in ("outcome", "deny_code", "rule", "ttl_seconds"):
            if key in expect and str(expect[key]) != str(got[key]):
                mismatches.append(f"{key}: expected {expect[key]!r}, got {got[key]!r}")
        if "reason_contains" in expect and not any(str(expect["reason_contains"]) in r
                                                   for r in d.reasons):
            mismatches.append(f"reasons: expected to contain {expect['reason_contains']!r}, "
                              f"got {list(d.reasons)!r}")
        results.append(CaseResult(name=name, passed=not mismatches,
                                  mismatches=tuple(mismatches), decision=d))
    return results


# --- diff ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Change:
    action_class: str
    kind: str  # class_added, class_removed, workloads_gained, workloads_lost, risk, ...
    before: Any
    after: Any
    widens: bool  # True when the change gives someone more power or less oversight

    def text(self) -> str:
        sign = "+" if self.widens else "-"
        if self.kind == "class_added":
            return f"{sign} {self.action_class}: new class, requestable by {', '.join(self.after)}"
        if self.kind == "class_removed":
            return f"{sign} {self.action_class}: class removed (was requestable by " \
                   f"{', '.join(self.before)})"
        if self.kind in ("workloads_gained", "workloads_lost", "targets_gained",
                         "targets_lost", "policy_rules_added", "policy_rules_removed"):
            items = self.after if self.kind.endswith(("gained", "added")) else self.before
            return f"{sign} {self.action_class}: {self.kind.replace('_', ' ')}: {', '.join(items)}"
        return f"{sign} {self.action_class}: {self.kind.replace('_', ' ')}: " \
               f"{self.before} → {self.after}"


_RISK = {"low": 0, "high": 1, "destructive": 2}


def _rules(c: ActionClass) -> set[str]:
    return {f"{r.path} [{','.join(r.capabilities)}]" for r in c.vault_policy}


def _approval(c: ActionClass) -> str:
    a = c.approval
    if a is None:
        return "none"
    return f"jit({a.approvals_required} of {','.join(a.approvers)})"


def diff_maps(old: ScopeMap, new: ScopeMap) -> list[Change]:
    """Every change from ``old`` to ``new``, with whether it widens power or narrows oversight."""
    out: list[Change] = []
    for name in sorted(set(old.classes) | set(new.classes)):
        a, b = old.classes.get(name), new.classes.get(name)
        if a is None and b is not None:
            out.append(Change(action_class=name, kind="class_added", before=None,
                              after=[p.text for p in b.workloads], widens=True))
            continue
        if b is None and a is not None:
            out.append(Change(action_class=name, kind="class_removed",
                              before=[p.text for p in a.workloads], after=None, widens=False))
            continue
        assert a is not None and b is not None
        aw, bw = [p.text for p in a.workloads], [p.text for p in b.workloads]
        gained, lost = [w for w in bw if w not in aw], [w for w in aw if w not in bw]
        if gained:
            out.append(Change(action_class=name, kind="workloads_gained", before=aw,
                              after=gained, widens=True))
        if lost:
            out.append(Change(action_class=name, kind="workloads_lost", before=lost, after=bw,
                              widens=False))

        def scalar(kind: str, x: Any, y: Any, widens: bool, name: str = name) -> None:
            if x != y:
                out.append(Change(action_class=name, kind=kind, before=x, after=y,
                                  widens=widens))

        scalar("risk", a.risk, b.risk, _RISK[b.risk] < _RISK[a.risk])
        scalar("ttl", f"{a.ttl_seconds}s", f"{b.ttl_seconds}s", b.ttl_seconds > a.ttl_seconds)
        scalar("max_ttl", f"{a.max_ttl_seconds}s", f"{b.max_ttl_seconds}s",
               b.max_ttl_seconds > a.max_ttl_seconds)
        scalar("approval", _approval(a), _approval(b),
               a.approval is not None and (b.approval is None or
                                           b.approval.approvals_required
                                           < a.approval.approvals_required))
        scalar("owner", f"{a.owner.team} <{a.owner.contact}>",
               f"{b.owner.team} <{b.owner.contact}>", False)
        scalar("escalation", " → ".join(a.escalation), " → ".join(b.escalation), False)
        scalar("requires", ",".join(a.requires) or "nothing", ",".join(b.requires) or "nothing",
               not set(a.requires) <= set(b.requires))
        scalar("limits", a.budget.text if a.budget else "none",
               b.budget.text if b.budget else "none",
               a.budget is not None and (b.budget is None or
                                         b.budget.count / b.budget.window_seconds
                                         > a.budget.count / a.budget.window_seconds))
        scalar("when", a.when.text if a.when else "none", b.when.text if b.when else "none",
               a.when is not None)
        at, bt = set(a.targets), set(b.targets)
        if at != bt:
            if bt - at or (at and not bt):
                out.append(Change(action_class=name, kind="targets_gained", before=sorted(at),
                                  after=sorted(bt - at) or ["(any target)"], widens=True))
            if at - bt:
                out.append(Change(action_class=name, kind="targets_lost",
                                  before=sorted(at - bt), after=sorted(bt), widens=False))
        ar, br = _rules(a), _rules(b)
        if br - ar:
            out.append(Change(action_class=name, kind="policy_rules_added", before=sorted(ar),
                              after=sorted(br - ar), widens=True))
        if ar - br:
            out.append(Change(action_class=name, kind="policy_rules_removed",
                              before=sorted(ar - br), after=sorted(br), widens=False))
    return out


def blast_radius(changes: Iterable[Change], new: ScopeMap, old: ScopeMap) -> dict[str, list[str]]:
    """Per workload pattern: what it gains (+) or loses (-)."""
    out: dict[str, list[str]] = defaultdict(list)
    for c in changes:
        if c.kind in ("class_added", "workloads_gained"):
            for w in c.after:
                risk = new.classes[c.action_class].risk
                out[w].append(f"+ {c.action_class} ({risk})")
        elif c.kind in ("class_removed", "workloads_lost"):
            for w in c.before:
                out[w].append(f"- {c.action_class}")
        elif c.widens:
            cls = new.classes.get(c.action_class) or old.classes[c.action_class]
            for p in cls.workloads:
                out[p.text].append(f"+ {c.action_class}: {c.kind.replace('_', ' ')} widened")
    return dict(sorted(out.items()))


# --- replay -------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplayChange:
    record: RecordedDecision
    new: Decision


@dataclass(slots=True, kw_only=True)
class ReplayResult:
    total: int = 0
    changed: list[ReplayChange] = field(default_factory=list)


def replay(scope_map: ScopeMap, records: Iterable[RecordedDecision]) -> ReplayResult:
    """Re-decide recorded requests, in order, under ``scope_map``; list changed outcomes.

    Budgets (``limits``) are counted from the issuances the candidate map
    itself would have allowed earlier in the same replay.
    """
    result = ReplayResult()
    issued: dict[tuple[str, str], list[datetime]] = defaultdict(list)
    for rec in sorted(records, key=lambda r: r.time):
        key = (str(rec.spiffe_id), rec.request.action_class)
        d = evaluate(scope_map, rec.spiffe_id, rec.request, rec.time, issued[key])
        if d.outcome is Outcome.ALLOW:
            issued[key].append(rec.time)
        result.total += 1
        if d.outcome is not rec.outcome:
            result.changed.append(ReplayChange(record=rec, new=d))
    return result
