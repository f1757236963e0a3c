"""``credbroker`` command line. Errors become one clear line on stderr and an exit code.

Exit codes: 0 ok; 1 the thing checked failed (e.g. the demo); otherwise the
exit code of the error's code in ``broker.errors.ERRORS`` (2 usage or
configuration error; 3 identity; 4 policy; 5 Vault or broker unreachable).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from broker.cli import audit as audit_cli
from broker.cli import scope as scope_cli
from broker.cli import store as store_cli
from broker.config import broker_config_from, process_env, vault_access_from
from broker.errors import ConfigError, CredbrokerError, exit_code_for
from broker.options import (
    BROKER_OPTIONS,
    SIDECAR_OPTIONS,
    VAULT_SYNC_OPTIONS,
    add_arguments,
    file_keys,
    flag_values,
    read_config_file,
)
from sidecar.config import sidecar_config_from


def _logging(verbose: bool, json_lines: bool = False) -> None:
    from broker.grpc.observability import EscapeControlChars, JsonFormatter

    handler = logging.StreamHandler()
    handler.addFilter(EscapeControlChars())  # one record, one line: no forged log lines
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    for noisy in ("urllib3", "spiffe", "grpc"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _serve_until_signalled(stop: Callable[[], None], *, deadline: float, name: str) -> int:
    """Block until SIGINT/SIGTERM, then run ``stop`` within ``deadline`` seconds.

    A shutdown must never leave a process behind: if ``stop`` hangs past the
    deadline, or a second signal arrives while stopping, the process exits at
    once (exit code 1) after saying so.
    """
    done = threading.Event()
    signals = {"count": 0}

    def on_signal(*_: object) -> None:
        signals["count"] += 1
        if signals["count"] > 1:
            logging.getLogger("credbroker").error("%s: second signal: exiting now", name)
            os._exit(1)
        done.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    done.wait()
    stopper = threading.Thread(target=stop, name="shutdown", daemon=True)
    stopper.start()
    stopper.join(deadline)
    if stopper.is_alive():
        logging.getLogger("credbroker").error("%s: shutdown did not finish within %.0f s; "
                                              "exiting anyway", name, deadline)
        os._exit(1)
    return 0


def serve_file_keys() -> tuple[str, ...]:
    """Keys a `serve --config FILE` may set (the broker's options, with underscores)."""
    return file_keys(BROKER_OPTIONS)


def cmd_serve(args: argparse.Namespace) -> int:
    from broker.grpc.server import BrokerServer

    cfg = broker_config_from(env=process_env(), flags=flag_values(args, BROKER_OPTIONS),
                             file=read_config_file(args.config, BROKER_OPTIONS))
    # A full disk or file-size limit must fail the write (and so the request), not kill us.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    server = BrokerServer(cfg)
    server.start()
    signal.signal(signal.SIGUSR1, lambda *_: threading.Thread(target=server.checkpoint,
                                                              daemon=True).start())
    signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=server.reload,
                                                             daemon=True).start())
    def stop() -> None:
        logging.getLogger("credbroker.broker").info("stopping: draining in-flight calls")
        server.stop()

    return _serve_until_signalled(stop, deadline=20.0, name="broker")


def cmd_vault_sync(args: argparse.Namespace) -> int:
    import json

    from broker.adapters.environments import Environments
    from broker.adapters.vault import VaultAdapter
    from broker.config import load_scope_map

    env = dict(process_env())
    if args.dev:
        from broker.cli.audit import dev_info

        info = dev_info(args.dev)
        env.update(VAULT_ADDR=info["vault_addr"], VAULT_TOKEN=info["vault_token"],
                   CREDBROKER_SCOPE_MAP=info["scope_map"])
        if not (args.registry or args.store):  # a replicated dev stack's store is PostgreSQL
            args.store = info.get("store") or None
            args.registry = None if args.store else info.get("registry_path") or None
        envs = info.get("environments")
        if isinstance(envs, dict) and not args.environment:  # `credbroker dev --environments`
            _need_dev_tooling("vault sync --dev")
            from credbroker_dev.devstack import SANDBOX_TOKEN_VAR

            env[SANDBOX_TOKEN_VAR] = envs["sandbox"]["vault_token"]
            args.default_environment = args.default_environment or envs["default"]
            args.environment = [f"sandbox={envs['sandbox']['vault_addr']},"
                                f"token-env={SANDBOX_TOKEN_VAR}"]
    vault = vault_access_from(env=env, flags=flag_values(args, VAULT_SYNC_OPTIONS))
    scope_map = load_scope_map(Path(vault.scope_map), vault_allowed_mounts=vault.allowed_mounts)
    frozen: frozenset[str] = frozenset()
    if args.registry or args.store or env.get("CREDBROKER_STORE"):
        from broker.cli.store import store_from

        store = store_from(args)  # a PostgreSQL store holds every replica's freezes
        try:
            frozen = frozenset(f.pattern for f in store.freezes() if f.kind == "action_class")
        finally:
            store.close()
    # Each environment's Vault gets the classes allowed there (one Vault: the whole map).
    vaults = Environments.build(VaultAdapter(addr=vault.addr, token=vault.token,
                                             ca_cert=vault.ca_cert),
                                default=vault.default_environment, extra=vault.environments)
    vaults.check_scope_map(scope_map)
    report = vaults.sync_scope_map(scope_map, frozen)
    if args.json:
        print(json.dumps({"scope_map_version": scope_map.version,
                          "policies_written": list(report.policies_written),
                          "roles_written": list(report.roles_written),
                          "unchanged": list(report.unchanged), "frozen": sorted(frozen)}))
    else:
        print(f"Vault in line with scope map {scope_map.version[:19]}: policies written "
              f"{', '.join(report.policies_written) or 'none'}; roles written "
              f"{', '.join(report.roles_written) or 'none'}; unchanged "
              f"{len(report.unchanged)}" + (f"; kept frozen: {', '.join(sorted(frozen))}"
                                             if frozen else ""))
    return 0


def cmd_sidecar(args: argparse.Namespace) -> int:
    from sidecar.app import SidecarHttpServer, SidecarService
    from sidecar.broker_client import BrokerClient

    cfg = sidecar_config_from(env=process_env(), flags=flag_values(args, SIDECAR_OPTIONS))
    client = BrokerClient(cfg)
    service = SidecarService(client)
    service.start_watching()
    http = SidecarHttpServer(cfg.listen_socket, service, loop=client.loop)
    http.serve_in_thread()
    logging.getLogger("credbroker.sidecar").info(
        "sidecar for %s serving on %s, broker %s", client.spiffe_id, cfg.listen_socket,
        cfg.broker_addr)
    def stop() -> None:
        http.close()
        service.stop_watching()
        client.close()

    return _serve_until_signalled(stop, deadline=10.0, name="sidecar")


def _run_dir(arg: str | None) -> Path:
    return Path(arg) if arg else Path(tempfile.mkdtemp(prefix="credbroker-dev-"))


def _workloads(items: list[str] | None) -> dict[str, str] | None:
    if not items:
        return None
    out: dict[str, str] = {}
    for item in items:
        name, sep, sid = item.partition("=")
        if not sep or not name or not sid:
            raise ConfigError(f"--workload {item!r} must be NAME=SPIFFE_ID, e.g. "
                              "triage=spiffe://example.org/agent/triage")
        if name in out:
            raise ConfigError(f"--workload {name} is given twice")
        out[name] = sid
    return out


def _need_dev_tooling(command: str) -> None:
    """Raises: ConfigError when this installation has no dev tooling (``credbroker_dev``),
    as the container image: it runs the broker and the sidecar, not the dev stack."""
    import importlib.util

    if importlib.util.find_spec("credbroker_dev") is None:
        raise ConfigError(f"`credbroker {command}` needs the dev tooling (package "
                          "credbroker_dev), which this installation leaves out (the container "
                          "image runs only the broker and the sidecar): run it from a source "
                          "checkout, e.g. `make demo`")


def cmd_dev(args: argparse.Namespace) -> int:
    _need_dev_tooling("dev")
    from credbroker_dev.devstack import (
        ENVIRONMENTS_SCOPE_MAP,
        EXAMPLE_SCOPE_MAP,
        DevStack,
        run_until_signalled,
    )

    example = ENVIRONMENTS_SCOPE_MAP if args.environments else EXAMPLE_SCOPE_MAP
    stack = DevStack(run_dir=_run_dir(args.run_dir),
                     scope_map=Path(args.scope_map) if args.scope_map else example,
                     workloads=_workloads(args.workload), replicas=args.replicas,
                     federated_vendor=args.federated_vendor or "",
                     environments=args.environments)
    stack.start()
    print(stack.summary(), flush=True)
    print("press Ctrl-C to stop", flush=True)
    return run_until_signalled(stack)


def cmd_demo(args: argparse.Namespace) -> int:
    _need_dev_tooling("demo")
    from credbroker_dev.demo import run_demo

    return run_demo(_run_dir(args.run_dir))


def version() -> str:
    """The installed package's version (its metadata), else the source tree's."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("credbroker")
    except PackageNotFoundError:
        from broker import __version__

        return __version__


def cmd_completion(args: argparse.Namespace) -> int:
    from broker.cli.completion import bash_script, zsh_script

    parser = build_parser()
    print(bash_script(parser) if args.shell == "bash" else zsh_script(parser), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="credbroker",
        description="Workload-identity credential broker for autonomous SOC agents.")
    p.add_argument("--version", action="version", version=f"credbroker {version()}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--log-format", choices=["text", "json"], default="text",
                   help="json: one JSON object per log line (for log collectors)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", help="run the broker (gRPC + mTLS)")
    add_arguments(s, BROKER_OPTIONS)
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("sidecar", help="run the agent-pod sidecar (HTTP/JSON on a unix socket)")
    add_arguments(s, SIDECAR_OPTIONS)
    s.set_defaults(func=cmd_sidecar)

    s = sub.add_parser("dev", help="start OpenBao dev, the dev Workload API, broker and sidecars")
    s.add_argument("--scope-map", help="scope map (default: the bundled SOC example)")
    s.add_argument("--workload", action="append", metavar="NAME=SPIFFE_ID",
                   help="a sidecar to start (repeatable; default: triage and containment agents)")
    s.add_argument("--run-dir", help="where sockets, logs and dev.json go (default: a new "
                                     "temporary directory)")
    s.add_argument("--federated-vendor", nargs="?", const="vendor.example",
                   metavar="TRUST_DOMAIN",
                   help="also run a vendor's trust domain (default vendor.example) with its own "
                        "Workload API and one agent's sidecar, federated with the broker; the "
                        "scope map gains the class vendor.enrichment")
    s.add_argument("--replicas", type=int, metavar="N",
                   help="N brokers sharing an embedded PostgreSQL store, the sidecars spread "
                        "across them (default: one broker on SQLite)")
    s.add_argument("--environments", action="store_true",
                   help="two environments: a second OpenBao as sandbox beside production "
                        "(default scope map: the bundled SOC example with environments)")
    s.set_defaults(func=cmd_dev)

    s = sub.add_parser("vault", help="Vault/OpenBao set-up")
    vsub = s.add_subparsers(dest="vault_command", required=True, metavar="SUBCOMMAND")
    s = vsub.add_parser("sync", help="write each class's policy and token role from the scope "
                                     "map (idempotent; only what differs)")
    add_arguments(s, VAULT_SYNC_OPTIONS)
    store_cli.add_store_args(s, what="keep classes frozen in this store frozen")
    s.add_argument("--dev", metavar="DIR", help="use the dev stack started with --run-dir DIR")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_vault_sync)

    scope_cli.add_parser(sub)
    store_cli.add_parser(sub)
    audit_cli.add_parser(sub)
    from broker.cli import responder as responder_cli  # imports grpc: after main() configured it

    responder_cli.add_parsers(sub)
    from broker.cli import login

    login.add_parsers(sub)
    from broker.console.cli import add_parser as add_console_parser

    add_console_parser(sub)

    s = sub.add_parser("demo", help="run the scripted end-to-end demo on a fresh dev stack")
    s.add_argument("--run-dir", help="where the demo's dev stack lives (default: temporary)")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("completion", help="print a shell completion script (bash or zsh)")
    s.add_argument("shell", choices=["bash", "zsh"])
    s.set_defaults(func=cmd_completion)
    return p


def main(argv: list[str] | None = None) -> int:
    # The dev stack forks children while gRPC threads run; gRPC's fork handlers are not
    # needed (children exec at once) and would only log noise. Must precede importing grpc.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    args = build_parser().parse_args(argv)
    _logging(args.verbose, args.log_format == "json")
    try:
        rc: int = args.func(args)
        return rc
    except CredbrokerError as exc:
        print(f"credbroker {args.command}: {exc}", file=sys.stderr)
        return exit_code_for(exc)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
