"""``credbroker credentials | revoke | freeze | unfreeze | approvals``: the responders' commands.

They speak the admin and approvals APIs over mTLS. Destructive commands preview
by default and act only with ``--yes``. The broker is found from ``--dev DIR``,
or ``--broker``/``--workload-api`` (falling back to ``$CREDBROKER_BROKER`` and
``$SPIFFE_ENDPOINT_SOCKET``, as ``bao`` falls back to ``$VAULT_ADDR``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp
from spiffe import X509Source

from broker._proto.credbroker.v1 import broker_pb2 as pb
from broker._proto.credbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.cli.audit import dev_info
from broker.core.records import rfc3339
from broker.core.revocation import Selector, freeze_target, parse_when
from broker.errors import (
    BrokerUnavailableError,
    ConfigError,
    CredbrokerError,
    IdentityError,
    InvalidRequestError,
    NotFoundError,
    PolicyError,
    VaultUnavailableError,
)
from broker.options import DEFAULT_BROKER_DNS
from broker.wire.metadata import ERROR_CODE_MD_KEY
from broker.wire.tls import RotatingChannel, diagnose_handshake, pem_material

_CODES: dict[grpc.StatusCode, type[CredbrokerError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.UNAUTHENTICATED: IdentityError,
    grpc.StatusCode.PERMISSION_DENIED: PolicyError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.UNAVAILABLE: VaultUnavailableError,
}


@contextmanager
def admin_stub(args: argparse.Namespace) -> Iterator[pb_grpc.CredentialAdminStub]:
    """The admin service over :func:`broker_channel`. Raises: as broker_channel."""
    with broker_channel(args) as channel:
        yield pb_grpc.CredentialAdminStub(channel)


@contextmanager
def approvals_stub(args: argparse.Namespace) -> Iterator[pb_grpc.ApprovalsStub]:
    """The approvals service over :func:`broker_channel`. Raises: as broker_channel."""
    with broker_channel(args) as channel:
        yield pb_grpc.ApprovalsStub(channel)


def broker_location(args: argparse.Namespace, env: Mapping[str, str]) -> tuple[str, str, str]:
    """(broker host:port, Workload API socket, broker DNS name): flags, else the environment.

    ``$CREDBROKER_BROKER`` (or the sidecar's ``$CREDBROKER_BROKER_ADDR``),
    ``$SPIFFE_ENDPOINT_SOCKET`` and ``$CREDBROKER_BROKER_DNS``.

    Raises:
        ConfigError: the broker or the Workload API socket is given nowhere.
    """
    target = args.broker or env.get("CREDBROKER_BROKER") or env.get("CREDBROKER_BROKER_ADDR", "")
    socket = args.workload_api or env.get("SPIFFE_ENDPOINT_SOCKET", "")
    dns = args.broker_dns_name or env.get("CREDBROKER_BROKER_DNS") or DEFAULT_BROKER_DNS
    if not target or not socket:
        missing = " and ".join(w for w, v in (("the broker (--broker HOST:PORT or "
                                               "$CREDBROKER_BROKER)", target),
                                              ("your admin SVID's Workload API (--workload-api "
                                               "unix:/path or $SPIFFE_ENDPOINT_SOCKET)", socket))
                               if not v)
        raise ConfigError(f"where is the broker? {missing} not given; or pass --dev DIR for "
                          "the dev stack")
    return target, socket, dns


@contextmanager
def broker_channel(args: argparse.Namespace) -> Iterator[grpc.Channel]:
    """A stub on an mTLS channel with the admin SVID.

    Raises: ConfigError, IdentityError, BrokerUnavailableError, and the family of any error
    the broker answered with.
    """
    if args.dev:
        info = dev_info(args.dev)
        # --broker picks one replica of a replicated dev stack (`brokers` in dev.json)
        target = args.broker or info["broker_addr"]
        socket = info["workload_api_sockets"]["admin"]
        dns = info.get("broker_dns_name", DEFAULT_BROKER_DNS)
    else:
        target, socket, dns = broker_location(args, os.environ)
    socket = socket if socket.startswith("unix:") else "unix:" + socket
    try:
        source = X509Source(socket_path=socket, timeout_in_seconds=10)
    except Exception as exc:
        raise IdentityError(f"no admin SVID from the Workload API at {socket} "
                            f"({type(exc).__name__})") from None
    channel = RotatingChannel(source, target, dns)
    try:
        yield channel.get()
    except grpc.RpcError as err:
        code, details = err.code(), err.details() or ""
        if code is grpc.StatusCode.UNAVAILABLE and not details.startswith(("Vault", "the audit")):
            refused = diagnose_handshake(target, dns, pem_material(source))
            if refused:
                raise IdentityError(refused) from None
            raise BrokerUnavailableError(f"the broker at {target} is unreachable ({details})"
                                         ) from None
        error = _CODES.get(code, CredbrokerError)(details)
        # The broker's stable code (README, "Errors") decides the exit code, not the status.
        error.code = str(dict(err.trailing_metadata() or ()).get(ERROR_CODE_MD_KEY, error.code))
        raise error from None
    finally:
        channel.close()
        source.close()


def _ts(dt: datetime | None) -> Timestamp | None:
    if dt is None:
        return None
    t = Timestamp()
    t.FromDatetime(dt)
    return t


def _selector(args: argparse.Namespace, *, all_if_empty: bool = False) -> pb.Selector:
    """The selector the flags describe, checked here first (a malformed pattern or time is
    refused before the broker is asked; the broker then refuses names it does not know).

    Raises:
        InvalidRequestError: a malformed pattern or time, an empty selector.
    """
    now = datetime.now(UTC)
    since = parse_when(args.since, now, flag="--since") if args.since else None
    until = parse_when(args.until, now, flag="--until") if args.until else None
    ids = getattr(args, "credential_id", None) or []
    everything = getattr(args, "all", False)
    environment = getattr(args, "environment", None) or ""
    if all_if_empty and not (args.spiffe_id or args.action_class or args.target or since
                             or until or ids or environment):
        everything = True
    Selector.build(spiffe_id=args.spiffe_id or "", action_class=args.action_class or "",
                   target=args.target or "", since=since, until=until, credential_ids=ids,
                   all=everything, environment=environment)
    sel = pb.Selector(spiffe_id=args.spiffe_id or "", action_class=args.action_class or "",
                      target=args.target or "", credential_ids=ids, all=everything,
                      environment=environment)
    for field, value in (("since", _ts(since)), ("until", _ts(until))):
        if value is not None:
            getattr(sel, field).CopyFrom(value)
    return sel


def _need_reason(args: argparse.Namespace) -> None:
    """Acting needs a reason; previewing does not. Raises: ConfigError."""
    if args.yes and not (args.reason or "").strip():
        raise ConfigError("--reason is required with --yes: say why, it goes into the audit "
                          "log")


def _when(t: Timestamp) -> str:
    return rfc3339(t.ToDatetime(tzinfo=UTC))


def _credential_json(c: pb.CredentialInfo) -> dict[str, Any]:
    ev = c.initiating_event if c.HasField("initiating_event") else None
    return {"credential_id": c.credential_id, "spiffe_id": c.spiffe_id,
            "action_class": c.action_class, "target": c.target, "request_id": c.request_id,
            "initiating_event": {"source": ev.source, "id": ev.id} if ev else None,
            "issued_at": _when(c.issued_at), "expires_at": _when(c.expires_at),
            "state": c.state, **({"environment": c.environment} if c.environment else {})}


def cmd_credentials_list(args: argparse.Namespace) -> int:
    """What is live now, by selector (read-only). Raises: as broker_channel, InvalidRequestError.
    """
    sel = _selector(args, all_if_empty=True)
    with admin_stub(args) as stub:
        creds = list(stub.ListCredentials(sel, timeout=30).credentials)
    if args.json:
        print(json.dumps([_credential_json(c) for c in creds]))
        return 0
    if not creds:
        print("no live credential matches")
        return 0
    envs = any(c.environment for c in creds)  # a column only when environments are declared
    rows = [(c["credential_id"], c["spiffe_id"], c["action_class"], c["target"] or "-",
             f"{c['initiating_event']['source']}:{c['initiating_event']['id']}"
             if c["initiating_event"] else "-", c["issued_at"][:19] + "Z",
             c["expires_at"][:19] + "Z", c["state"], *([c.get("environment", "-")] if envs
                                                        else []))
            for c in map(_credential_json, creds)]
    head = ("credential", "identity", "action class", "target", "initiating event", "issued",
            "expires", "state", *(["environment"] if envs else []))
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    print(f"{len(creds)} live credential(s)")
    return 0


def _table(creds: list[pb.CredentialInfo]) -> list[str]:
    groups = Counter((c.spiffe_id, c.action_class) for c in creds)
    width = max((len(s) for s, _ in groups), default=10)
    lines = [f"  {'identity':<{width}}  {'action class':<28} count"]
    for (sid, cls), n in sorted(groups.items()):
        lines.append(f"  {sid:<{width}}  {cls:<28} {n}")
    return lines


def cmd_revoke(args: argparse.Namespace) -> int:
    """Preview, or with --yes revoke, what the selector matches. Raises: as broker_channel,
    ConfigError (--yes without --reason), InvalidRequestError (a bad or unknown selector)."""
    sel = _selector(args)
    _need_reason(args)
    with admin_stub(args) as stub:
        creds = list(stub.ListCredentials(sel, timeout=30).credentials)
        if not creds:
            msg = "no live credential matches the selector; nothing to revoke"
            print(json.dumps({"matched": 0, "revoked": 0, "message": msg}) if args.json else msg)
            return 0
        if not args.yes:
            if args.json:
                print(json.dumps({"matched": len(creds), "preview": True, "credentials": [
                    {"credential_id": c.credential_id, "spiffe_id": c.spiffe_id,
                     "action_class": c.action_class, "target": c.target} for c in creds]}))
            else:
                print(f"{len(creds)} live credential(s) would be revoked:")
                print("\n".join(_table(creds)))
                print("preview only: run again with --yes to revoke them")
            return 0
        tty = sys.stderr.isatty() and not args.json
        summary = pb.RevokeSummary()
        for p in stub.RevokeCredentials(pb.RevokeCredentialsRequest(selector=sel,
                                                                    reason=args.reason),
                                        timeout=600, metadata=person_metadata(
                                            person_token(args))):
            if p.HasField("summary"):
                summary = p.summary
            elif tty and p.total:
                bar = "#" * int(30 * p.done / p.total)
                print(f"\rrevoking {p.done}/{p.total} [{bar:<30}]", end="", file=sys.stderr,
                      flush=True)
        if tty:
            print(file=sys.stderr)
    if args.json:
        print(json.dumps({"matched": len(creds), "revoked": summary.revoked,
                          "already_dead": summary.already_dead, "pending": summary.pending,
                          "failed": summary.failed, "failed_ids": list(summary.failed_ids)}))
    else:
        print(f"revoked {summary.revoked}, already dead {summary.already_dead}, "
              f"pending {summary.pending}, failed {summary.failed}")
        if summary.pending:
            print("pending: Vault did not confirm those; the broker retries until it does")
        if summary.failed_ids:
            print("failed: " + " ".join(summary.failed_ids))
    return 1 if summary.failed else 0


def _freeze_args(args: argparse.Namespace) -> tuple[str, str]:
    kind, pattern = freeze_target(args.spiffe_id or "", args.action_class or "")
    return (pattern, "") if kind == "spiffe_id" else ("", pattern)


def _freeze_json(f: pb.FreezeInfo) -> dict[str, Any]:
    return {"id": f.id, "kind": f.kind, "pattern": f.pattern, "reason": f.reason, "by": f.by,
            "created_at": f.created_at.ToDatetime().isoformat() + "Z"}


def cmd_freeze(args: argparse.Namespace) -> int:
    if args.list:
        with admin_stub(args) as stub:
            freezes = list(stub.ListFreezes(pb.ListFreezesRequest(), timeout=30).freezes)
        if args.json:
            print(json.dumps([_freeze_json(f) for f in freezes]))
        elif not freezes:
            print("nothing is frozen")
        for f in freezes if not args.json else []:
            print(f"{f.id}  {f.kind} {f.pattern}  by {f.by}: {f.reason}")
        return 0
    sid, cls = _freeze_args(args)
    _need_reason(args)
    with admin_stub(args) as stub:
        creds = list(stub.ListCredentials(pb.Selector(spiffe_id=sid, action_class=cls),
                                          timeout=30).credentials)
        if not args.yes:
            what = f"identities matching {sid}" if sid else f"action class {cls}"
            print(f"would freeze {what}: no new credentials, and Vault would refuse "
                  f"{len(creds)} live credential(s) at once (then revoked)")
            if creds:
                print("\n".join(_table(creds)))
            print("preview only: run again with --yes to freeze")
            return 0
        resp = stub.Freeze(pb.FreezeRequest(spiffe_id=sid, action_class=cls, reason=args.reason),
                           timeout=60, metadata=person_metadata(person_token(args)))
    if args.json:
        print(json.dumps({"freeze": _freeze_json(resp.freeze),
                          "credentials_matched": resp.credentials_matched,
                          "vault_entities_disabled": resp.vault_entities_disabled,
                          "vault_policy_frozen": resp.vault_policy_frozen,
                          "vault_enforced_ms": resp.vault_enforced_ms,
                          "vault_pending": resp.vault_pending,
                          "vault_error": resp.vault_error}))
    elif resp.vault_pending:
        print(f"frozen ({resp.freeze.id}): {resp.freeze.kind} {resp.freeze.pattern}\n"
              "  done:    recorded; no new credential is issued for it; sidecars told\n"
              "  PENDING: Vault enforcement — Vault could not be reached "
              f"({resp.vault_error}); the broker retries until Vault refuses the "
              f"{resp.credentials_matched} live credential(s), then revokes them")
    else:
        how = (f"{resp.vault_entities_disabled} Vault entit(ies) disabled"
               if resp.freeze.kind == "spiffe_id" else "its Vault policy now grants nothing")
        print(f"frozen ({resp.freeze.id}): {resp.freeze.kind} {resp.freeze.pattern}; {how}; "
              f"{resp.credentials_matched} live credential(s) refused by Vault within "
              f"{resp.vault_enforced_ms:.0f} ms and now being revoked")
    return 0


def cmd_unfreeze(args: argparse.Namespace) -> int:
    sid, cls = _freeze_args(args)
    _need_reason(args)
    with admin_stub(args) as stub:
        if not args.yes:
            freezes = [f for f in stub.ListFreezes(pb.ListFreezesRequest(), timeout=30).freezes
                       if f.pattern == (sid or cls)]
            if not freezes:
                print(f"nothing is frozen as {sid or cls}")
                return 0
            for f in freezes:
                print(f"would lift {f.id}: {f.kind} {f.pattern} (frozen by {f.by}: {f.reason})")
            print("preview only: run again with --yes to unfreeze")
            return 0
        resp = stub.Unfreeze(pb.UnfreezeRequest(spiffe_id=sid, action_class=cls,
                                                reason=args.reason), timeout=60,
                             metadata=person_metadata(person_token(args)))
    if args.json:
        print(json.dumps({"lifted": [_freeze_json(f) for f in resp.lifted]}))
    else:
        for f in resp.lifted:
            print(f"lifted {f.id}: {f.kind} {f.pattern}; issuance is possible again")
    return 0


def person_token(args: argparse.Namespace) -> str:
    """The acting person's OIDC ID token, or ``""`` (then only automation may act).

    In order: ``--as USER`` (``--dev`` only: the dev identity provider signs that user in),
    ``--id-token-file`` (or ``$CREDBROKER_ID_TOKEN_FILE``), the login cached by
    ``credbroker login``.

    Raises:
        ConfigError: --as without --dev, an unreadable token file.
        LoginError: the cached login expired or is unsafe (run `credbroker login`); the dev
            identity provider refused.
    """
    from broker.cli.login import TokenCache, dev_id_token

    if getattr(args, "as_user", None):
        if not args.dev:
            raise ConfigError("--as USER only works with --dev DIR (the dev identity provider); "
                              "run `credbroker login` or pass --id-token-file")
        return dev_id_token(args.dev, args.as_user)
    path = getattr(args, "id_token_file", None) or os.environ.get("CREDBROKER_ID_TOKEN_FILE",
                                                                  "")
    if path:
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read --id-token-file {path}: {exc.strerror}") from None
    return TokenCache.from_env(os.environ).valid_token(datetime.now(UTC))


def person_metadata(token: str) -> tuple[tuple[str, str], ...] | None:
    """gRPC metadata carrying the person's ID token (``authorization-person``), or None."""
    from broker.app.people import PERSON_MD_KEY

    return ((PERSON_MD_KEY, f"Bearer {token}"),) if token else None


def _approval_line(a: pb.ApprovalInfo, now: datetime) -> str:
    age = now - a.created_at.ToDatetime(tzinfo=UTC)
    req = a.request
    ev = f" event {req.initiating_event.source}:{req.initiating_event.id}" \
        if req.HasField("initiating_event") else ""
    tgt = f" target {req.target}" if req.target else ""
    return (f"{a.id}  {a.state}  {a.spiffe_id} wants {a.action_class}{tgt}{ev}; "
            f"waiting {int(age.total_seconds())}s; needs {a.approvals_required} of "
            f"[{', '.join(a.approvers)}], has {len(a.votes)}; expires "
            f"{a.expires_at.ToDatetime().isoformat()}Z\n      justification: "
            f"{req.justification or '-'}; request hash {a.request_hash}")


def _approval_json(a: pb.ApprovalInfo) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(json_format.MessageToJson(
        a, preserving_proto_field_name=True))
    return out


def cmd_approvals(args: argparse.Namespace) -> int:
    action = args.approvals_command
    with approvals_stub(args) as stub:
        if action in ("list", "review") and not getattr(args, "id", None):
            items = list(stub.ListApprovals(pb.ListApprovalsRequest(review=action == "review"),
                                            timeout=30).approvals)
            if args.json:
                print(json.dumps([_approval_json(a) for a in items]))
                return 0
            if not items:
                print("nothing awaits review" if action == "review" else "nothing is pending")
            now = datetime.now(UTC)
            for a in items:
                print(_approval_line(a, now))
            return 0
        if not args.reason:
            raise ConfigError("--reason is required: it goes into the audit log")
        request = pb.ApprovalDecisionRequest(approval_id=args.id, reason=args.reason)
        call = {"approve": stub.Approve, "deny": stub.Deny, "review": stub.SignOff}[action]
        a = call(request, timeout=30, metadata=person_metadata(person_token(args)))
    if args.json:
        print(json.dumps(_approval_json(a)))
    else:
        print(f"{a.id} is now {a.state} ({len(a.votes)} of {a.approvals_required} approvals)")
    return 0


def add_parsers(sub: Any) -> None:
    def connection(p: argparse.ArgumentParser, *, acts: bool = True) -> None:
        p.add_argument("--dev", metavar="DIR", help="use the dev stack started with --run-dir DIR")
        p.add_argument("--broker", metavar="HOST:PORT",
                       help="the broker (default $CREDBROKER_BROKER; with --dev, one of "
                            "dev.json's brokers, default the first)")
        p.add_argument("--workload-api", metavar="unix:/PATH", help="Workload API socket serving "
                       "your admin SVID (default $SPIFFE_ENDPOINT_SOCKET)")
        p.add_argument("--broker-dns-name", help="DNS SAN of the broker's SVID (default "
                       f"$CREDBROKER_BROKER_DNS or {DEFAULT_BROKER_DNS})")
        p.add_argument("--json", action="store_true")
        if acts:
            p.add_argument("--yes", action="store_true", help="act (default: preview only)")

    def person(p: argparse.ArgumentParser) -> None:
        p.add_argument("--as", dest="as_user", metavar="USER",
                       help="with --dev: act as this dev identity-provider user")
        p.add_argument("--id-token-file", help="your OIDC ID token ($CREDBROKER_ID_TOKEN_FILE; "
                       "default: the one `credbroker login` cached)")

    def selector(p: argparse.ArgumentParser) -> None:
        p.add_argument("--spiffe-id", help="SPIFFE ID pattern (scope-map semantics)")
        p.add_argument("--action-class")
        p.add_argument("--target", help="exact target, or a pattern with * and ?")
        p.add_argument("--environment", help="only credentials minted in this environment's "
                       "Vault (a broker that declares environments)")
        for flag, what in (("--since", "at or after"), ("--until", "at or before")):
            p.add_argument(flag, metavar="TIME", help=f"issued {what}: a duration back from "
                           "now (10m, 2h, 1d) or RFC 3339 with a zone (2026-11-27T03:00:00Z)")

    creds = sub.add_parser("credentials", help="what credentials are live now (read-only)")
    csub = creds.add_subparsers(dest="credentials_command", required=True, metavar="SUBCOMMAND")
    s = csub.add_parser("list", help="live credentials by identity, class, target, time: id, "
                                     "identity, class, target, initiating event, issued, "
                                     "expires, state")
    selector(s)
    connection(s, acts=False)
    s.set_defaults(func=cmd_credentials_list)

    s = sub.add_parser("revoke", help="revoke live credentials by selector (preview; --yes acts)")
    selector(s)
    s.add_argument("--credential-id", action="append", help="repeatable")
    s.add_argument("--all", action="store_true", help="every live credential")
    s.add_argument("--reason", help="why (required with --yes; goes into the audit log)")
    person(s)
    connection(s)
    s.set_defaults(func=cmd_revoke)

    appr = sub.add_parser("approvals", help="list, approve, deny and review JIT approvals")
    asub = appr.add_subparsers(dest="approvals_command", required=True, metavar="SUBCOMMAND")
    for name, text in (("list", "what is pending, for whom, how long, exact request"),
                       ("approve", "approve a pending request"),
                       ("deny", "deny a pending request"),
                       ("review", "break-glass uses awaiting review; with an ID, sign one off")):
        p = asub.add_parser(name, help=text)
        if name in ("approve", "deny"):
            p.add_argument("id", help="the approval id")
        elif name == "review":
            p.add_argument("id", nargs="?", help="sign off this break-glass use")
        if name != "list":
            p.add_argument("--reason", help="why (required to decide; audited)")
        person(p)
        connection(p)
        p.set_defaults(func=cmd_approvals)

    for name, fn, text in (("freeze", cmd_freeze, "stop an identity or class now: Vault refuses "
                            "its credentials at once, no new ones (preview; --yes acts)"),
                           ("unfreeze", cmd_unfreeze, "lift a freeze (preview; --yes acts)")):
        s = sub.add_parser(name, help=text)
        s.add_argument("--spiffe-id", help="SPIFFE ID pattern")
        s.add_argument("--action-class")
        s.add_argument("--reason", help="why (required with --yes; goes into the audit log)")
        if name == "freeze":
            s.add_argument("--list", action="store_true", help="list what is frozen")
        person(s)
        connection(s)
        s.set_defaults(func=fn)
