"""The console's credential table and filter, for brokers with and without environments."""

from __future__ import annotations

from broker._proto.credbroker.v1 import broker_pb2 as pb
from broker.console.app import _selector
from broker.console.views import credential_rows


def _cred(cid: str, environment: str = "") -> pb.CredentialInfo:
    return pb.CredentialInfo(credential_id=cid, spiffe_id="spiffe://example.org/agent/t",
                             action_class="enrichment", target="host-1",
                             environment=environment)


def test_an_environment_column_appears_only_when_credentials_carry_one() -> None:
    plain = credential_rows([_cred("a"), _cred("b")], selectable=False)
    assert "environment" not in plain
    both = credential_rows([_cred("a", "sandbox"), _cred("b", "production")], selectable=True)
    assert "<th>environment</th>" in both
    assert both.count('data-testid="environment"') == 2
    assert '<td data-testid="environment">sandbox</td>' in both
    assert both.index("<th>environment</th>") < both.index("<th>target</th>")


def test_the_filter_selects_by_environment_and_nothing_named_means_everything() -> None:
    sel = _selector({"environment": " sandbox "})
    assert (sel.environment, sel.all) == ("sandbox", False)
    assert _selector({}).all is True
