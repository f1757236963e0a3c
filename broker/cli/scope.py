"""``credbroker scope lint | explain | test | diff | replay``: tools for the people who write maps.

None of them needs a broker: they read files and run the same pure evaluation
the broker runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from broker.config import load_scope_map, process_env, vault_allowed_mounts_from
from broker.core.auditchain import FORMAT_NAMES, object_format
from broker.core.limits import limits_lines
from broker.core.models import CredentialRequest, InitiatingEvent, Outcome
from broker.core.records import decision_to_json, parse_decision_record, parse_time
from broker.core.scopemap import ScopeMap, evaluate
from broker.core.scopemap.tools import (
    CasesError,
    blast_radius,
    codeowners,
    diff_maps,
    effective_environment_mode,
    environment_lines,
    explain_lines,
    junit_xml,
    replay,
    review_teams,
    run_cases,
)
from broker.core.spiffeid import SpiffeId
from broker.errors import ConfigError, ScopeMapError
from broker.options import VAULT_ALLOWED_MOUNT, add_arguments


def _load(path: str, args: argparse.Namespace) -> ScopeMap:
    """Load a map under the same Vault mount allow-list the broker applies.

    Raises:
        ConfigError, ScopeMapError.
    """
    mounts = vault_allowed_mounts_from(env=process_env(), flags=args.vault_allowed_mount)
    return load_scope_map(Path(path), vault_allowed_mounts=mounts)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def cmd_lint(args: argparse.Namespace) -> int:
    try:
        m = _load(args.path, args)
    except ScopeMapError as exc:
        if args.json:
            _print_json({"ok": False, "problems": exc.problems})
        else:
            for p in exc.problems:
                print(p)
            print(f"\n{len(exc.problems)} problem(s); the map would be rejected.")
        return 1
    if args.json:
        _print_json({"ok": True, "version": m.version, "classes": list(m.classes),
                     "problems": [],
                     "limits": {n: limits_lines(c) for n, c in m.classes.items()
                                if limits_lines(c)},
                     **({"environments": {
                         "declared": list(m.environments),
                         "classes": {n: {e: effective_environment_mode(c, e)
                                         for e in m.environments}
                                     for n, c in m.classes.items()}}}
                        if m.environments else {})})
    else:
        envs = f", environments {', '.join(m.environments)}" if m.environments else ""
        print(f"OK: {len(m.classes)} action classes{envs}, version {m.version}")
        for cls in m.classes.values():
            for line in limits_lines(cls):
                print(f"  limit: {line}")
            if m.environments:
                print(f"  {cls.name}: " + ", ".join(
                    f"{e} {effective_environment_mode(cls, e)}" for e in m.environments))
    return 0


def _event(text: str | None) -> InitiatingEvent | None:
    if not text:
        return None
    source, sep, ident = text.partition(":")
    if not sep or not source or not ident:
        raise ConfigError(f"--event {text!r} must be SOURCE:ID, e.g. splunk:NOTABLE-4242")
    return InitiatingEvent(source=source, id=ident)


def cmd_explain(args: argparse.Namespace) -> int:
    """Raises: ConfigError for an --environment the map does not declare."""
    m = _load(args.path, args)
    sid = SpiffeId.parse(args.spiffe_id)
    now = parse_time(args.at) if args.at else datetime.now(UTC)
    env = args.environment or ""
    if env and env not in m.environments:
        raise ConfigError(f"--environment {env!r}: the scope map declares "
                          + (f"only {', '.join(m.environments)}" if m.environments
                             else "no environments"))
    req = CredentialRequest(action_class=args.action_class, target=args.target or "",
                            initiating_event=_event(args.event),
                            justification=args.justification or "", ttl_seconds=args.ttl or 0)
    local = args.trust_domain
    fed = sid.trust_domain if local and sid.trust_domain != local else ""
    # Without --environment, a map that declares environments is explained in each of them.
    envs = [env] if env else list(m.environments) or [""]
    decisions = [(e, evaluate(m, sid, replace(req, environment=e), now, federated_from=fed))
                 for e in envs]
    d = decisions[0][1]
    if args.json:
        cls = m.classes.get(req.action_class)
        out = {"spiffe_id": str(sid), **decision_to_json(d),
               "limits": limits_lines(cls) if cls else []}
        if envs != [""]:
            out = {"spiffe_id": str(sid), "environments": {
                e: decision_to_json(x) for e, x in decisions}, "limits": out["limits"]}
        _print_json(out)
    else:
        if len(decisions) > 1:
            print("per environment:")
            print("\n".join(environment_lines(decisions)))
        for i, (e, x) in enumerate(decisions):
            if i:
                print()
            print("\n".join(explain_lines(x, m, e)))
        if m.classes.get(req.action_class) and m.classes[req.action_class].budget:
            print("note:       budgets (limits) are not counted by explain; "
                  "`scope replay` counts them")
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    m = _load(args.path, args)
    try:
        text = Path(args.cases).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read test cases {args.cases}: {exc.strerror}") from None
    try:
        results = run_cases(m, text, args.cases, default_now=datetime.now(UTC))
    except CasesError as exc:
        raise ConfigError(str(exc)) from None
    failed = [r for r in results if not r.passed]
    if args.junit:
        report = junit_xml(results, suite=Path(args.cases).name, version=m.version)
        try:
            Path(args.junit).write_text(report)
        except OSError as exc:
            raise ConfigError(f"cannot write --junit {args.junit}: {exc.strerror}") from None
    if args.json:
        _print_json({"passed": len(results) - len(failed), "failed": len(failed),
                     "cases": [{"name": r.name, "passed": r.passed,
                                "mismatches": list(r.mismatches),
                                "decision": decision_to_json(r.decision)} for r in results]})
    else:
        for r in results:
            print(f"{'PASS' if r.passed else 'FAIL'}  {r.name}")
            for mm in r.mismatches:
                print(f"        {mm}")
            if not r.passed:
                print(f"        (decided by {r.decision.rule}: {r.decision.reasons[0]})")
        print(f"\nscope test: {len(results) - len(failed)} of {len(results)} cases pass "
              f"under {m.version[:19]}")
    return 1 if failed else 0


def cmd_diff(args: argparse.Namespace) -> int:
    old, new = _load(args.old, args), _load(args.new, args)
    changes = diff_maps(old, new)
    radius = blast_radius(changes, new, old)
    reviewers = sorted({t for c in changes for t in review_teams(c, old, new)})
    fail = (args.fail_on == "widen" and any(c.widens for c in changes)) or \
        (args.fail_on == "change" and bool(changes))
    if args.json:
        _print_json({"old_version": old.version, "new_version": new.version,
                     "changes": [{"action_class": c.action_class, "kind": c.kind,
                                  "before": c.before, "after": c.after, "widens": c.widens,
                                  "effect": c.effect,
                                  "review": list(review_teams(c, old, new))}
                                 for c in changes],
                     "blast_radius": radius,
                     "review_teams": reviewers})
        return 1 if fail else 0
    if not changes:
        print("no changes in what anyone may do")
        return 0
    print(f"{len(changes)} change(s) from {old.version[:19]} to {new.version[:19]} "
          "(+ widens power or loosens oversight, - narrows, ~ needs a reviewer's judgement):")
    for c in changes:
        teams = review_teams(c, old, new)
        print(f"  {c.text()}" + (f"  [review: {', '.join(teams)}]" if teams else ""))
    print("\nteams that must review: " + (", ".join(reviewers) or "none named"))
    print("\nblast radius by workload:")
    for who, what in radius.items():
        print(f"  {who}")
        for w in what:
            print(f"    {w}")
    if fail:
        widening = sum(c.widens for c in changes)
        print(f"\nscope diff: failing (--fail-on {args.fail_on}): "
              + (f"{widening} change(s) widen" if args.fail_on == "widen"
                 else f"{len(changes)} change(s)"), file=sys.stderr)
    return 1 if fail else 0


def cmd_owners(args: argparse.Namespace) -> int:
    m = _load(args.path, args)
    text = codeowners(m, prefix=args.prefix or "", handle=args.handle)
    if args.check:
        try:
            current = Path(args.check).read_text()
        except OSError as exc:
            print(f"cannot read {args.check}: {exc.strerror}", file=sys.stderr)
            return 1
        wanted = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
        have = {ln.split("#", 1)[0].strip() for ln in current.splitlines()}
        missing = [ln for ln in wanted if ln not in have]
        for ln in missing:
            print(f"{args.check} lacks: {ln}", file=sys.stderr)
        return 1 if missing else 0
    print(text, end="")
    return 0


def _records(path: str) -> list[Any]:
    out = []
    try:
        handle = sys.stdin if path == "-" else open(path)
    except OSError as exc:
        raise ConfigError(f"cannot read --audit {path}: {exc.strerror}") from None
    with handle:
        for n, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{n}: not JSON ({exc.msg})") from None
            if isinstance(obj, dict) and set(obj) == {"hash", "record"}:
                obj = obj["record"]  # a line of the audit log itself
            kind = object_format(obj)
            if kind != "jsonl":
                raise ConfigError(f"{path}:{n} is {FORMAT_NAMES[kind]}, not an audit record; "
                                  "--audit takes the audit log or its `credbroker audit export "
                                  "--format jsonl`")
            try:
                rec = parse_decision_record(obj, f"{path}:{n}")
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            if rec is not None:
                out.append(rec)
    return out


#: Outcomes from most to least restrictive: a change up this order widens.
_PERMISSIVENESS = {Outcome.DENY: 0, Outcome.NEEDS_APPROVAL: 1, Outcome.ALLOW: 2}


def cmd_replay(args: argparse.Namespace) -> int:
    m: ScopeMap = _load(args.path, args)
    result = replay(m, _records(args.audit))
    widened = [c for c in result.changed
               if _PERMISSIVENESS[c.new.outcome] > _PERMISSIVENESS[c.record.outcome]]
    fail = (args.fail_on == "change" and bool(result.changed)) or \
        (args.fail_on == "widen" and bool(widened))
    if result.total == 0:
        print(f"scope replay: {args.audit} holds no decision records; nothing was replayed",
              file=sys.stderr)
    if args.json:
        _print_json({"version": m.version, "replayed": result.total,
                     "changed": [{"time": c.record.time.isoformat(),
                                  "request_id": c.record.request_id,
                                  "spiffe_id": str(c.record.spiffe_id),
                                  "action_class": c.record.request.action_class,
                                  "target": c.record.request.target,
                                  "was": c.record.outcome.value,
                                  "would_be": c.new.outcome.value,
                                  "rule": c.new.rule, "reasons": list(c.new.reasons)}
                                 for c in result.changed]})
        return 1 if fail else 0
    for c in result.changed:
        r = c.record
        print(f"{r.time.isoformat()}  {r.request_id or '-'}  {r.spiffe_id}  "
              f"{r.request.action_class}{' on ' + r.request.target if r.request.target else ''}"
              f": {r.outcome.value} → {c.new.outcome.value}")
        print(f"    {c.new.reasons[0]}")
    print(f"\n{result.total} recorded request(s) replayed under {m.version[:19]}: "
          f"{len(result.changed)} would be decided differently"
          + (f", {len(widened)} more permissively" if widened else ""))
    if fail:
        print(f"scope replay: failing (--fail-on {args.fail_on})", file=sys.stderr)
    return 1 if fail else 0


def add_vault_allowed_mount(parser: argparse.ArgumentParser) -> None:
    """``--vault-allowed-mount``: the one allow-list that serve, vault sync and scope apply."""
    add_arguments(parser, (VAULT_ALLOWED_MOUNT,))


def add_parser(sub: Any) -> None:
    scope = sub.add_parser("scope", help="lint, explain, test, diff and replay scope maps")
    ssub = scope.add_subparsers(dest="scope_command", required=True, metavar="SUBCOMMAND")

    s = ssub.add_parser("lint", help="validate a map; every problem at once; exit 1 on any")
    s.add_argument("path", help="scope-map file or directory")
    s.add_argument("--json", action="store_true")
    add_vault_allowed_mount(s)
    s.set_defaults(func=cmd_lint)

    s = ssub.add_parser("explain", help="the decision for one request, and why")
    s.add_argument("path")
    s.add_argument("--spiffe-id", required=True)
    s.add_argument("--action-class", required=True)
    s.add_argument("--target")
    s.add_argument("--event", metavar="SOURCE:ID", help="the initiating event")
    s.add_argument("--justification")
    s.add_argument("--ttl", type=int, help="requested TTL in seconds")
    s.add_argument("--environment", metavar="NAME",
                   help="decide for this environment only (default: each environment the "
                        "map declares)")
    s.add_argument("--at", help="evaluate at this RFC 3339 time (default now)")
    s.add_argument("--trust-domain", metavar="TD",
                   help="the broker's own trust domain: a SPIFFE ID of another one is "
                        "decided as a federated caller (default: every ID is local)")
    s.add_argument("--json", action="store_true")
    add_vault_allowed_mount(s)
    s.set_defaults(func=cmd_explain)

    s = ssub.add_parser("test", help="run policy unit tests (cases YAML); exit 1 on a failure")
    s.add_argument("path")
    s.add_argument("cases", help="YAML with `cases:` (see README)")
    s.add_argument("--json", action="store_true")
    s.add_argument("--junit", metavar="FILE",
                   help="also write the results as JUnit XML (one testcase per case) for CI")
    add_vault_allowed_mount(s)
    s.set_defaults(func=cmd_test)

    s = ssub.add_parser("diff", help="blast radius of a change between two maps")
    s.add_argument("old")
    s.add_argument("new")
    s.add_argument("--json", action="store_true")
    s.add_argument("--fail-on", choices=("widen", "change"),
                   help="exit 1 when any change widens (or when anything changes): a CI gate")
    add_vault_allowed_mount(s)
    s.set_defaults(func=cmd_diff)

    s = ssub.add_parser("owners", help="CODEOWNERS lines from each file's metadata.team "
                                       "(or --check an existing CODEOWNERS file)")
    s.add_argument("path")
    s.add_argument("--prefix", help="the repository path of the map's directory, e.g. "
                                    "/policies/scope/ (default: the paths as given)")
    s.add_argument("--handle", default="@{team}",
                   help="how a team is written, e.g. @my-org/{team} (default @{team})")
    s.add_argument("--check", metavar="CODEOWNERS",
                   help="exit 1 unless this file has every generated line")
    add_vault_allowed_mount(s)
    s.set_defaults(func=cmd_owners)

    s = ssub.add_parser("replay", help="re-decide recorded requests under a candidate map")
    s.add_argument("path")
    s.add_argument("--audit", required=True,
                   help="the audit log, or its JSONL export (- for stdin)")
    s.add_argument("--json", action="store_true")
    s.add_argument("--fail-on", choices=("change", "widen"),
                   help="exit 1 when any outcome would change (or become more permissive: "
                        "deny → needs_approval → allow): a CI gate")
    add_vault_allowed_mount(s)
    s.set_defaults(func=cmd_replay)
