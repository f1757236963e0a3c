"""The decision: values and time in, a Decision out (pure; no I/O)."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timedelta

from broker.core.conditions import ConditionError
from broker.core.models import CredentialRequest, Decision, DenyCode, Outcome
from broker.core.revocation import Freeze, first_freeze
from broker.core.scopemap.model import ScopeMap
from broker.core.spiffeid import SpiffeId


def evaluate(
    scope_map: ScopeMap,
    spiffe_id: SpiffeId,
    request: CredentialRequest,
    now: datetime,
    recent_issuances: Sequence[datetime] = (),
    freezes: Sequence[Freeze] = (),
    *,
    federated_from: str = "",
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

    ``federated_from`` names the caller's trust domain when it is a federated (foreign)
    one. Right after the workload rule matched (a foreign workload is always named with
    its own trust domain: patterns never cross trust domains), the class's ``federated``
    setting decides: ``deny`` (the default) denies, ``approval`` makes the request need
    approval (the class's JIT rule, else ``federated_approvers``), ``allow`` goes on.

    Then the class's ``environments:`` block decides for ``request.environment`` (a class
    without one is decided alike in every environment): ``deny`` (and any environment the
    block does not name) denies with rule ``<class>.environments.<env>``; ``approval``
    makes the request need the class's JIT approval; ``allow`` waives that JIT approval.
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
    if federated_from and cls.federated == "deny":
        return deny(
            DenyCode.FEDERATED_NOT_ALLOWED, f"{cls.name}.federated",
            f"{spiffe_id} is a workload of the federated trust domain {federated_from!r} and "
            f"{cls.name} does not accept federated callers (federated: deny, the default; "
            f"rule {cls.name}.federated at {cls.source}; owner {cls.owner.team})",
        )
    env = request.environment
    env_rule = f"{cls.name}.environments.{env}"
    mode = cls.environment_mode(env)
    if mode == "deny":
        where = (f"in environment {env!r}" if env else
                 "when the request names no environment")
        allowed = [e for e, m in cls.environments.items() if m != "deny"]
        return deny(
            DenyCode.ENVIRONMENT_NOT_ALLOWED, env_rule,
            f"{cls.name} is denied {where} (it may be requested in: "
            f"{', '.join(allowed) or 'no environment'}; rule {cls.name}.environments at "
            f"{cls.source}; owner {cls.owner.team})",
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
    federated_approval = bool(federated_from) and cls.federated == "approval"
    # An environment that says `allow` waives the class's JIT rule (not a federated one).
    jit = cls.approval if mode != "allow" else None
    if jit is not None or (federated_approval and cls.approval_rule is not None):
        a = jit or cls.approval_rule
        assert a is not None
        why = (f"{spiffe_id} is a workload of the federated trust domain {federated_from!r}; "
               if federated_approval and jit is None else "")
        if mode == "approval":
            why += f"{cls.name} needs approval in environment {env!r}; "
            where = env_rule
        else:
            where = f"{cls.name}.approval" if jit is not None else f"{cls.name}.federated"
        return Decision(
            outcome=Outcome.NEEDS_APPROVAL, spiffe_id=spiffe_id, action_class=cls.name,
            rule=where,
            reasons=(f"{spiffe_id} matches {cls.workloads[matched]} ({rule}); {why}{cls.name} "
                     f"requires {a.approvals_required} approval(s) from "
                     f"{', '.join(a.approvers)} (rule {where} at {cls.source})",),
            scope_map_version=scope_map.version, owner=cls.owner, escalation=cls.escalation,
            source=cls.source, risk=cls.risk, ttl_seconds=ttl,
            policies=(cls.vault_policy_name,),
        )
    waived = mode == "allow" and cls.approval is not None  # the environment's rule decided
    return Decision(
        outcome=Outcome.ALLOW, spiffe_id=spiffe_id, action_class=cls.name,
        rule=env_rule if waived else rule,
        reasons=(f"{spiffe_id} matches {cls.workloads[matched]} ({rule} at {cls.source}); "
                 + (f"allowed in environment {env!r} without approval (rule {env_rule})"
                    if waived else
                    "no approval required (approval: none)"),),
        scope_map_version=scope_map.version, owner=cls.owner, escalation=cls.escalation,
        source=cls.source, risk=cls.risk, ttl_seconds=ttl, policies=(cls.vault_policy_name,),
        reusable=cls.when is None or not cls.when.uses_time,
    )
