"""Team scope: what a team-scoped responder or approver may act on (pure).

The broker's ``--team-scope WHO=TEAM[+TEAM]`` names who acts only for some teams: WHO is
a group (of people, or of an approval bot) or a SPIFFE ID (configured automation, an
approval bot). Everyone else acts for every team, as before.

* **Who is scoped.** A SPIFFE ID listed acts for its teams. Otherwise the groups that
  give the power count (for a responder: its responder groups; for an approver: its
  groups the approval rule names): when every one of them is listed, the actor acts for
  the union of their teams; when any of them is not listed, for every team.
* **What a team owns.** A class belongs to the team owning its file (``metadata.team``),
  else to its ``owner.team``. An agent identity belongs to the teams owning the classes
  whose ``workloads`` list it. A credential belongs to its class's team.
* **What a scoped actor may do.** Freeze, unfreeze or revoke by class: only its teams'
  classes. Freeze or unfreeze an identity pattern: only when every class whose
  workloads the pattern could match, and every live credential it matches, is its
  teams' (freezing an identity stops all its credentials, another team's too). Revoke:
  only when every selected credential is of its teams' classes. Decide an approval
  (approve, deny, sign off break-glass): only of its teams' classes. Reading (lists)
  is not scoped.

Values in, values out: :class:`broker.errors.OutsideTeamError` says which team owns what.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from broker.core.scopemap import ScopeMap
from broker.core.scopemap.tools import owning_team
from broker.core.spiffeid import SpiffeId, SpiffeIdPattern
from broker.errors import InvalidSpiffeIdError, OutsideTeamError

#: Who is scoped to which teams: a group or a SPIFFE ID -> teams.
TeamScopes = Mapping[str, tuple[str, ...]]
#: How many of another team's things a refusal names before "and N more".
_SHOWN = 5


def teams_of(scopes: TeamScopes, *, spiffe_id: str = "", groups: Iterable[str] = ()
             ) -> frozenset[str] | None:
    """The teams an actor acts for; None: every team (not scoped).

    ``spiffe_id``: the actor's own SPIFFE ID when it acts as itself (automation, a bot);
    ``groups``: the groups that give it the power to do what it does.
    """
    if spiffe_id and spiffe_id in scopes:
        return frozenset(scopes[spiffe_id])
    granting = list(dict.fromkeys(groups))
    if not granting or any(g not in scopes for g in granting):
        return None
    return frozenset(t for g in granting for t in scopes[g])


def _teams_text(teams: frozenset[str]) -> str:
    return ", ".join(sorted(teams)) or "no team"


def _listing(items: list[str]) -> str:
    shown = "; ".join(items[:_SHOWN])
    return shown + (f"; and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")


def _refuse(what: str, teams: frozenset[str], others: list[str], ask: Iterable[str]) -> None:
    """Raises: OutsideTeamError naming what other teams own and who to ask."""
    asked = sorted(set(ask))
    whose = "team " + ", ".join(asked) + "'s" if asked else "their"
    raise OutsideTeamError(
        f"you act for team {_teams_text(teams)} only and may not {what}: "
        f"{_listing(others)}; ask {whose} responders, or a responder not scoped to teams")


def class_team(scope_map: ScopeMap, action_class: str) -> str:
    """The team that owns ``action_class``; "" when the map does not define it."""
    return owning_team(scope_map, action_class)


def check_class(scope_map: ScopeMap, teams: frozenset[str] | None, action_class: str, *,
                what: str) -> None:
    """Raises: OutsideTeamError when ``action_class`` is not one of ``teams``' classes
    (a class the map no longer defines belongs to no team)."""
    if teams is None:
        return
    team = class_team(scope_map, action_class)
    if team in teams:
        return
    owned = f"class {action_class} is owned by team {team}" if team else \
        f"class {action_class} is in no team's file of the scope map in force"
    _refuse(what, teams, [owned], [team] if team else [])


def check_identity(scope_map: ScopeMap, teams: frozenset[str] | None, pattern: str, *,
                   held: Iterable[tuple[str, str]], what: str) -> None:
    """May an actor of ``teams`` act on every agent ``pattern`` matches?

    ``held`` is (SPIFFE ID, action class) of each live credential.

    Raises:
        OutsideTeamError: a class of another team lists an agent ``pattern`` could match,
            or a live credential of another team's class (or of a class no team owns)
            is held by an agent it matches.
        InvalidSpiffeIdError: ``pattern`` is not a SPIFFE ID pattern.
    """
    if teams is None:
        return
    sel = SpiffeIdPattern.parse(pattern)
    others: list[str] = []
    owners: list[str] = []
    for name, cls in sorted(scope_map.classes.items()):
        team = class_team(scope_map, name)
        if team in teams:
            continue
        hit = [str(w) for w in cls.workloads if sel.overlaps(w)]
        if hit:
            others.append(f"class {name} (team {team}) lists {', '.join(hit)}")
            owners.append(team)
    seen: set[tuple[str, str]] = set()
    for sid, action_class in held:
        if (sid, action_class) in seen or class_team(scope_map, action_class) in teams:
            continue
        seen.add((sid, action_class))
        try:
            matched = sel.matches(SpiffeId.parse(sid))
        except InvalidSpiffeIdError:
            continue
        if matched:
            team = class_team(scope_map, action_class)
            others.append(f"{sid} holds a credential of class {action_class} "
                          f"({'team ' + team if team else 'no team owns it now'})")
            if team:
                owners.append(team)
    if others:
        _refuse(f"{what} {pattern}, it matches agents of other teams", teams, others, owners)


def check_credentials(scope_map: ScopeMap, teams: frozenset[str] | None,
                      held: Iterable[tuple[str, str]], *, what: str) -> None:
    """Raises: OutsideTeamError when any of the credentials (SPIFFE ID, action class) is
    of a class not owned by one of ``teams``; the message counts them by class."""
    if teams is None:
        return
    counts: dict[str, int] = {}
    for _, action_class in held:
        if class_team(scope_map, action_class) not in teams:
            counts[action_class] = counts.get(action_class, 0) + 1
    if not counts:
        return
    others, owners = [], []
    for name, n in sorted(counts.items()):
        team = class_team(scope_map, name)
        others.append(f"{n} credential(s) of class {name} "
                      f"({'team ' + team if team else 'no team owns it now'})")
        if team:
            owners.append(team)
    _refuse(f"{what}: the selection holds other teams' credentials (narrow it, e.g. "
            "--action-class)", teams, others, owners)


def check_approval(teams: frozenset[str] | None, *, owner_team: str, action_class: str,
                   what: str) -> None:
    """Raises: OutsideTeamError when the approval's class (owned by ``owner_team`` when it
    was requested) is not one of ``teams``'."""
    if teams is None or owner_team in teams:
        return
    whose = f"team {owner_team}'s" if owner_team else "its"
    raise OutsideTeamError(
        f"you approve for team {_teams_text(teams)} only and may not {what}: class "
        f"{action_class} is owned by team {owner_team or '(none)'}; ask {whose} approvers, "
        "or an approver not scoped to teams")
