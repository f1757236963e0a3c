"""The engineer's tools over scope maps: explain, test, diff, replay (pure: values in and out)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import PurePath
from typing import Any

import yaml

from broker.core.limits import limits_lines
from broker.core.models import Decision, Outcome
from broker.core.records import (
    RecordedDecision,
    decision_to_json,
    parse_time,
    request_from_json,
)
from broker.core.scopemap.evaluate import evaluate
from broker.core.scopemap.model import ActionClass, BreakGlass, ScopeMap
from broker.core.scopemap.parse import yaml_error_text
from broker.core.spiffeid import SpiffeId
from broker.errors import InvalidSpiffeIdError

# --- explain ------------------------------------------------------------------


def _head(d: Decision) -> str:
    head = {Outcome.ALLOW: "ALLOW", Outcome.DENY: "DENY",
            Outcome.NEEDS_APPROVAL: "NEEDS APPROVAL"}[d.outcome]
    return head + (f" ({d.deny_code.value})" if d.deny_code is not None else "")


def explain_lines(d: Decision, scope_map: ScopeMap, environment: str = "") -> list[str]:
    """The decision ``d`` (for ``environment``, when it names one), line by line."""
    lines = [f"decision:   {_head(d)}", f"identity:   {d.spiffe_id}"]
    if environment:
        lines.append(f"environment: {environment}")
    cls = scope_map.classes.get(d.action_class)
    if cls is not None:
        lines += [
            f"class:      {cls.name} (risk {cls.risk}) defined at {cls.source}",
            f"owner:      {cls.owner.team} <{cls.owner.contact}>",
            f"escalation: {' → '.join(cls.escalation)}",
        ]
        lines += [f"limits:     {line}" for line in limits_lines(cls)]
    lines.append(f"rule:       {d.rule}")
    lines += [f"why:        {r}" for r in d.reasons]
    if d.outcome is not Outcome.DENY:
        lines.append(f"credential: policies {', '.join(d.policies)}, TTL {d.ttl_seconds}s")
    lines.append(f"scope map:  {d.scope_map_version}")
    return lines


def environment_lines(per_environment: Iterable[tuple[str, Decision]]) -> list[str]:
    """One line per environment: its outcome and the rule that decided it."""
    return [f"  {env}: {_head(d)} (rule {d.rule})" for env, d in per_environment]


def effective_environment_mode(cls: ActionClass, environment: str) -> str:
    """allow, approval or deny: what ``cls`` takes in ``environment`` (a class without an
    ``environments:`` block: approval when it has a JIT rule, else allow)."""
    mode = cls.environment_mode(environment)
    return mode or ("approval" if cls.approval is not None else "allow")


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


def junit_xml(results: Sequence[CaseResult], *, suite: str, version: str) -> str:
    """The results as JUnit XML, the report CI systems read: one testcase per case.

    A failing case carries a ``<failure>`` whose message is what differed and
    whose text adds the rule and reason that decided it.
    """
    failures = sum(1 for r in results if not r.passed)
    root = ET.Element("testsuites", name="credbroker scope test", tests=str(len(results)),
                      failures=str(failures), errors="0")
    ts = ET.SubElement(root, "testsuite", name=suite, tests=str(len(results)),
                       failures=str(failures), errors="0", skipped="0")
    props = ET.SubElement(ts, "properties")
    ET.SubElement(props, "property", name="scope_map_version", value=version)
    for r in results:
        tc = ET.SubElement(ts, "testcase", name=r.name, classname=suite)
        if not r.passed:
            f = ET.SubElement(tc, "failure", message="; ".join(r.mismatches),
                              type="ScopeTestMismatch")
            f.text = "\n".join([*r.mismatches,
                                f"decided by {r.decision.rule}: {r.decision.reasons[0]}"])
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") \
        + "\n"


# --- diff ---------------------------------------------------------------------

WIDENS, NARROWS, REVIEW = "widens", "narrows", "review"
_SIGNS = {WIDENS: "+", NARROWS: "-", REVIEW: "~"}
_LIST_KINDS = ("workloads_gained", "workloads_lost", "targets_gained", "targets_lost",
               "policy_rules_added", "policy_rules_removed", "approvers_gained",
               "approvers_lost")


@dataclass(frozen=True, slots=True, kw_only=True)
class Change:
    """One change between two maps, and what it does to power and oversight.

    ``effect`` is :data:`WIDENS` (someone gets more power or less oversight),
    :data:`NARROWS` (the opposite) or :data:`REVIEW` (neither can be said: a
    changed ``when``, a new owner, a reordered escalation path).
    """

    action_class: str
    kind: str  # class_added, workloads_gained, targets_restricted, approval, when, ...
    before: Any
    after: Any
    effect: str

    @property
    def widens(self) -> bool:
        return self.effect == WIDENS

    def text(self) -> str:
        sign = _SIGNS[self.effect]
        what = self.kind.replace("_", " ")
        if self.effect == REVIEW:
            what += " (review)"
        if self.kind == "class_added":
            return f"{sign} {self.action_class}: new class, requestable by {', '.join(self.after)}"
        if self.kind == "class_removed":
            return f"{sign} {self.action_class}: class removed (was requestable by " \
                   f"{', '.join(self.before)})"
        if self.kind in _LIST_KINDS:
            items = self.after if self.kind.endswith(("gained", "added")) else self.before
            return f"{sign} {self.action_class}: {what}: {', '.join(items)}"
        if self.kind in ("capabilities_gained", "capabilities_lost"):
            return f"{sign} {self.action_class}: {what} on {self.before}: {', '.join(self.after)}"
        if self.kind == "escalation":
            return f"{sign} {self.action_class}: escalation path changed: " \
                   f"{' → '.join(self.before)}  ⇒  {' → '.join(self.after)}"
        return f"{sign} {self.action_class}: {what}: {self.before} → {self.after}"


_RISK = {"low": 0, "high": 1, "destructive": 2}


def _approval(c: ActionClass) -> str:
    a = c.approval
    if a is None:
        return "none"
    return f"jit({a.approvals_required} of {','.join(a.approvers)})"


def _more(x: float, y: float) -> str:
    """The effect of a limit going from ``x`` to ``y`` where more is looser."""
    return WIDENS if y > x else NARROWS


def _break_glass(c: ActionClass) -> BreakGlass | None:
    bg = c.approval.break_glass if c.approval is not None else None
    return bg if bg is not None and bg.allowed else None


def _approval_changes(name: str, a: ActionClass, b: ActionClass) -> list[Change]:
    out: list[Change] = []

    def add(kind: str, x: Any, y: Any, effect: str) -> None:
        if x != y:
            out.append(Change(action_class=name, kind=kind, before=x, after=y, effect=effect))

    if (a.approval is None) != (b.approval is None):
        add("approval", _approval(a), _approval(b), WIDENS if b.approval is None else NARROWS)
    elif a.approval is not None and b.approval is not None:
        x, y = a.approval, b.approval
        add("approvals_required", x.approvals_required, y.approvals_required,
            _more(y.approvals_required, x.approvals_required))
        gained = [g for g in y.approvers if g not in x.approvers]
        lost = [g for g in x.approvers if g not in y.approvers]
        if gained:  # more groups can approve: approval is easier to get
            out.append(Change(action_class=name, kind="approvers_gained", before=list(x.approvers),
                              after=gained, effect=WIDENS))
        if lost:
            out.append(Change(action_class=name, kind="approvers_lost", before=lost,
                              after=list(y.approvers), effect=NARROWS))
        add("approval_expires", f"{x.expires_seconds}s", f"{y.expires_seconds}s",
            _more(x.expires_seconds, y.expires_seconds))
        add("escalate_after", f"{x.escalate_after_seconds}s", f"{y.escalate_after_seconds}s",
            REVIEW)
    p, q = _break_glass(a), _break_glass(b)
    if (p is None) != (q is None):
        add("break_glass", "allowed" if p else "not allowed", "allowed" if q else "not allowed",
            WIDENS if q is not None else NARROWS)
    elif p is not None and q is not None:
        add("break_glass_max_ttl", f"{p.max_ttl_seconds}s", f"{q.max_ttl_seconds}s",
            _more(p.max_ttl_seconds, q.max_ttl_seconds))
        add("break_glass_limit", p.limit.text, q.limit.text,
            _more(p.limit.count / p.limit.window_seconds, q.limit.count / q.limit.window_seconds))
        add("break_glass_reviewers", ", ".join(p.reviewers), ", ".join(q.reviewers), REVIEW)
    return out


def _escalation_effect(a: tuple[str, ...], b: tuple[str, ...]) -> str:
    if set(b) < set(a) and [e for e in a if e in b] == list(b):
        return WIDENS  # people dropped from the path: less oversight
    if set(a) < set(b) and [e for e in b if e in a] == list(a):
        return NARROWS
    return REVIEW


def _policy_changes(name: str, a: ActionClass, b: ActionClass) -> list[Change]:
    """Paths added or removed, and capabilities gained or lost on a path both hold."""
    ap = {r.path: set(r.capabilities) for r in a.vault_policy}
    bp = {r.path: set(r.capabilities) for r in b.vault_policy}
    rule = {p: f"{p} [{','.join(sorted(c))}]" for p, c in (*ap.items(), *bp.items())}
    out = []
    added = sorted(rule[p] for p in bp.keys() - ap.keys())
    removed = sorted(f"{p} [{','.join(sorted(ap[p]))}]" for p in ap.keys() - bp.keys())
    if added:
        out.append(Change(action_class=name, kind="policy_rules_added",
                          before=sorted(rule[p] for p in ap), after=added, effect=WIDENS))
    if removed:
        out.append(Change(action_class=name, kind="policy_rules_removed", before=removed,
                          after=sorted(rule[p] for p in bp), effect=NARROWS))
    for path in sorted(ap.keys() & bp.keys()):
        if bp[path] - ap[path]:
            out.append(Change(action_class=name, kind="capabilities_gained", before=path,
                              after=sorted(bp[path] - ap[path]), effect=WIDENS))
        if ap[path] - bp[path]:
            out.append(Change(action_class=name, kind="capabilities_lost", before=path,
                              after=sorted(ap[path] - bp[path]), effect=NARROWS))
    return out


def _target_changes(name: str, a: ActionClass, b: ActionClass) -> list[Change]:
    """No ``targets`` means any target: adding the first pattern narrows, removing all widens."""
    at, bt = list(a.targets), list(b.targets)
    if set(at) == set(bt):
        return []
    if not at:
        return [Change(action_class=name, kind="targets_restricted", before="any target",
                       after=", ".join(bt), effect=NARROWS)]
    if not bt:
        return [Change(action_class=name, kind="targets_unrestricted", before=", ".join(at),
                       after="any target", effect=WIDENS)]
    out = []
    gained, lost = [t for t in bt if t not in at], [t for t in at if t not in bt]
    if gained:
        out.append(Change(action_class=name, kind="targets_gained", before=at, after=gained,
                          effect=WIDENS))
    if lost:
        out.append(Change(action_class=name, kind="targets_lost", before=lost, after=bt,
                          effect=NARROWS))
    return out


def diff_maps(old: ScopeMap, new: ScopeMap) -> list[Change]:
    """Every change from ``old`` to ``new``, each marked as widening, narrowing or for review.

    Widening: a new class, workloads added, fewer ``requires``, targets added or
    removed altogether (no ``targets`` is any target), a longer ``ttl`` or
    ``max_ttl``, a higher or removed budget, a removed ``when``, Vault paths or
    capabilities added, an environment more open (deny → approval → allow; a class
    without an ``environments:`` block counts as approval with a JIT rule, else allow),
    and looser approval (none instead of JIT, fewer approvals,
    more approver groups, a longer expiry, break-glass allowed, a longer
    break-glass TTL or a higher break-glass limit). The reverse of each narrows.
    A changed ``when``, owner, ``escalate_after`` or break-glass reviewers, and a
    reordered escalation path, are for review.
    """
    out: list[Change] = []
    for name in sorted(set(old.classes) | set(new.classes)):
        a, b = old.classes.get(name), new.classes.get(name)
        if a is None and b is not None:
            out.append(Change(action_class=name, kind="class_added", before=None,
                              after=[p.text for p in b.workloads], effect=WIDENS))
            continue
        if b is None and a is not None:
            out.append(Change(action_class=name, kind="class_removed",
                              before=[p.text for p in a.workloads], after=None, effect=NARROWS))
            continue
        assert a is not None and b is not None
        aw, bw = [p.text for p in a.workloads], [p.text for p in b.workloads]
        gained, lost = [w for w in bw if w not in aw], [w for w in aw if w not in bw]
        if gained:
            out.append(Change(action_class=name, kind="workloads_gained", before=aw,
                              after=gained, effect=WIDENS))
        if lost:
            out.append(Change(action_class=name, kind="workloads_lost", before=lost, after=bw,
                              effect=NARROWS))

        def scalar(kind: str, x: Any, y: Any, effect: str, name: str = name) -> None:
            if x != y:
                out.append(Change(action_class=name, kind=kind, before=x, after=y,
                                  effect=effect))

        scalar("risk", a.risk, b.risk, _more(_RISK[b.risk], _RISK[a.risk]))
        scalar("ttl", f"{a.ttl_seconds}s", f"{b.ttl_seconds}s",
               _more(a.ttl_seconds, b.ttl_seconds))
        scalar("max_ttl", f"{a.max_ttl_seconds}s", f"{b.max_ttl_seconds}s",
               _more(a.max_ttl_seconds, b.max_ttl_seconds))
        out.extend(_approval_changes(name, a, b))
        scalar("owner", f"{a.owner.team} <{a.owner.contact}>",
               f"{b.owner.team} <{b.owner.contact}>", REVIEW)
        if a.escalation != b.escalation:
            out.append(Change(action_class=name, kind="escalation", before=list(a.escalation),
                              after=list(b.escalation),
                              effect=_escalation_effect(a.escalation, b.escalation)))
        scalar("requires", ",".join(a.requires) or "nothing", ",".join(b.requires) or "nothing",
               NARROWS if set(a.requires) <= set(b.requires) else WIDENS)
        ab, bb = a.budget, b.budget
        scalar("limits", ab.text if ab else "none", bb.text if bb else "none",
               NARROWS if bb is not None and (ab is None or bb.count / bb.window_seconds
                                              <= ab.count / ab.window_seconds) else WIDENS)
        scalar("when", a.when.text if a.when else "none", b.when.text if b.when else "none",
               NARROWS if a.when is None else WIDENS if b.when is None else REVIEW)
        scalar("federated", a.federated, b.federated,
               _more(_FEDERATED[a.federated], _FEDERATED[b.federated]))
        for env in dict.fromkeys((*old.environments, *new.environments, *a.environments,
                                  *b.environments)):
            ma, mb = effective_environment_mode(a, env), effective_environment_mode(b, env)
            scalar(f"environment {env}", ma, mb, _more(_FEDERATED[ma], _FEDERATED[mb]))
        out.extend(_target_changes(name, a, b))
        out.extend(_policy_changes(name, a, b))
    return out


_FEDERATED = {"deny": 0, "approval": 1, "allow": 2}


def owning_team(scope_map: ScopeMap, action_class: str) -> str:
    """The team that owns ``action_class``: its owner team, which the parser holds equal
    to its file's ``metadata.team`` where the file names one; "" when the map has no such
    class."""
    cls = scope_map.classes.get(action_class)
    return cls.owner.team if cls is not None else ""


def review_teams(change: Change, old: ScopeMap, new: ScopeMap) -> tuple[str, ...]:
    """The teams that must review ``change``: the owner of the class's file before and
    after (both when a class moves between teams)."""
    teams = (owning_team(old, change.action_class), owning_team(new, change.action_class))
    return tuple(t for t in dict.fromkeys(teams) if t)


def codeowners(scope_map: ScopeMap, *, prefix: str = "", handle: str = "@{team}") -> str:
    """A CODEOWNERS file for the map's files: each file owned by its ``metadata.team``
    (files without one are listed commented out, to be given one)."""
    lines = ["# generated by `credbroker scope owners` from each file's metadata.team"]
    for source in scope_map.sources:
        path = prefix + PurePath(source).name if prefix else source
        team = scope_map.teams.get(source)
        lines.append(f"{path} {handle.format(team=team)}" if team
                     else f"# {path}: no metadata.team")
    return "\n".join(lines) + "\n"


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
