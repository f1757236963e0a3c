"""``credbroker console``: serve the web console (HTTPS) until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from pathlib import Path

from broker.cli.audit import dev_info
from broker.errors import ConfigError
from broker.options import DEFAULT_BROKER_DNS


def config_from_args(args: argparse.Namespace) -> object:
    """Raises: ConfigError (something required is given nowhere)."""
    from broker.console.app import ConsoleConfig

    env = os.environ
    info = dev_info(args.dev) if args.dev else {}
    host, _, port = (args.listen or "127.0.0.1:8600").rpartition(":")
    values = {
        "tls_cert": args.tls_cert or info.get("console", {}).get("tls_cert"),
        "tls_key": args.tls_key or info.get("console", {}).get("tls_key"),
        "broker_addr": args.broker or env.get("CREDBROKER_BROKER") or info.get("broker_addr"),
        "workload_api": args.workload_api or env.get("SPIFFE_ENDPOINT_SOCKET")
        or info.get("workload_api_sockets", {}).get("console"),
        "oidc_issuer": args.oidc_issuer or info.get("dev_idp", {}).get("issuer"),
    }
    missing = [k for k, v in values.items() if not v]
    if missing:
        raise ConfigError("credbroker console needs " + ", ".join(
            "--" + k.replace("_", "-") for k in missing))
    return ConsoleConfig(
        tls_cert=Path(values["tls_cert"]), tls_key=Path(values["tls_key"]),
        broker_addr=str(values["broker_addr"]), workload_api=str(values["workload_api"]),
        oidc_issuer=str(values["oidc_issuer"]), host=host.strip("[]") or "127.0.0.1",
        port=int(port or 8600),
        broker_dns_name=args.broker_dns_name or info.get("broker_dns_name", DEFAULT_BROKER_DNS),
        oidc_client_id=args.oidc_client_id, public_url=args.public_url or "",
        responder_groups=tuple(args.responder_group or ("responders",)),
        owner_team_cannot_approve=args.owner_team_cannot_approve,
        scope_map=Path(args.scope_map or info["scope_map"]) if (args.scope_map or
                                                                info.get("scope_map")) else None,
        audit_log=Path(args.audit_log or info["audit_path"]) if (args.audit_log or
                                                                 info.get("audit_path")) else None,
        # With replicas the audit log is in the store (dev.json `store`): every chain.
        audit_store="" if args.audit_log else str(args.audit_store or info.get("store") or ""),
        audit_public_key=Path(args.audit_public_key or info["audit_public_key"])
        if (args.audit_public_key or info.get("audit_public_key")) else None,
        session_ttl=args.session_ttl, idle_timeout=args.idle_timeout,
        ready_file=Path(args.ready_file) if args.ready_file else None)


def cmd_console(args: argparse.Namespace) -> int:
    from broker.console.app import serve

    cfg = config_from_args(args)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(cfg, stop)  # type: ignore[arg-type]

    asyncio.run(main())
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    s = sub.add_parser("console", help="serve the web console for approvers and responders "
                                       "(HTTPS; people sign in with OIDC)")
    s.add_argument("--listen", help="host:port (default 127.0.0.1:8600; port 0 = any free)")
    s.add_argument("--public-url", help="https://host:port as browsers reach the console "
                                        "(default: the listen address)")
    s.add_argument("--tls-cert", help="PEM certificate chain the console serves")
    s.add_argument("--tls-key", help="its PEM private key")
    s.add_argument("--broker", help="broker host:port ($CREDBROKER_BROKER)")
    s.add_argument("--workload-api", help="the console's Workload API socket "
                                          "($SPIFFE_ENDPOINT_SOCKET); its SPIFFE ID must be "
                                          "one of the broker's --admin-id")
    s.add_argument("--broker-dns-name", help=f"DNS SAN of the broker (default "
                                             f"{DEFAULT_BROKER_DNS})")
    s.add_argument("--oidc-issuer", help="the people's OIDC issuer (authorization code + "
                                         "PKCE)")
    s.add_argument("--oidc-client-id", default="credbroker-approvals",
                   help="the console's client id: the ID-token audience the broker accepts")
    s.add_argument("--responder-group", action="append", metavar="GROUP",
                   help="groups that may revoke, freeze and unfreeze (as the broker's; "
                        "default responders)")
    s.add_argument("--owner-team-cannot-approve", action="store_true",
                   help="as the broker's flag: hide approve from a class's owner team")
    s.add_argument("--scope-map", help="the broker's scope map (risk, rules, reviewers)")
    s.add_argument("--audit-log", help="the audit log file (search, trace, verification)")
    s.add_argument("--audit-store", metavar="URL",
                   help="the PostgreSQL store holding the audit log of replicated brokers "
                        "(every replica's chain; instead of --audit-log)")
    s.add_argument("--audit-public-key", help="the checkpoint signing public key")
    s.add_argument("--session-ttl", type=float, default=8 * 3600,
                   help="seconds a session lasts at most (and never past the ID token)")
    s.add_argument("--idle-timeout", type=float, default=1800,
                   help="seconds without a request after which a session ends")
    s.add_argument("--ready-file", help="write the console's URL here once serving")
    s.add_argument("--dev", metavar="DIR", help="use the dev stack started with --run-dir DIR")
    s.set_defaults(func=cmd_console)
