"""Scope maps: parse (text in) and evaluate (values and time in, a Decision out).

A scope map is YAML, ``apiVersion: credbroker/v1``, ``kind: ScopeMap``, whose
``action_classes`` say for each class who may request it, who owns it, who to
escalate to, and what credential to mint. Everything not explicitly allowed is
denied. See README "Writing scope maps" for the annotated format.

Nothing here does I/O: :func:`parse_scope_map` takes the documents' text (and
the names to report them under), :func:`evaluate` takes the identity, the
request and the current time.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import PurePath

import yaml

from broker.core.conditions import Condition, ConditionError
from broker.core.models import (
    CredentialRequest,
    Decision,
    DenyCode,
    Outcome,
    Owner,
)
from broker.core.revocation import Freeze, first_freeze
from broker.core.schema import schema_problems
from broker.core.spiffeid import SpiffeId, SpiffeIdPattern
from broker.errors import InvalidSpiffeIdError, ScopeMapError

API_VERSION = "credbroker/v1"
KIND = "ScopeMap"
#: Credentials are minutes-long: no class may allow more than this.
HARD_MAX_TTL_SECONDS = 3600
#: Capabilities a class may grant. ``sudo``/``root``-like powers are never handed to agents.
ALLOWED_CAPABILITIES = frozenset({"create", "read", "update", "patch", "delete", "list"})
RISKS = ("low", "high", "destructive")
REQUIRABLE_FIELDS = ("initiating_event", "target", "justification")
_CLASS_NAME = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*")
_VAULT_PATH = re.compile(r"[A-Za-z0-9_./+*{}-]+")
_MOUNT = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*/?")
#: Vault's control plane. No class may hold a path that could match anything under
#: these, and no allow-list can admit them. Each names what a credential there could do.
RESERVED_MOUNTS: Mapping[str, str] = {
    "sys/": "policies, mounts, audit devices",
    "auth/": "token roles, token creation",
    "identity/": "entities, the kill switch",
}
#: Where the broker keeps each class's own Vault objects (``<prefix><class>``).
MANAGED_PREFIXES = ("sys/policies/acl/credbroker-", "sys/policy/credbroker-",
                    "auth/token/roles/credbroker-", "auth/token/create/credbroker-")
#: The mounts a class's vault_policy may reach when the operator names none:
#: the KV v2 mount that ``bao server -dev`` (and so ``credbroker dev``) provides.
DEFAULT_VAULT_ALLOWED_MOUNTS = ("secret/",)
_DURATION = re.compile(r"(\d+)(s|m|h)?")

_TOP_KEYS = {"apiVersion", "kind", "metadata", "action_classes"}
_CLASS_KEYS = {
    "description", "risk", "owner", "escalation", "workloads", "credential", "approval",
    "requires", "targets", "limits", "when",
}
_WINDOWS = {"m": 60, "h": 3600, "d": 86400}
_CRED_KEYS = {"ttl", "max_ttl", "vault_policy"}
_RULE_KEYS = {"path", "capabilities"}
_OWNER_KEYS = {"team", "contact"}


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyRule:
    path: str
    capabilities: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Budget:
    """``limits.per_workload``: at most ``count`` credentials per ``window_seconds``."""

    count: int
    window_seconds: int
    text: str


DEFAULT_BREAK_GLASS_LIMIT = Budget(count=1, window_seconds=3600, text="1/h")


def parse_budget(text: str) -> Budget | None:
    """``N/m``, ``N/h`` or ``N/d`` as a Budget; None when it is not one."""
    m = re.fullmatch(r"([1-9][0-9]*)/([mhd])", text.strip())
    if m is None:
        return None
    return Budget(count=int(m.group(1)), window_seconds=_WINDOWS[m.group(2)],
                  text=text.strip())


#: What ``limits.on_exceed`` may say: refuse the request (429), or also freeze the identity.
ON_EXCEED = ("deny", "freeze")


def parse_rate(text: str) -> Budget | None:
    """``N/<window>`` with a window of ``m``/``h``/``d`` or a duration (``5m``, ``90s``,
    ``2h``) as a Budget; None when it is not one (``limits.denials``)."""
    m = re.fullmatch(r"([1-9][0-9]*)/(?:([mhd])|([1-9][0-9]*)([smh]))", text.strip())
    if m is None:
        return None
    seconds = _WINDOWS[m.group(2)] if m.group(2) else \
        int(m.group(3)) * {"s": 1, "m": 60, "h": 3600}[m.group(4)]
    return Budget(count=int(m.group(1)), window_seconds=seconds,
                  text=text.strip())


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakGlass:
    allowed: bool
    max_ttl_seconds: int
    reviewers: tuple[str, ...]
    #: At most this many break-glass uses per identity per window (``break_glass.limit``):
    #: an emergency path that is used on every request is no longer an emergency path.
    limit: Budget = DEFAULT_BREAK_GLASS_LIMIT


@dataclass(frozen=True, slots=True, kw_only=True)
class ApprovalRule:
    """``approval: {mode: jit, ...}``: a person must approve each request."""

    approvers: tuple[str, ...]  # approver groups
    approvals_required: int
    escalate_after_seconds: int
    expires_seconds: int
    break_glass: BreakGlass | None




@dataclass(frozen=True, slots=True, kw_only=True)
class ActionClass:
    name: str
    description: str
    risk: str
    owner: Owner
    escalation: tuple[str, ...]
    workloads: tuple[SpiffeIdPattern, ...]
    ttl_seconds: int
    max_ttl_seconds: int
    vault_policy: tuple[PolicyRule, ...]
    requires: tuple[str, ...]
    source: str  # "file:line"
    approval: ApprovalRule | None = None  # None: approval: none
    targets: tuple[str, ...] = ()
    budget: Budget | None = None
    when: Condition | None = None
    #: ``limits.on_exceed``: what a spent budget does besides refusing ("deny" or "freeze").
    on_exceed: str = "deny"
    #: ``limits.denials``: this many denials of one identity for this class within the
    #: window freeze that identity.
    denial_trip: Budget | None = None

    @property
    def vault_policy_name(self) -> str:
        """The Vault policy (and token role) name this class is minted under."""
        return f"credbroker-{self.name}"

    def vault_policy_hcl(self) -> str:
        """The class's Vault policy document (HCL)."""
        blocks = []
        for rule in self.vault_policy:
            caps = ", ".join(f'"{c}"' for c in rule.capabilities)
            blocks.append(f'path "{rule.path}" {{\n  capabilities = [{caps}]\n}}\n')
        return f"# managed by credbroker: action class {self.name}\n" + "".join(blocks)


@dataclass(frozen=True, slots=True, kw_only=True)
class ScopeMap:
    version: str  # "sha256:<hex>" over the documents' bytes
    classes: Mapping[str, ActionClass]
    sources: tuple[str, ...]


# --- Vault paths: what a policy path could reach -------------------------------

#: A Vault ACL path as tokens: a literal character, ``_SEGMENT`` (``+``: any one
#: segment) or ``_ANY`` (a trailing ``*``, or a ``{{template}}``: anything at all).
#: The two cannot be confused with literal characters: a ``+`` inside a segment and
#: a ``*`` before the end are refused.
_SEGMENT = "+"
_ANY = "*"


def normalize_allowed_mounts(mounts: Iterable[str]) -> tuple[str, ...]:
    """The operator's allow-list of Vault mounts as ``("secret/", "kv/soc/")``.

    Raises:
        ValueError: an entry is not a plain mount path (no globs, no leading '/'),
            or names Vault's control plane (``sys``, ``auth``, ``identity``),
            or the list is empty.
    """
    out: list[str] = []
    for raw in mounts:
        m = raw.strip()
        if not _MOUNT.fullmatch(m) or any(seg in (".", "..") for seg in m.split("/")):
            raise ValueError(f"Vault mount {raw!r} is not a mount path; write e.g. secret or "
                             "kv/soc (no globs, no leading '/')")
        m = m.rstrip("/") + "/"
        if any(m.startswith(r) or r.startswith(m) for r in RESERVED_MOUNTS):
            raise ValueError(f"Vault mount {raw!r} is Vault's control plane "
                             f"({', '.join(RESERVED_MOUNTS)}); it can never be allowed")
        out.append(m)
    if not out:
        raise ValueError("the allowed Vault mounts are empty; name at least one, e.g. secret")
    return tuple(dict.fromkeys(out))


def _path_tokens(path: str) -> tuple[list[str], str]:
    """Tokenize a Vault ACL path; the second value says what is wrong with it ("" if fine)."""
    tokens: list[str] = []
    segments = path.split("/")
    for n, seg in enumerate(segments):
        if n:
            tokens.append("/")
        if seg in (".", ".."):
            return tokens, "'.' and '..' segments are not allowed"
        if not seg and 0 < n < len(segments) - 1:
            return tokens, "empty segments ('//') are not allowed"
        if seg == _SEGMENT:
            tokens.append(_SEGMENT)
            continue
        if _SEGMENT in seg:
            return tokens, "'+' matches one whole segment: write it alone between '/'"
        for i, ch in enumerate(seg):
            if ch in "{}":
                tokens.append(_ANY)  # a template can expand to anything, '/' included
                return tokens, ""
            if ch == "*":
                if n != len(segments) - 1 or i != len(seg) - 1:
                    return tokens, "'*' is a glob only as the last character of a path"
                tokens.append(_ANY)
                return tokens, ""
            tokens.append(ch)
    return tokens, ""


def _could_start_with(tokens: Sequence[str], prefix: str) -> bool:
    """True when some path the tokens match begins with ``prefix``."""
    seen: set[tuple[int, int]] = set()

    def walk(i: int, j: int) -> bool:
        if j == len(prefix):
            return True
        if i == len(tokens) or (i, j) in seen:
            return False
        seen.add((i, j))
        tok = tokens[i]
        if tok == _ANY:
            return True
        if tok == _SEGMENT:  # any run of non-'/' characters (possibly empty)
            k = j
            while True:
                if walk(i + 1, k):
                    return True
                if k == len(prefix) or prefix[k] == "/":
                    return False
                k += 1
        return tok == prefix[j] and walk(i + 1, j + 1)

    return walk(0, 0)


def vault_path_problem(path: str, allowed_mounts: Sequence[str]) -> str:
    """What is wrong with ``path`` as a class's Vault policy path, or "" when it is safe.

    Judged by every path it could match (``*`` as a trailing prefix glob, ``+``
    as any one segment, a ``{{template}}`` as anything): it must not be able to
    reach Vault's control plane (:data:`RESERVED_MOUNTS`, which holds every
    class's managed policy and token role), and everything it matches must lie
    under one of ``allowed_mounts`` (normalized, see :func:`normalize_allowed_mounts`).
    """
    tokens, syntax = _path_tokens(path)
    example = f"e.g. {allowed_mounts[0]}data/<team>/*"
    if syntax:
        return f"{path!r}: {syntax}; {example}"
    reached = [r for r in RESERVED_MOUNTS if _could_start_with(tokens, r)]
    if reached:
        managed = any(_could_start_with(tokens, p) for p in MANAGED_PREFIXES)
        what = ", ".join(f"{r} ({RESERVED_MOUNTS[r]})" for r in reached)
        return (f"{path!r} could reach Vault's control plane: {what}"
                + (", including other classes' credbroker-* policies and token roles"
                   if managed else "")
                + f"; write a path under an allowed mount ({', '.join(allowed_mounts)}), "
                + example)
    # Everything the path matches begins with its characters before the first wildcard,
    # and nothing more is certain: that literal prefix must lie under an allowed mount.
    first_wild = next((i for i, t in enumerate(tokens) if t in (_SEGMENT, _ANY)), len(tokens))
    literal = "".join(tokens[:first_wild])
    if not any(literal.startswith(m) for m in allowed_mounts):
        wild = first_wild < len(tokens)
        return (f"{path!r} " + ("could match paths outside" if wild else "is outside")
                + f" the allowed Vault mounts ({', '.join(allowed_mounts)}); start it with one "
                f"of them, {example}, or have the operator allow the mount "
                "(--vault-allowed-mount)")
    return ""


# --- parsing ------------------------------------------------------------------


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


def _get(node: yaml.MappingNode, key: str) -> yaml.Node | None:
    for k, v in node.value:
        if isinstance(k, yaml.ScalarNode) and k.value == key:
            found: yaml.Node = v
            return found
    return None


def _check_keys(
    node: yaml.MappingNode, allowed: set[str], source: str, path: str, problems: _Problems
) -> None:
    seen: set[str] = set()
    for k, _v in node.value:
        key = k.value if isinstance(k, yaml.ScalarNode) else "?"
        field = f"{path}.{key}" if path else key
        if key in seen:
            problems.add(_loc(source, k), field, "appears twice; keep one")
        seen.add(key)
        if key not in allowed:
            problems.add(
                _loc(source, k),
                field,
                f"unknown field; expected one of: {', '.join(sorted(allowed))}",
            )


def _scalar(node: yaml.Node | None) -> str | None:
    if isinstance(node, yaml.ScalarNode):
        return str(node.value)
    return None


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
        _parse_document(source, root, classes, problems, mounts)
        problems.merge_schema(schema_problems(source, root), start)
    if not classes and not problems.found:
        problems.note("the scope map defines no action classes; everything would be denied")
    if problems.items:
        raise ScopeMapError(problems.items)
    return ScopeMap(
        version="sha256:" + digest.hexdigest(),
        classes=dict(sorted(classes.items())),
        sources=tuple(s for s, _ in sorted(documents)),
    )


def _parse_document(
    source: str, root: yaml.MappingNode, classes: dict[str, ActionClass], problems: _Problems,
    mounts: tuple[str, ...],
) -> None:
    _check_keys(root, _TOP_KEYS, source, "", problems)
    api = _scalar(_get(root, "apiVersion"))
    if api != API_VERSION:
        problems.add(_loc(source, _get(root, "apiVersion") or root), "apiVersion",
                     f"is {api!r}; expected {API_VERSION!r}")
    kind = _scalar(_get(root, "kind"))
    if kind != KIND:
        problems.add(_loc(source, _get(root, "kind") or root), "kind",
                     f"is {kind!r}; expected {KIND!r}")
    ac = _get(root, "action_classes")
    if ac is None:
        problems.add(_loc(source, root), "action_classes", "is missing; define at least one class")
        return
    if not isinstance(ac, yaml.MappingNode):
        problems.add(_loc(source, ac), "action_classes", "must be a mapping of class name → class")
        return
    for k, v in ac.value:
        name = str(k.value)
        path = f"action_classes.{name}"
        if not _CLASS_NAME.fullmatch(name):
            problems.add(_loc(source, k), path,
                         "class names are lower-case words joined by '.', e.g. "
                         "containment.isolate_host")
            continue
        if name in classes:
            problems.add(_loc(source, k), path,
                         f"is defined twice (first at {classes[name].source}); keep one")
            continue
        cls = _parse_class(source, name, path, k, v, problems, mounts)
        if cls is not None:
            classes[name] = cls


def _parse_class(
    source: str, name: str, path: str, key: yaml.Node, node: yaml.Node, problems: _Problems,
    mounts: tuple[str, ...],
) -> ActionClass | None:
    before = len(problems.found)
    if not isinstance(node, yaml.MappingNode):
        problems.add(_loc(source, node), path, "must be a mapping")
        return None
    _check_keys(node, _CLASS_KEYS, source, path, problems)

    risk = _scalar(_get(node, "risk"))
    if risk not in RISKS:
        problems.add(_loc(source, _get(node, "risk") or node), f"{path}.risk",
                     f"is {risk!r}; expected one of {', '.join(RISKS)}")

    owner = _parse_owner(source, path, node, problems)
    escalation = _string_list(source, f"{path}.escalation", _get(node, "escalation"), node,
                              problems, required=True, what="roles or contacts, in order")

    workloads: list[SpiffeIdPattern] = []
    wl_node = _get(node, "workloads")
    for text, item in _string_items(source, f"{path}.workloads", wl_node, node, problems,
                                    what="SPIFFE IDs or patterns"):
        try:
            workloads.append(SpiffeIdPattern.parse(text))
        except InvalidSpiffeIdError as exc:
            problems.add(_loc(source, item), f"{path}.workloads", str(exc))

    ttl, max_ttl, rules = _parse_credential(source, path, node, problems, mounts)

    requires_default = ("initiating_event",) if risk in ("high", "destructive") else ()
    req_node = _get(node, "requires")
    requires: tuple[str, ...] = requires_default
    if req_node is not None:
        req = _string_list(source, f"{path}.requires", req_node, node, problems, required=False,
                           what=f"field names from {', '.join(REQUIRABLE_FIELDS)}")
        for r in req:
            if r not in REQUIRABLE_FIELDS:
                problems.add(_loc(source, req_node), f"{path}.requires",
                             f"{r!r} is not a request field; expected "
                             f"{', '.join(REQUIRABLE_FIELDS)}")
        requires = tuple(dict.fromkeys((*requires_default, *req)))

    approval = _parse_approval(source, path, _get(node, "approval"), problems)
    targets = _string_list(source, f"{path}.targets", _get(node, "targets"), node, problems,
                           required=False, what="target patterns")
    budget = None
    limits = _get(node, "limits")
    per = _scalar(_get(limits, "per_workload")) if isinstance(limits, yaml.MappingNode) else None
    if per is not None:
        budget = parse_budget(per)
        if budget is None:
            problems.add(_loc(source, limits or node), f"{path}.limits.per_workload",
                         f"{per!r} is not a budget; write N/m, N/h or N/d, e.g. 5/h")
    on_exceed = _scalar(_get(limits, "on_exceed")) if isinstance(limits, yaml.MappingNode) \
        else None
    if on_exceed is not None and on_exceed not in ON_EXCEED:
        problems.add(_loc(source, limits or node), f"{path}.limits.on_exceed",
                     f"is {on_exceed!r}; expected one of {', '.join(ON_EXCEED)}")
    elif on_exceed == "freeze" and per is None:
        problems.add(_loc(source, limits or node), f"{path}.limits.on_exceed",
                     "freeze needs a budget to exceed: add per_workload, e.g. 5/h")
    denials = _scalar(_get(limits, "denials")) if isinstance(limits, yaml.MappingNode) \
        else None
    denial_trip = None
    if denials is not None:
        denial_trip = parse_rate(denials)
        if denial_trip is None:
            problems.add(_loc(source, limits or node), f"{path}.limits.denials",
                         f"{denials!r} is not a rate; write N/<window>, e.g. 10/5m or 20/h")
    when = None
    when_node = _get(node, "when")
    if when_node is not None:
        try:
            when = Condition.compile(_scalar(when_node) or "")
        except ConditionError as exc:
            for p in exc.problems:
                problems.add(_loc(source, when_node), f"{path}.when", p)

    description = _scalar(_get(node, "description")) or ""
    if len(problems.found) != before or owner is None:
        return None
    return ActionClass(
        name=name, description=description, risk=str(risk), owner=owner,
        escalation=tuple(escalation), workloads=tuple(workloads), ttl_seconds=ttl,
        max_ttl_seconds=max_ttl, vault_policy=tuple(rules), requires=requires,
        source=_loc(source, key), approval=approval, targets=tuple(targets), budget=budget,
        when=when, on_exceed=on_exceed or "deny", denial_trip=denial_trip,
    )


def _parse_approval(
    source: str, path: str, node: yaml.Node | None, problems: _Problems
) -> ApprovalRule | None:
    if node is None or _scalar(node) == "none":
        return None
    apath = f"{path}.approval"
    if not isinstance(node, yaml.MappingNode) or _scalar(_get(node, "mode")) != "jit":
        problems.add(_loc(source, node), apath, "must be none or {mode: jit, approvers: [...]}")
        return None

    def seconds(key: str, default: int) -> int:
        n = _get(node, key)
        if n is None:
            return default
        try:
            return parse_duration(_scalar(n) or "")
        except ValueError as exc:
            problems.add(_loc(source, n), f"{apath}.{key}", str(exc))
            return default

    approvers = _string_list(source, f"{apath}.approvers", _get(node, "approvers"), node,
                             problems, required=True, what="approver groups")
    required_n = _scalar(_get(node, "approvals_required")) or "1"
    count = int(required_n) if required_n.isdigit() and int(required_n) > 0 else 1
    escalate = seconds("escalate_after", 15 * 60)
    expires = seconds("expires", 60 * 60)
    if escalate >= expires:
        problems.add(_loc(source, node), f"{apath}.escalate_after",
                     f"({escalate}s) must be shorter than expires ({expires}s), or nobody is "
                     "escalated to before the request is auto-denied")
    bg = None
    bg_node = _get(node, "break_glass")
    if isinstance(bg_node, yaml.MappingNode):
        allowed = _scalar(_get(bg_node, "allowed")) in ("true", "True", "yes")
        bg_ttl = _get(bg_node, "max_ttl")
        try:
            bg_seconds = parse_duration(_scalar(bg_ttl) or "") if bg_ttl is not None else 120
        except ValueError as exc:
            problems.add(_loc(source, bg_ttl or bg_node), f"{apath}.break_glass.max_ttl",
                         str(exc))
            bg_seconds = 120
        reviewers = _string_list(source, f"{apath}.break_glass.reviewers",
                                 _get(bg_node, "reviewers"), bg_node, problems,
                                 required=allowed, what="reviewer groups")
        limit = DEFAULT_BREAK_GLASS_LIMIT
        limit_node = _get(bg_node, "limit")
        if limit_node is not None:
            parsed = parse_budget(_scalar(limit_node) or "")
            if parsed is None:
                problems.add(_loc(source, limit_node), f"{apath}.break_glass.limit",
                             f"{_scalar(limit_node)!r} is not a limit; write N/m, N/h or N/d, "
                             "e.g. 1/h")
            else:
                limit = parsed
        bg = BreakGlass(allowed=allowed, max_ttl_seconds=bg_seconds, reviewers=tuple(reviewers),
                        limit=limit)
    return ApprovalRule(approvers=tuple(approvers), approvals_required=count,
                        escalate_after_seconds=escalate, expires_seconds=expires, break_glass=bg)


def _parse_owner(
    source: str, path: str, node: yaml.MappingNode, problems: _Problems
) -> Owner | None:
    owner_node = _get(node, "owner")
    if not isinstance(owner_node, yaml.MappingNode):
        problems.add(_loc(source, owner_node or node), f"{path}.owner",
                     "is required: a mapping with team and contact (a class without a named "
                     "owner does not load)")
        return None
    _check_keys(owner_node, _OWNER_KEYS, source, f"{path}.owner", problems)
    team = _scalar(_get(owner_node, "team"))
    contact = _scalar(_get(owner_node, "contact"))
    for field, value in (("team", team), ("contact", contact)):
        if not value or not value.strip():
            problems.add(_loc(source, owner_node), f"{path}.owner.{field}",
                         "is required and must not be empty")
    if not team or not contact:
        return None
    return Owner(team=team, contact=contact)


def _string_items(
    source: str, path: str, node: yaml.Node | None, parent: yaml.Node, problems: _Problems,
    *, what: str
) -> Iterable[tuple[str, yaml.Node]]:
    if node is None:
        problems.add(_loc(source, parent), path, f"is required: a non-empty list of {what}")
        return []
    if not isinstance(node, yaml.SequenceNode) or not node.value:
        problems.add(_loc(source, node), path, f"must be a non-empty list of {what}")
        return []
    out = []
    for item in node.value:
        if not isinstance(item, yaml.ScalarNode) or not str(item.value).strip():
            problems.add(_loc(source, item), path, f"items must be non-empty strings ({what})")
            continue
        out.append((str(item.value), item))
    return out


def _string_list(
    source: str, path: str, node: yaml.Node | None, parent: yaml.Node, problems: _Problems,
    *, required: bool, what: str
) -> list[str]:
    if node is None and not required:
        return []
    return [t for t, _ in _string_items(source, path, node, parent, problems, what=what)]


def _parse_credential(
    source: str, path: str, node: yaml.MappingNode, problems: _Problems,
    mounts: tuple[str, ...],
) -> tuple[int, int, list[PolicyRule]]:
    cpath = f"{path}.credential"
    cred = _get(node, "credential")
    if not isinstance(cred, yaml.MappingNode):
        problems.add(_loc(source, cred or node), cpath,
                     "is required: a mapping with ttl, max_ttl and vault_policy")
        return 0, 0, []
    _check_keys(cred, _CRED_KEYS, source, cpath, problems)

    def duration(key: str) -> int:
        n = _get(cred, key)
        text = _scalar(n)
        if n is None or text is None:
            problems.add(_loc(source, n or cred), f"{cpath}.{key}",
                         "is required: a duration in minutes or seconds, e.g. 5m")
            return 0
        try:
            secs = parse_duration(text)
        except ValueError as exc:
            problems.add(_loc(source, n), f"{cpath}.{key}", str(exc))
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
    if ttl and max_ttl and ttl > max_ttl:
        problems.add(_loc(source, _get(cred, "ttl") or cred), f"{cpath}.ttl",
                     f"({ttl}s) is above max_ttl ({max_ttl}s); lower ttl or raise max_ttl")

    rules: list[PolicyRule] = []
    vp = _get(cred, "vault_policy")
    if not isinstance(vp, yaml.SequenceNode) or not vp.value:
        problems.add(_loc(source, vp or cred), f"{cpath}.vault_policy",
                     "is required: a non-empty list of {path, capabilities} rules")
        return ttl, max_ttl, rules
    for i, item in enumerate(vp.value):
        rpath = f"{cpath}.vault_policy[{i}]"
        if not isinstance(item, yaml.MappingNode):
            problems.add(_loc(source, item), rpath, "must be a mapping with path and capabilities")
            continue
        _check_keys(item, _RULE_KEYS, source, rpath, problems)
        vpath = _scalar(_get(item, "path"))
        if not vpath or not _VAULT_PATH.fullmatch(vpath) or vpath.startswith("/"):
            problems.add(_loc(source, item), f"{rpath}.path",
                         f"{vpath!r} is not a Vault path; write e.g. secret/data/enrichment/*")
            continue
        unsafe = vault_path_problem(vpath, mounts)
        if unsafe:
            problems.add(_loc(source, _get(item, "path") or item), f"{rpath}.path", unsafe)
        caps_node = _get(item, "capabilities")
        caps = _string_list(source, f"{rpath}.capabilities", caps_node, item, problems,
                            required=True, what="capabilities")
        bad = [c for c in caps if c not in ALLOWED_CAPABILITIES]
        if bad:
            problems.add(_loc(source, caps_node or item), f"{rpath}.capabilities",
                         f"{', '.join(bad)} not allowed; agents may get only "
                         f"{', '.join(sorted(ALLOWED_CAPABILITIES))}")
            continue
        if caps and not unsafe:
            rules.append(PolicyRule(path=vpath, capabilities=tuple(dict.fromkeys(caps))))
    return ttl, max_ttl, rules


# --- evaluation ---------------------------------------------------------------


def evaluate(
    scope_map: ScopeMap,
    spiffe_id: SpiffeId,
    request: CredentialRequest,
    now: datetime,
    recent_issuances: Sequence[datetime] = (),
    freezes: Sequence[Freeze] = (),
) -> Decision:
    """Decide ``request`` from ``spiffe_id`` under ``scope_map`` at time ``now``.

    ``recent_issuances`` are the times this identity was issued this class
    (for ``limits``). Default deny: the result allows only when the class
    exists, a workload rule matches the identity, every required field is
    present, the target matches ``targets``, the TTL is within ``max_ttl``, the
    ``when`` condition holds and the budget is not spent; a class with a JIT
    approval rule then needs approval instead of being allowed outright.
    The checks run in that order and the first that fails decides. Before all
    of them, a freeze that matches the identity or the class denies.
    """
    frozen = first_freeze(freezes, spiffe_id, request.action_class)
    if frozen is not None:
        fc = scope_map.classes.get(request.action_class)
        return Decision(
            outcome=Outcome.DENY, deny_code=DenyCode.FROZEN, spiffe_id=spiffe_id,
            action_class=request.action_class, rule=f"freeze {frozen.id}",
            reasons=(frozen.describe(),), scope_map_version=scope_map.version,
            owner=fc.owner if fc else None, escalation=fc.escalation if fc else (),
            source=fc.source if fc else "", risk=fc.risk if fc else "",
        )
    cls = scope_map.classes.get(request.action_class)
    if cls is None:
        known = ", ".join(scope_map.classes) or "none"
        return Decision(
            outcome=Outcome.DENY, deny_code=DenyCode.UNKNOWN_ACTION_CLASS, spiffe_id=spiffe_id,
            action_class=request.action_class, rule="default-deny",
            reasons=(f"action class {request.action_class!r} is not defined in the scope map "
                     f"(known classes: {known})",),
            scope_map_version=scope_map.version,
        )

    def deny(code: DenyCode, rule: str, reason: str) -> Decision:
        return Decision(
            outcome=Outcome.DENY, deny_code=code, spiffe_id=spiffe_id, action_class=cls.name,
            rule=rule, reasons=(reason,), scope_map_version=scope_map.version, owner=cls.owner,
            escalation=cls.escalation, source=cls.source, risk=cls.risk,
        )

    matched = next((i for i, p in enumerate(cls.workloads) if p.matches(spiffe_id)), None)
    if matched is None:
        return deny(
            DenyCode.WORKLOAD_NOT_ALLOWED, f"{cls.name}.workloads",
            f"{spiffe_id} is not among the workloads allowed to request {cls.name} "
            f"(rule {cls.name}.workloads at {cls.source}; owner {cls.owner.team})",
        )
    present = {
        "initiating_event": request.initiating_event is not None,
        "target": bool(request.target),
        "justification": bool(request.justification.strip()),
    }
    needed = (*cls.requires, "target") if cls.targets else cls.requires
    missing = [f for f in dict.fromkeys(needed) if not present[f]]
    if missing:
        return deny(
            DenyCode.MISSING_FIELD, f"{cls.name}.requires",
            f"{cls.name} requires {', '.join(missing)} in the request "
            f"(rule {cls.name}.requires at {cls.source})",
        )
    if cls.targets and not any(fnmatch.fnmatchcase(request.target, t) for t in cls.targets):
        return deny(
            DenyCode.TARGET_NOT_ALLOWED, f"{cls.name}.targets",
            f"target {request.target!r} matches none of {cls.name}'s targets "
            f"({', '.join(cls.targets)}; rule {cls.name}.targets at {cls.source})",
        )
    ttl = request.ttl_seconds or cls.ttl_seconds
    if ttl > cls.max_ttl_seconds:
        return deny(
            DenyCode.TTL_TOO_LONG, f"{cls.name}.credential.max_ttl",
            f"requested TTL {ttl}s is above {cls.name}'s max_ttl of {cls.max_ttl_seconds}s; "
            "ask for less",
        )
    if cls.when is not None:
        try:
            holds = cls.when.evaluate(spiffe_id, request, now)
        except ConditionError as exc:
            return deny(DenyCode.CONDITION_FALSE, f"{cls.name}.when",
                        f"{cls.name}'s condition `{cls.when.text}` {exc}; denied (fail closed)")
        if not holds:
            return deny(DenyCode.CONDITION_FALSE, f"{cls.name}.when",
                        f"{cls.name}'s condition `{cls.when.text}` is false for this request "
                        f"(rule {cls.name}.when at {cls.source})")
    if cls.budget is not None:
        since = now - timedelta(seconds=cls.budget.window_seconds)
        counted = sorted(t for t in recent_issuances if since < t <= now)
        if len(counted) >= cls.budget.count:
            # Allowed again once enough of the counted issuances have left the window.
            frees = counted[len(counted) - cls.budget.count] + timedelta(
                seconds=cls.budget.window_seconds)
            freeze = cls.on_exceed == "freeze"
            return replace(
                deny(DenyCode.BUDGET_EXHAUSTED, f"{cls.name}.limits.per_workload",
                     f"{spiffe_id} has used its budget of {cls.budget.text} for {cls.name} "
                     f"({len(counted)} issued in the window; rule {cls.name}.limits at "
                     f"{cls.source})" + ("; on_exceed: freeze, so the identity is frozen"
                                         if freeze else "")),
                retry_after_seconds=0 if freeze else
                max(1, math.ceil((frees - now).total_seconds())),
                freeze_rule=f"{cls.name}.limits.on_exceed" if freeze else "")
    rule = f"{cls.name}.workloads[{matched}]"
    if cls.approval is not None:
        a = cls.approval
        return Decision(
            outcome=Outcome.NEEDS_APPROVAL, spiffe_id=spiffe_id, action_class=cls.name,
            rule=f"{cls.name}.approval",
            reasons=(f"{spiffe_id} matches {cls.workloads[matched]} ({rule}); {cls.name} "
                     f"requires {a.approvals_required} approval(s) from "
                     f"{', '.join(a.approvers)} (rule {cls.name}.approval at {cls.source})",),
            scope_map_version=scope_map.version, owner=cls.owner, escalation=cls.escalation,
            source=cls.source, risk=cls.risk, ttl_seconds=ttl,
            policies=(cls.vault_policy_name,),
        )
    return Decision(
        outcome=Outcome.ALLOW, spiffe_id=spiffe_id, action_class=cls.name, rule=rule,
        reasons=(f"{spiffe_id} matches {cls.workloads[matched]} ({rule} at {cls.source}); "
                 "no approval required (approval: none)",),
        scope_map_version=scope_map.version, owner=cls.owner, escalation=cls.escalation,
        source=cls.source, risk=cls.risk, ttl_seconds=ttl, policies=(cls.vault_policy_name,),
        reusable=cls.when is None or not cls.when.uses_time,
    )
