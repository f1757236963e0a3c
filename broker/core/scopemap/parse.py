"""Scope maps from text: YAML in, a :class:`ScopeMap` out, or every problem with file:line.

A scope map is YAML, ``apiVersion: credbroker/v1``, ``kind: ScopeMap``, whose
``action_classes`` say for each class who may request it, who owns it, who to
escalate to, and what credential to mint. Everything not explicitly allowed is
denied. See README "Writing scope maps" for the annotated format.

Nothing here does I/O: :func:`parse_scope_map` takes the documents' text (and
the names to report them under).
"""

from __future__ import annotations

import difflib
import hashlib
import re
from collections.abc import Sequence
from pathlib import PurePath

import yaml

from broker.core.conditions import Condition, ConditionError
from broker.core.models import Owner
from broker.core.scopemap.model import (
    DEFAULT_BREAK_GLASS_LIMIT,
    DEFAULT_VAULT_ALLOWED_MOUNTS,
    ENVIRONMENT_MODES,
    HARD_MAX_TTL_SECONDS,
    ActionClass,
    ApprovalRule,
    BreakGlass,
    Budget,
    PolicyRule,
    ScopeMap,
)
from broker.core.scopemap.schema import schema_problems
from broker.core.scopemap.vaultpaths import normalize_allowed_mounts, vault_path_problem
from broker.core.spiffeid import SpiffeIdPattern
from broker.errors import InvalidSpiffeIdError, ScopeMapError

_DURATION = re.compile(r"(\d+)(s|m|h)?")
_WINDOWS = {"m": 60, "h": 3600, "d": 86400}


def parse_budget(text: str) -> Budget | None:
    """``N/m``, ``N/h`` or ``N/d`` as a Budget; None when it is not one."""
    m = re.fullmatch(r"([1-9][0-9]*)/([mhd])", text.strip())
    if m is None:
        return None
    return Budget(count=int(m.group(1)), window_seconds=_WINDOWS[m.group(2)],
                  text=text.strip())


def parse_rate(text: str) -> Budget | None:
    """``N/<window>`` with a window of ``m``/``h``/``d`` or a duration (``5m``, ``90s``,
    ``2h``) as a Budget; None when it is not one (``limits.denials``)."""
    m = re.fullmatch(r"([1-9][0-9]*)/(?:([mhd])|([1-9][0-9]*)([smh]))", text.strip())
    if m is None:
        return None
    seconds = _WINDOWS[m.group(2)] if m.group(2) else \
        int(m.group(3)) * {"s": 1, "m": 60, "h": 3600}[m.group(4)]
    return Budget(count=int(m.group(1)), window_seconds=seconds, text=text.strip())


# --- parsing ------------------------------------------------------------------
#
# Two passes over each document. The JSON Schema (broker/schema/scope-map.schema.json,
# applied by :mod:`broker.core.scopemap.schema`) owns the structure: which keys exist,
# which are required, their types, enums and patterns. The code below owns only what a
# schema cannot say: durations within the hard maximum and ttl <= max_ttl, SPIFFE ID
# patterns, CEL conditions, Vault paths, cross-field rules (escalate before expiry,
# break-glass reviewers), keys given twice and classes defined twice. It reads values
# tolerantly and reports nothing about shape; a value of the wrong shape is the schema's
# to report, and the document does not load either way.


class _Problems:
    """Problems found so far, as (location, field path, what is wrong and what would be right)."""

    def __init__(self) -> None:
        self.found: list[tuple[str, str, str]] = []

    def add(self, where: str, field: str, what: str) -> None:
        self.found.append((where, field, what))

    def note(self, text: str) -> None:
        self.found.append((text, "", ""))

    def merge_schema(self, schema: list[tuple[str, str, str]], start: int) -> None:
        """Put the schema's findings first; drop our own about a field it already reported."""
        ours = self.found[start:]
        fields = [f for _, f, _ in schema]

        def covered(field: str) -> bool:
            return any(field == f or field.startswith((f + ".", f + "[")) for f in fields if f)

        self.found[start:] = schema + [p for p in ours if not p[1] or not covered(p[1])]

    @property
    def items(self) -> list[str]:
        return [w if not f else f"{w}: {f}: {x}" for w, f, x in self.found]


def _loc(source: str, node: yaml.Node) -> str:
    return f"{source}:{node.start_mark.line + 1}"


def _get(node: yaml.Node | None, key: str) -> yaml.Node | None:
    """The value under ``key`` when ``node`` is a mapping holding it; else None."""
    if not isinstance(node, yaml.MappingNode):
        return None
    for k, v in node.value:
        if isinstance(k, yaml.ScalarNode) and k.value == key:
            found: yaml.Node = v
            return found
    return None


def _scalar(node: yaml.Node | None) -> str | None:
    if isinstance(node, yaml.ScalarNode):
        return str(node.value)
    return None


def _strings(node: yaml.Node | None) -> list[tuple[str, yaml.Node]]:
    """The non-blank string items of a list (anything else is the schema's to report)."""
    if not isinstance(node, yaml.SequenceNode):
        return []
    return [(str(i.value), i) for i in node.value
            if isinstance(i, yaml.ScalarNode) and i.tag == "tag:yaml.org,2002:str"
            and str(i.value).strip()]


def _duplicate_keys(source: str, node: yaml.Node, path: str, problems: _Problems) -> None:
    """Report every key given twice in one mapping, anywhere in the document.

    The schema cannot: by the time a document is data, the second value has
    silently replaced the first.
    """
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _duplicate_keys(source, item, f"{path}[{i}]", problems)
    elif isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for k, v in node.value:
            key = str(k.value) if isinstance(k, yaml.ScalarNode) else "?"
            field = f"{path}.{key}" if path else key
            if key in seen:
                problems.add(_loc(source, k), field, "appears twice; keep one")
            seen.add(key)
            _duplicate_keys(source, v, field, problems)


def yaml_error_text(source: str, text: str, exc: yaml.YAMLError) -> str:
    """``file:line: what is wrong`` for a YAML error, saying so plainly when a tab caused it.

    PyYAML says "found character '\\t' that cannot start any token"; what the
    author needs to hear is that indentation must be spaces.
    """
    mark = getattr(exc, "problem_mark", None)
    if mark is None:
        return f"{source}: not valid YAML: {getattr(exc, 'problem', None) or exc}"
    lines = text.splitlines()
    line = lines[mark.line] if mark.line < len(lines) else ""
    indent = line[:len(line) - len(line.lstrip(" \t"))]
    if "\t" in indent or "'\\t'" in str(getattr(exc, "problem", "")):
        return (f"{source}:{mark.line + 1}: YAML does not allow tabs for indentation; "
                "use spaces")
    return f"{source}:{mark.line + 1}: not valid YAML: {getattr(exc, 'problem', None) or exc}"


def parse_duration(text: str) -> int:
    """``"90s"``, ``"5m"``, ``"1h"`` or a plain number of seconds → seconds.

    Raises:
        ValueError: not a duration of that form.
    """
    m = _DURATION.fullmatch(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a duration; write e.g. 90s, 5m or 1h")
    n = int(m.group(1))
    return n * {"s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]


def parse_scope_map(
    documents: Sequence[tuple[str, str]],
    *,
    vault_allowed_mounts: Sequence[str] = DEFAULT_VAULT_ALLOWED_MOUNTS,
) -> ScopeMap:
    """Parse and validate scope-map documents given as ``(source_name, text)``.

    Every problem in every document is collected before anything is raised, so
    a linter can show them all at once. Each names the file, line and field path.
    ``vault_allowed_mounts`` is the operator's allow-list: every ``vault_policy``
    path must lie under one of them (see :func:`vault_path_problem`).

    Raises:
        ScopeMapError: the documents do not form a valid scope map.
        ValueError: ``vault_allowed_mounts`` is not a valid allow-list (a
            configuration error: see :func:`normalize_allowed_mounts`).
    """
    mounts = normalize_allowed_mounts(vault_allowed_mounts)
    problems = _Problems()
    classes: dict[str, ActionClass] = {}
    teams: dict[str, str] = {}
    declared: list[str] = []  # environments, in order of first declaration
    env_refs: list[tuple[str, str, str]] = []  # (where, field, name) of class blocks
    if not documents:
        raise ScopeMapError(["no scope-map documents were given (a file or a directory of *.yaml)"])
    digest = hashlib.sha256()
    for source, text in sorted(documents):
        # The version is a content hash: file *names* count (a class may move between
        # files), but not where the files happen to live on disk.
        digest.update(PurePath(source).name.encode() + b"\0" + text.encode() + b"\0")
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError as exc:
            problems.note(yaml_error_text(source, text, exc))
            continue
        if not isinstance(root, yaml.MappingNode):
            problems.note(f"{source}:1: the document must be a mapping with apiVersion, "
                          "kind and action_classes")
            continue
        start = len(problems.found)
        _duplicate_keys(source, root, "", problems)
        _parse_document(source, root, classes, problems, mounts, teams, declared, env_refs)
        problems.merge_schema(schema_problems(source, root), start)
    for where, field, name in env_refs:  # every document's declarations count
        if name not in declared:
            problems.add(where, field, _unknown_environment(name, declared))
    if not classes and not problems.found:
        problems.note("the scope map defines no action classes; everything would be denied")
    if problems.items:
        raise ScopeMapError(problems.items)
    return ScopeMap(
        version="sha256:" + digest.hexdigest(),
        classes=dict(sorted(classes.items())),
        sources=tuple(s for s, _ in sorted(documents)),
        teams=dict(sorted(teams.items())),
        environments=tuple(declared),
    )


def _unknown_environment(name: str, declared: Sequence[str]) -> str:
    if not declared:
        return (f"names environment {name!r}, but the scope map declares no environments: "
                f"add `environments: [{name}]` at the top of a scope-map document (and declare "
                "it in the broker's config, --environment)")
    close = difflib.get_close_matches(name, declared, n=1)
    return (f"{name!r} is not an environment the scope map declares ("
            f"{', '.join(declared)})" + (f"; did you mean {close[0]!r}?" if close else
                                         "; declare it in `environments:` or fix the name"))


def _parse_document(
    source: str, root: yaml.MappingNode, classes: dict[str, ActionClass], problems: _Problems,
    mounts: tuple[str, ...], teams: dict[str, str], declared: list[str] | None = None,
    env_refs: list[tuple[str, str, str]] | None = None,
) -> None:
    declared = [] if declared is None else declared
    for env, _ in _strings(_get(root, "environments")):
        if env not in declared:
            declared.append(env)
    ac = _get(root, "action_classes")
    owning_team = (_scalar(_get(_get(root, "metadata"), "team")) or "").strip()
    if owning_team:
        teams[source] = owning_team
    if not isinstance(ac, yaml.MappingNode):
        return
    for k, v in ac.value:
        name = str(k.value)
        path = f"action_classes.{name}"
        if name in classes:
            problems.add(_loc(source, k), path,
                         f"is defined twice (first at {classes[name].source}); keep one")
            continue
        cls = _parse_class(source, name, path, k, v, problems, mounts, owning_team,
                           env_refs)
        if cls is not None:
            classes[name] = cls


def _parse_class(
    source: str, name: str, path: str, key: yaml.Node, node: yaml.Node, problems: _Problems,
    mounts: tuple[str, ...], owning_team: str = "",
    env_refs: list[tuple[str, str, str]] | None = None,
) -> ActionClass | None:
    before = len(problems.found)
    risk = _scalar(_get(node, "risk"))
    team = _scalar(_get(_get(node, "owner"), "team"))
    contact = _scalar(_get(_get(node, "owner"), "contact"))

    workloads: list[SpiffeIdPattern] = []
    for text, item in _strings(_get(node, "workloads")):
        try:
            workloads.append(SpiffeIdPattern.parse(text))
        except InvalidSpiffeIdError as exc:
            problems.add(_loc(source, item), f"{path}.workloads", str(exc))

    ttl, max_ttl, rules = _parse_credential(source, path, _get(node, "credential"), problems,
                                            mounts)
    requires_default = ("initiating_event",) if risk in ("high", "destructive") else ()
    requires = tuple(dict.fromkeys(
        (*requires_default, *(r for r, _ in _strings(_get(node, "requires"))))))
    approval = _parse_approval(source, path, _get(node, "approval"), problems)
    limits = _get(node, "limits")
    budget = parse_budget(_scalar(_get(limits, "per_workload")) or "")
    # Shapes (the enum, the rate's pattern) are the schema's; what it cannot say is here.
    on_exceed = _scalar(_get(limits, "on_exceed")) or "deny"
    if on_exceed == "freeze" and budget is None:
        problems.add(_loc(source, limits or node), f"{path}.limits.on_exceed",
                     "freeze needs a budget to exceed: add per_workload, e.g. 5/h")
    denial_trip = parse_rate(_scalar(_get(limits, "denials")) or "")
    when = None
    when_node = _get(node, "when")
    when_text = _scalar(when_node)
    if when_node is not None and when_text:
        try:
            when = Condition.compile(when_text)
        except ConditionError as exc:
            for p in exc.problems:
                problems.add(_loc(source, when_node), f"{path}.when", p)

    federated = _scalar(_get(node, "federated")) or "deny"
    federated_approval = None
    fa_node = _get(node, "federated_approvers")
    if fa_node is not None:
        federated_approval = ApprovalRule(
            approvers=tuple(a for a, _ in _strings(fa_node)), approvals_required=1,
            escalate_after_seconds=15 * 60, expires_seconds=60 * 60, break_glass=None)
    if federated == "approval" and approval is None and federated_approval is None:
        problems.add(_loc(source, _get(node, "federated") or node), f"{path}.federated",
                     "approval needs approvers: give the class a JIT approval rule "
                     "(approval: {mode: jit, ...}) or federated_approvers: [GROUP]")
    if fa_node is not None and federated != "approval":
        problems.add(_loc(source, fa_node), f"{path}.federated_approvers",
                     f"is only used with federated: approval (this class has federated: "
                     f"{federated})")
    environments: dict[str, str] = {}
    env_node = _get(node, "environments")
    if isinstance(env_node, yaml.MappingNode):
        for k, v in env_node.value:
            env, mode = str(k.value), _scalar(v)
            if mode in ENVIRONMENT_MODES:  # anything else is the schema's to report
                environments[env] = str(mode)
            if env_refs is not None:
                env_refs.append((_loc(source, k), f"{path}.environments.{env}", env))
    if "approval" in environments.values() and approval is None:
        problems.add(_loc(source, env_node or node), f"{path}.environments",
                     "approval needs approvers: give the class a JIT approval rule "
                     "(approval: {mode: jit, approvers: [GROUP]}); `allow` waives it in the "
                     "environments that say so")
    if owning_team and team and team != owning_team:
        problems.add(_loc(source, _get(_get(node, "owner"), "team") or key),
                     f"{path}.owner.team",
                     f"is {team!r}, but this file belongs to team {owning_team!r} "
                     "(metadata.team): a file may define only its own team's classes; move "
                     "the class to that team's file")

    if len(problems.found) != before or not team or not contact:
        return None
    return ActionClass(
        name=name, description=_scalar(_get(node, "description")) or "", risk=str(risk),
        owner=Owner(team=team, contact=contact),
        escalation=tuple(e for e, _ in _strings(_get(node, "escalation"))),
        workloads=tuple(workloads), ttl_seconds=ttl, max_ttl_seconds=max_ttl,
        vault_policy=tuple(rules), requires=requires, source=_loc(source, key),
        approval=approval, targets=tuple(t for t, _ in _strings(_get(node, "targets"))),
        budget=budget, when=when, on_exceed=on_exceed, denial_trip=denial_trip,
        federated=federated, federated_approval=federated_approval,
        environments=environments,
    )


def _seconds(node: yaml.Node | None, default: int) -> int:
    """A duration's seconds; ``default`` when absent or malformed (the schema reports that)."""
    try:
        return parse_duration(_scalar(node) or "") if node is not None else default
    except ValueError:
        return default


def _parse_approval(
    source: str, path: str, node: yaml.Node | None, problems: _Problems
) -> ApprovalRule | None:
    if _scalar(_get(node, "mode")) != "jit" or node is None:
        return None  # approval: none (or malformed, which the schema reports)
    apath = f"{path}.approval"
    required_n = _scalar(_get(node, "approvals_required")) or "1"
    count = int(required_n) if required_n.isdigit() and int(required_n) > 0 else 1
    escalate = _seconds(_get(node, "escalate_after"), 15 * 60)
    expires = _seconds(_get(node, "expires"), 60 * 60)
    if escalate >= expires:
        problems.add(_loc(source, node), f"{apath}.escalate_after",
                     f"({escalate}s) must be shorter than expires ({expires}s), or nobody is "
                     "escalated to before the request is auto-denied")
    bg = None
    bg_node = _get(node, "break_glass")
    if isinstance(bg_node, yaml.MappingNode):
        allowed = _scalar(_get(bg_node, "allowed")) in ("true", "True", "yes")
        reviewers = tuple(r for r, _ in _strings(_get(bg_node, "reviewers")))
        if allowed and _get(bg_node, "reviewers") is None:
            problems.add(_loc(source, bg_node), f"{apath}.break_glass.reviewers",
                         "is required when break-glass is allowed: the reviewer groups who "
                         "sign off each use")
        bg = BreakGlass(allowed=allowed, max_ttl_seconds=_seconds(_get(bg_node, "max_ttl"), 120),
                        reviewers=reviewers,
                        limit=parse_budget(_scalar(_get(bg_node, "limit")) or "")
                        or DEFAULT_BREAK_GLASS_LIMIT)
    return ApprovalRule(approvers=tuple(a for a, _ in _strings(_get(node, "approvers"))),
                        approvals_required=count, escalate_after_seconds=escalate,
                        expires_seconds=expires, break_glass=bg)


def _parse_credential(
    source: str, path: str, cred: yaml.Node | None, problems: _Problems,
    mounts: tuple[str, ...],
) -> tuple[int, int, list[PolicyRule]]:
    cpath = f"{path}.credential"

    def duration(key: str) -> int:
        n = _get(cred, key)
        text = _scalar(n)
        if n is None or text is None:
            return 0
        try:
            secs = parse_duration(text)
        except ValueError:
            return 0
        if secs <= 0:
            problems.add(_loc(source, n), f"{cpath}.{key}", "must be more than zero")
        if secs > HARD_MAX_TTL_SECONDS:
            problems.add(_loc(source, n), f"{cpath}.{key}",
                         f"is {text}; credentials are minutes-long, at most "
                         f"{HARD_MAX_TTL_SECONDS // 60}m")
        return secs

    ttl = duration("ttl")
    max_ttl = duration("max_ttl")
    ttl_node = _get(cred, "ttl")
    if ttl and max_ttl and ttl > max_ttl and ttl_node is not None:
        problems.add(_loc(source, ttl_node), f"{cpath}.ttl",
                     f"({ttl}s) is above max_ttl ({max_ttl}s); lower ttl or raise max_ttl")

    rules: list[PolicyRule] = []
    vp = _get(cred, "vault_policy")
    for i, item in enumerate(vp.value if isinstance(vp, yaml.SequenceNode) else []):
        path_node = _get(item, "path")
        vpath = _scalar(path_node)
        caps = [c for c, _ in _strings(_get(item, "capabilities"))]
        if path_node is None or not vpath:
            continue
        unsafe = vault_path_problem(vpath, mounts)
        if unsafe:
            problems.add(_loc(source, path_node), f"{cpath}.vault_policy[{i}].path", unsafe)
        elif caps:
            rules.append(PolicyRule(path=vpath, capabilities=tuple(dict.fromkeys(caps))))
    return ttl, max_ttl, rules
