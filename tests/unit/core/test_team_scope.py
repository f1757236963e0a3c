"""Team-scoped responders and approvers (pure): who is scoped, and what a team owns."""

from __future__ import annotations

import pytest

from broker.core.scopemap import ScopeMap, parse_scope_map
from broker.core.teams import (
    check_approval,
    check_class,
    check_credentials,
    check_identity,
    teams_of,
)
from broker.errors import OutsideTeamError
from tests.unit.core.test_scope_teams import cls, doc

SCOPES = {"soc-oncall": ("soc",), "ir-oncall": ("ir",), "ir-leads": ("ir", "iam"),
          "spiffe://example.org/soar/ir": ("ir",)}


def three_teams() -> ScopeMap:
    return parse_scope_map([
        ("maps/soc.yaml", doc("soc", cls("enrichment", "soc",
                                         workloads="spiffe://example.org/agent/triage"))),
        ("maps/ir.yaml", doc("ir", cls("containment", "ir",
                                       workloads="spiffe://example.org/agent/contain-*"))),
        ("maps/iam.yaml", doc("iam", cls("iam.disable", "iam",
                                         workloads="spiffe://example.org/agent/iam"),
                              cls("iam.shared", "iam",
                                  workloads="spiffe://example.org/agent/contain-eu"))),
    ])


def test_who_is_scoped() -> None:
    assert teams_of(SCOPES, groups=["ir-oncall"]) == {"ir"}
    assert teams_of(SCOPES, groups=["ir-oncall", "ir-leads"]) == {"ir", "iam"}
    # Any power-giving group not listed: every team (today's configuration keeps its power).
    assert teams_of(SCOPES, groups=["ir-oncall", "responders"]) is None
    assert teams_of(SCOPES, groups=[]) is None
    assert teams_of({}, groups=["ir-oncall"]) is None
    assert teams_of(SCOPES, spiffe_id="spiffe://example.org/soar/ir") == {"ir"}
    assert teams_of(SCOPES, spiffe_id="spiffe://example.org/soar/other") is None


def test_classes_belong_to_their_files_team() -> None:
    m = three_teams()
    check_class(m, frozenset({"ir"}), "containment", what="freeze class containment")
    check_class(m, None, "iam.disable", what="freeze")
    with pytest.raises(OutsideTeamError) as err:
        check_class(m, frozenset({"ir"}), "iam.disable", what="freeze class iam.disable")
    text = str(err.value)
    assert "you act for team ir only" in text and "class iam.disable is owned by team iam" in text
    assert "ask team iam's responders" in text
    with pytest.raises(OutsideTeamError, match="in no team's file"):
        check_class(m, frozenset({"ir"}), "gone.class", what="freeze")


def test_an_identity_belongs_to_every_team_whose_classes_list_it() -> None:
    m = three_teams()
    ir = frozenset({"ir"})
    check_identity(m, ir, "spiffe://example.org/agent/contain-us", held=(), what="freeze")
    # contain-eu is listed by ir's class (pattern) and by iam's class: freezing it stops both.
    with pytest.raises(OutsideTeamError) as err:
        check_identity(m, ir, "spiffe://example.org/agent/contain-eu", held=(), what="freeze")
    assert "class iam.shared (team iam) lists spiffe://example.org/agent/contain-eu" in \
        str(err.value)
    # A pattern reaching over another team's agents.
    with pytest.raises(OutsideTeamError, match=r"class enrichment \(team soc\)"):
        check_identity(m, ir, "spiffe://example.org/agent/*", held=(), what="freeze")
    check_identity(m, frozenset({"ir", "iam"}), "spiffe://example.org/agent/contain-*",
                   held=(), what="freeze")
    # A live credential of another team's class held by a matching agent also counts.
    with pytest.raises(OutsideTeamError, match="holds a credential of class enrichment"):
        check_identity(m, ir, "spiffe://example.org/agent/contain-us",
                       held=[("spiffe://example.org/agent/contain-us", "enrichment")],
                       what="freeze")
    check_identity(m, None, "spiffe://example.org/**", held=(), what="freeze")


def test_revocation_picks_only_own_credentials() -> None:
    m = three_teams()
    check_credentials(m, frozenset({"soc"}), [("spiffe://example.org/agent/triage",
                                               "enrichment")], what="revoke")
    with pytest.raises(OutsideTeamError) as err:
        check_credentials(m, frozenset({"soc"}), [
            ("spiffe://example.org/agent/triage", "enrichment"),
            ("spiffe://example.org/agent/contain-us", "containment"),
            ("spiffe://example.org/agent/contain-eu", "containment")], what="revoke")
    assert "2 credential(s) of class containment (team ir)" in str(err.value)


def test_approvals_of_own_teams_classes_only() -> None:
    check_approval(frozenset({"iam"}), owner_team="iam", action_class="iam.disable",
                   what="approve")
    check_approval(None, owner_team="iam", action_class="iam.disable", what="approve")
    with pytest.raises(OutsideTeamError, match=r"class iam\.disable is owned by team iam"):
        check_approval(frozenset({"ir"}), owner_team="iam", action_class="iam.disable",
                       what="approve")
