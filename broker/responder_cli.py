"""``credbroker revoke | freeze | unfreeze``: the responder's commands (admin API over mTLS).

Destructive commands preview by default and act only with ``--yes``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from collections.abc import Iterator
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
from broker.audit_cli import dev_info
from broker.config import DEFAULT_BROKER_DNS
from broker.core.records import parse_time
from broker.core.revocation import Selector, freeze_target
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
from broker.tls import RotatingChannel, diagnose_handshake, pem_material

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


@contextmanager
def broker_channel(args: argparse.Namespace) -> Iterator[grpc.Channel]:
    """A stub on an mTLS channel with the admin SVID.

    Raises: ConfigError, IdentityError, BrokerUnavailableError, and the family of any error
    the broker answered with.
    """
    if args.dev:
        info = dev_info(args.dev)
        target, socket = info["broker_addr"], info["workload_api_sockets"]["admin"]
        dns = info.get("broker_dns_name", DEFAULT_BROKER_DNS)
    else:
        target, socket, dns = args.broker, args.workload_api, args.broker_dns_name
        if not target or not socket:
            raise ConfigError("where is the broker? pass --dev DIR for the dev stack, or "
                              "--broker HOST:PORT and --workload-api unix:/path for your admin "
                              "SVID")
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
        raise _CODES.get(code, CredbrokerError)(details) from None
    finally:
        channel.close()
        source.close()


def _ts(text: str | None) -> Timestamp | None:
    if not text:
        return None
    try:
        dt = parse_time(text)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    t = Timestamp()
    t.FromDatetime(dt)
    return t


def _selector(args: argparse.Namespace) -> pb.Selector:
    # Validate locally first: a malformed pattern is refused before anything is revoked.
    Selector.build(spiffe_id=args.spiffe_id or "", action_class=args.action_class or "",
                   target=args.target or "",
                   since=parse_time(args.since) if args.since else None,
                   until=parse_time(args.until) if args.until else None,
                   credential_ids=args.credential_id or [], all=args.all)
    sel = pb.Selector(spiffe_id=args.spiffe_id or "", action_class=args.action_class or "",
                      target=args.target or "", credential_ids=args.credential_id or [],
                      all=args.all)
    since, until = _ts(args.since), _ts(args.until)
    if since is not None:
        sel.since.CopyFrom(since)
    if until is not None:
        sel.until.CopyFrom(until)
    return sel


def _table(creds: list[pb.CredentialInfo]) -> list[str]:
    groups = Counter((c.spiffe_id, c.action_class) for c in creds)
    width = max((len(s) for s, _ in groups), default=10)
    lines = [f"  {'identity':<{width}}  {'action class':<28} count"]
    for (sid, cls), n in sorted(groups.items()):
        lines.append(f"  {sid:<{width}}  {cls:<28} {n}")
    return lines


def cmd_revoke(args: argparse.Namespace) -> int:
    sel = _selector(args)
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
                                        timeout=600):
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
    if not args.reason:
        raise ConfigError("--reason is required: say why, it goes into the audit log")
    sid, cls = _freeze_args(args)
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
                           timeout=60)
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
    if not args.reason:
        raise ConfigError("--reason is required: say why, it goes into the audit log")
    sid, cls = _freeze_args(args)
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
                                                reason=args.reason), timeout=60)
    if args.json:
        print(json.dumps({"lifted": [_freeze_json(f) for f in resp.lifted]}))
    else:
        for f in resp.lifted:
            print(f"lifted {f.id}: {f.kind} {f.pattern}; issuance is possible again")
    return 0


def _id_token(args: argparse.Namespace) -> str:
    """The approver's OIDC ID token: --as USER (dev issuer, --dev only) or --id-token-file."""
    if args.as_user:
        if not args.dev:
            raise ConfigError("--as USER only works with --dev DIR (the dev identity provider); "
                              "pass --id-token-file with a real ID token")
        from broker.approvers import DevIssuer

        return DevIssuer(Path(args.dev)).id_token(args.as_user)
    path = args.id_token_file or os.environ.get("CREDBROKER_ID_TOKEN_FILE", "")
    if not path:
        return ""  # an approval bot needs none
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read --id-token-file {path}: {exc.strerror}") from None


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
        request = pb.ApprovalDecisionRequest(approval_id=args.id, reason=args.reason,
                                             id_token=_id_token(args))
        call = {"approve": stub.Approve, "deny": stub.Deny, "review": stub.SignOff}[action]
        a = call(request, timeout=30)
    if args.json:
        print(json.dumps(_approval_json(a)))
    else:
        print(f"{a.id} is now {a.state} ({len(a.votes)} of {a.approvals_required} approvals)")
    return 0


def add_parsers(sub: Any) -> None:
    def connection(p: argparse.ArgumentParser) -> None:
        p.add_argument("--dev", metavar="DIR", help="use the dev stack started with --run-dir DIR")
        p.add_argument("--broker", help="broker host:port")
        p.add_argument("--workload-api", help="Workload API socket serving your admin SVID")
        p.add_argument("--broker-dns-name", default=DEFAULT_BROKER_DNS)
        p.add_argument("--json", action="store_true")
        p.add_argument("--yes", action="store_true", help="act (default: preview only)")

    s = sub.add_parser("revoke", help="revoke live credentials by selector (preview; --yes acts)")
    s.add_argument("--spiffe-id", help="SPIFFE ID pattern (scope-map semantics)")
    s.add_argument("--action-class")
    s.add_argument("--target", help="exact target, or a pattern with * and ?")
    s.add_argument("--since", help="issued at or after (RFC 3339)")
    s.add_argument("--until", help="issued at or before (RFC 3339)")
    s.add_argument("--credential-id", action="append", help="repeatable")
    s.add_argument("--all", action="store_true", help="every live credential")
    s.add_argument("--reason", required=True, help="why (goes into the audit log)")
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
        p.add_argument("--as", dest="as_user", metavar="USER",
                       help="with --dev: act as this dev identity-provider user")
        p.add_argument("--id-token-file", help="your OIDC ID token ($CREDBROKER_ID_TOKEN_FILE)")
        connection(p)
        p.set_defaults(func=cmd_approvals)

    for name, fn, text in (("freeze", cmd_freeze, "stop an identity or class now: Vault refuses "
                            "its credentials at once, no new ones (preview; --yes acts)"),
                           ("unfreeze", cmd_unfreeze, "lift a freeze (preview; --yes acts)")):
        s = sub.add_parser(name, help=text)
        s.add_argument("--spiffe-id", help="SPIFFE ID pattern")
        s.add_argument("--action-class")
        s.add_argument("--reason", help="why (required; goes into the audit log)")
        if name == "freeze":
            s.add_argument("--list", action="store_true", help="list what is frozen")
        connection(s)
        s.set_defaults(func=fn)
