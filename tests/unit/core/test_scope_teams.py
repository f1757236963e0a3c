"""Teams sharing one broker: a map split across three teams' files."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.core.scopemap import parse_scope_map
from broker.core.scopemap.tools import codeowners, diff_maps, review_teams
from broker.errors import ScopeMapError

POLICY = "{path: secret/data/x, capabilities: [read]}"


def cls(name: str, team: str, *, workloads: str = "spiffe://example.org/agent/triage",
        extra: str = "") -> str:
    return f"""
  {name}:
    risk: low
    owner: {{team: {team}, contact: {team}@example.org}}
    escalation: [{team}-oncall]
    workloads: [{workloads}]
{extra}    credential: {{ttl: 1m, max_ttl: 2m, vault_policy: [{POLICY}]}}
"""


def doc(team: str, *classes: str) -> str:
    return (f"apiVersion: credbroker/v1\nkind: ScopeMap\nmetadata: {{team: {team}}}\n"
            "action_classes:" + "".join(classes))


def three_teams() -> list[tuple[str, str]]:
    return [
        ("maps/soc.yaml", doc("soc", cls("enrichment", "soc"))),
        ("maps/ir.yaml", doc("ir", cls("containment.isolate_host", "ir"))),
        ("maps/iam.yaml", doc("iam", cls("identity.disable_account", "iam"))),
    ]


def test_each_file_belongs_to_its_team() -> None:
    m = parse_scope_map(three_teams())
    assert m.teams == {"maps/iam.yaml": "iam", "maps/ir.yaml": "ir", "maps/soc.yaml": "soc"}


def test_a_file_may_define_only_its_own_teams_classes() -> None:
    docs = three_teams()
    docs[0] = ("maps/soc.yaml", doc("soc", cls("enrichment", "soc"),
                                    cls("identity.revoke_tokens", "iam")))
    with pytest.raises(ScopeMapError) as err:
        parse_scope_map(docs)
    assert any("identity.revoke_tokens.owner.team: is 'iam', but this file belongs to team "
               "'soc'" in p for p in err.value.problems)


def test_a_class_defined_in_two_files_is_rejected() -> None:
    docs = three_teams()
    docs[1] = ("maps/ir.yaml", doc("ir", cls("containment.isolate_host", "ir"),
                                   cls("enrichment", "ir")))
    with pytest.raises(ScopeMapError) as err:
        parse_scope_map(docs)
    assert any("action_classes.enrichment: is defined twice (first at maps/iam.yaml" in p
               or "action_classes.enrichment: is defined twice" in p
               for p in err.value.problems)


def test_diff_names_the_team_that_must_review_each_change() -> None:
    old = parse_scope_map(three_teams())
    docs = three_teams()
    docs[1] = ("maps/ir.yaml", doc("ir", cls(
        "containment.isolate_host", "ir",
        workloads="spiffe://example.org/agent/triage, spiffe://example.org/agent/x")))
    new = parse_scope_map(docs)
    changes = diff_maps(old, new)
    assert [(c.action_class, review_teams(c, old, new)) for c in changes] == \
        [("containment.isolate_host", ("ir",))]
    # a class handed from one team to another: both review
    docs = three_teams()
    docs[0] = ("maps/soc.yaml", doc("soc"))
    docs[2] = ("maps/iam.yaml", doc("iam", cls("identity.disable_account", "iam"),
                                    cls("enrichment", "iam")))
    docs[0] = ("maps/soc.yaml", "apiVersion: credbroker/v1\nkind: ScopeMap\n"
                                "metadata: {team: soc}\naction_classes: {}\n")
    moved = parse_scope_map(docs)
    teams = {c.action_class: review_teams(c, old, moved) for c in diff_maps(old, moved)}
    assert teams == {"enrichment": ("soc", "iam")}


def test_opening_a_class_to_federated_callers_widens() -> None:
    old = parse_scope_map(three_teams())
    docs = three_teams()
    docs[0] = ("maps/soc.yaml", doc("soc", cls("enrichment", "soc",
                                               extra="    federated: allow\n")))
    (change,) = diff_maps(old, parse_scope_map(docs))
    assert (change.kind, change.before, change.after, change.widens) == \
        ("federated", "deny", "allow", True)


def test_codeowners_are_generated_and_checked(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    m = parse_scope_map(three_teams())
    text = codeowners(m, prefix="/policies/", handle="@acme/{team}")
    assert "/policies/soc.yaml @acme/soc" in text and "/policies/iam.yaml @acme/iam" in text
    from broker.cli.main import main

    d = tmp_path / "maps"
    d.mkdir()
    for name, body in three_teams():
        (d / Path(name).name).write_text(body)
    assert main(["scope", "owners", str(d), "--prefix", "/p/"]) == 0
    out = capsys.readouterr().out
    assert "/p/ir.yaml @ir" in out
    owners = tmp_path / "CODEOWNERS"
    owners.write_text("/p/ir.yaml @ir\n/p/soc.yaml @soc\n")
    assert main(["scope", "owners", str(d), "--prefix", "/p/", "--check", str(owners)]) == 1
    assert "lacks: /p/iam.yaml @iam" in capsys.readouterr().err
    owners.write_text(out)
    assert main(["scope", "owners", str(d), "--prefix", "/p/", "--check", str(owners)]) == 0


def test_explain_decides_a_foreign_id_as_federated(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from broker.cli.main import main

    path = tmp_path / "map.yaml"
    path.write_text(doc("soc", cls("enrichment", "soc",
                                   workloads="spiffe://vendor.example/agent/triage")))
    argv = ["scope", "explain", str(path), "--spiffe-id",
            "spiffe://vendor.example/agent/triage", "--action-class", "enrichment", "--json"]
    main(argv)
    assert '"outcome": "allow"' in capsys.readouterr().out
    main([*argv, "--trust-domain", "example.org"])
    assert '"deny_code": "federated_not_allowed"' in capsys.readouterr().out
