"""``credbroker audit verify | trace | export | report``: prove, explain and ship the audit
log: a file, or (``--store postgresql://…``) every replica's chain in the database."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from broker.adapters.audit import head_path_of, read_checkpoints, read_head, read_records
from broker.core.auditchain import FORMAT_NAMES, line_format, verify_chain
from broker.core.auditreport import (
    DEFAULT_RUBBER_STAMP_SECONDS,
    build_report,
    to_html,
    to_json,
    to_markdown,
)
from broker.core.audittrace import to_ocsf, trace, trace_lines
from broker.core.records import parse_time
from broker.core.revocation import parse_when
from broker.errors import AuditError, ConfigError


def dev_info(run_dir: str) -> dict[str, Any]:
    """What ``credbroker dev --run-dir DIR`` wrote to ``DIR/dev.json``.

    Raises:
        ConfigError: there is no readable dev.json there.
    """
    path = Path(run_dir) / "dev.json"
    try:
        info: dict[str, Any] = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"--dev {run_dir}: cannot read {path} ({exc}); start the dev stack "
                          f"with `credbroker dev --run-dir {run_dir}` first") from None
    return info


def _log_path(args: argparse.Namespace) -> Path:
    if getattr(args, "log", None):
        return Path(args.log)
    if getattr(args, "dev", None):
        return Path(dev_info(args.dev)["audit_path"])
    raise ConfigError("which audit log? pass its path, --store postgresql://… for the log in "
                      "a PostgreSQL store, or --dev DIR for the dev stack")


def _store_url(args: argparse.Namespace, env: dict[str, str] | None = None) -> str:
    """The PostgreSQL store whose audit log to read, or '' for a log file: --store, else
    dev.json's ``store`` (--dev), else CREDBROKER_STORE when no log file is named.

    Raises: ConfigError (not a postgresql:// URL; both a file and a store named).
    """
    from broker.adapters.store_pg import check_url

    url = getattr(args, "store", None) or ""
    if url and getattr(args, "log", None):
        raise ConfigError("name one audit log: a file or --store, not both")
    if not url and getattr(args, "dev", None) and not getattr(args, "log", None):
        url = str(dev_info(args.dev).get("store") or "")
    if not url and not getattr(args, "log", None) and not getattr(args, "dev", None):
        url = (os.environ if env is None else env).get("CREDBROKER_STORE", "")
    if url:
        check_url(url)
    return url


def _records(args: argparse.Namespace, command: str) -> tuple[str, Iterator[dict[str, Any]]]:
    """(what was read, for messages; its records in order) of the log the arguments name.

    Raises: ConfigError, AuditError.
    """
    url = _store_url(args)
    if url:
        from broker.adapters.audit_pg import read_db_records
        from broker.adapters.store_pg import redact

        return redact(url), read_db_records(url)
    log = _log_path(args)
    require_log(log, command)
    return str(log), read_records(log)


def require_log(path: Path, command: str, *, unknown_ok: bool = False) -> None:
    """Refuse a file that is recognisably not the audit log (an export, checkpoints).

    With ``unknown_ok`` an unrecognised first line is let through (``verify`` then
    reports the log as not intact). An empty file is a log with no records.

    Raises:
        ConfigError: the file is an export or some other file; says what it is.
        AuditError: the file cannot be read.
    """
    try:
        with path.open("rb") as f:
            first = next((line for line in f if line.strip()), b"")
    except OSError as exc:
        raise AuditError(f"cannot read the audit log {path}: {exc.strerror}") from None
    kind = line_format(first) if first else "log"
    if kind == "log" or (kind == "unknown" and unknown_ok):
        return
    raise ConfigError(f"{path} is {FORMAT_NAMES[kind]}, not the audit log; `credbroker audit "
                      f"{command}` reads the log the broker writes (serve --audit-log)")


def _public_key(path: str) -> Ed25519PublicKey:
    try:
        key = load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load public key {path}: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path} is not an Ed25519 public key")
    return key


def cmd_verify(args: argparse.Namespace) -> int:
    url = _store_url(args)
    if url:
        return _verify_store(args, url)
    log = _log_path(args)
    checkpoint_file = args.checkpoint
    key_file = args.public_key[-1] if args.public_key else None
    if args.dev:
        info = dev_info(args.dev)
        checkpoint_file = checkpoint_file or info.get("audit_checkpoints")
        key_file = key_file or info.get("audit_public_key")
    checkpoints = read_checkpoints(Path(checkpoint_file)) if checkpoint_file and \
        Path(checkpoint_file).exists() else []
    if args.checkpoint and not checkpoints:
        raise ConfigError(f"--checkpoint {args.checkpoint} holds no checkpoint")
    # The broker signs every batch into LOG.head: with it, nothing may follow the
    # newest signature.
    head_file = Path(args.head) if args.head else head_path_of(log)
    head = read_head(head_file) if key_file and not args.no_head else None
    if key_file and not args.no_head and head is None:
        # Deleting the head must not switch the check off: without it, records could be
        # appended after (or cut from) the newest periodic checkpoint unnoticed.
        print(f"{log}: NOT PROVEN INTACT: {head_file} (the signature of the newest batch) "
              "is missing or empty: it was deleted, or the log predates per-batch signing; "
              "pass --no-head to verify against the periodic checkpoints only",
              file=sys.stderr)
        return 1
    if head is not None:
        checkpoints.append(head)
    key = _public_key(key_file) if key_file and checkpoints else None
    require_log(log, "verify", unknown_ok=True)
    try:
        f = log.open("rb")
    except OSError as exc:
        raise AuditError(f"cannot read the audit log {log}: {exc.strerror}") from None
    with f:
        verdict = verify_chain(f, checkpoints, key, signed_to_end=head is not None)
    if args.json:
        print(json.dumps({"ok": verdict.ok, "records": verdict.records, "head": verdict.head,
                          "checkpoints_checked": verdict.checkpoints_checked,
                          "bad_record": verdict.bad_record, "problem": verdict.problem or None},
                         indent=2))
    elif verdict.ok:
        cps = f"; consistent with {verdict.checkpoints_checked} signed checkpoint(s)" \
            if verdict.checkpoints_checked else "; no signed checkpoint checked (pass " \
                                                "--checkpoint and --public-key)"
        print(f"{log}: intact, {verdict.records} records, head {verdict.head}{cps}")
    else:
        print(f"{log}: NOT INTACT: {verdict.problem}", file=sys.stderr)
    return 0 if verdict.ok else 1


def _verify_store(args: argparse.Namespace, url: str) -> int:
    """Verify every chain of the audit log in a PostgreSQL store (see ``verify_db``)."""
    from broker.adapters.audit_pg import verify_db
    from broker.adapters.store_pg import redact

    if args.head or args.no_head:
        raise ConfigError("--head and --no-head are for an audit log file; in a PostgreSQL "
                          "store each chain's newest signature is in the database")
    key_files = list(args.public_key or [])
    if args.dev and not key_files and dev_info(args.dev).get("audit_public_key"):
        key_files.append(str(dev_info(args.dev)["audit_public_key"]))
    keys = [_public_key(k) for k in key_files]
    mirrored = read_checkpoints(Path(args.checkpoint)) if args.checkpoint else []
    if args.checkpoint and not mirrored:
        raise ConfigError(f"--checkpoint {args.checkpoint} holds no checkpoint")
    if mirrored and not keys:
        raise ConfigError("--checkpoint needs --public-key to check the signatures")
    v = verify_db(url, keys, mirrored)
    where = redact(url)
    if args.json:
        print(json.dumps({"ok": v.ok, "records": v.records, "problems": v.problems, "chains": [
            {"chain": c.origin, "ok": c.verdict.ok, "records": c.verdict.records,
             "head": c.verdict.head, "checkpoints_checked": c.verdict.checkpoints_checked,
             "bad_record": c.verdict.bad_record, "problem": c.verdict.problem or None}
            for c in v.chains]}, indent=2))
        return 0 if v.ok else 1
    for c in v.chains:
        if c.verdict.ok:
            cps = f"; consistent with {c.verdict.checkpoints_checked} signed checkpoint(s)" \
                if c.verdict.checkpoints_checked else ""
            print(f"  chain {c.origin}: intact, {c.verdict.records} records{cps}")
        else:
            print(f"  chain {c.origin}: NOT INTACT: {c.verdict.problem}", file=sys.stderr)
    for problem in v.problems:
        print(f"  {problem}", file=sys.stderr)
    if v.ok:
        signed = "" if keys else "; no signature checked (pass --public-key)"
        print(f"{where}: intact, {len(v.chains)} chain(s), {v.records} records{signed}")
    else:
        print(f"{where}: NOT INTACT (see above)", file=sys.stderr)
    return 0 if v.ok else 1


def cmd_trace(args: argparse.Namespace) -> int:
    _, records = _records(args, "trace")
    t = trace(records, args.id)
    if t is None:
        print(f"no credential, request or approval {args.id!r} in the audit log",
              file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(t.to_json(), indent=2))
    else:
        print("\n".join(trace_lines(t, datetime.now(UTC))))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    now = datetime.now(UTC)
    since = parse_when(args.since, now, flag="--since")
    until = parse_when(args.until, now, flag="--until") if args.until else None
    log, records = _records(args, "report")
    try:
        report = build_report(records, since=since, until=until,
                              rubber_stamp_seconds=args.rubber_stamp_seconds)
    except ValueError as exc:
        raise AuditError(f"{log}: {exc}") from None
    if args.format == "json":
        print(json.dumps(to_json(report), indent=2))
    elif args.format == "html":
        sys.stdout.write(to_html(report))
    else:
        sys.stdout.write(to_markdown(report))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    since = None
    if args.since:
        since = parse_when(args.since, datetime.now(UTC), flag="--since")
    _, records = _records(args, "export")
    out = sys.stdout
    n = 0
    for record in records:
        if since is not None and parse_time(str(record["time"])) < since:
            continue
        obj = to_ocsf(record) if args.format == "ocsf" else record
        out.write(json.dumps(obj, sort_keys=True) + "\n")
        n += 1
    out.flush()
    print(f"exported {n} record(s) as {args.format}", file=sys.stderr)
    return 0


def add_parser(sub: Any) -> None:
    audit = sub.add_parser("audit", help="verify, trace and export the audit log")
    asub = audit.add_subparsers(dest="audit_command", required=True, metavar="SUBCOMMAND")

    def store_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument("--store", metavar="URL", help="read the audit log in this PostgreSQL "
                       "store (every replica's chain; default: CREDBROKER_STORE when no log "
                       "file is named)")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--dev", metavar="DIR", help="use the dev stack started with --run-dir DIR")
        p.add_argument("--json", action="store_true")

    s = asub.add_parser("verify", help="prove the log is intact; exit 1 naming the first bad "
                                       "record")
    s.add_argument("log", nargs="?", help="the audit log file")
    s.add_argument("--head", help="the signed checkpoint of the newest batch (default: "
                   "LOG.head when it exists; with it, records after the newest signature "
                   "fail verification)")
    s.add_argument("--no-head", action="store_true", help="verify a log written before "
                   "per-batch signing: against the periodic checkpoints only")
    s.add_argument("--checkpoint", help="file of signed checkpoints (default: LOG.checkpoints "
                                        "with --dev)")
    s.add_argument("--public-key", action="append", help="the broker's checkpoint public key "
                   "(PEM); with --store repeat it for replicas with their own keys (each "
                   "chain is checked with the key that signed it)")
    store_flag(s)
    common(s)
    s.set_defaults(func=cmd_verify)

    s = asub.add_parser("trace", help="the accountability chain of one credential, request or "
                                      "approval, and every request the credential served")
    s.add_argument("id", help="credential id (Vault accessor), request id or approval id")
    s.add_argument("--log", help="the audit log file")
    store_flag(s)
    common(s)
    s.set_defaults(func=cmd_trace)

    s = asub.add_parser("report", help="governance report: per class and owner, issuances, "
                                       "denials, approvals (who, how fast), break-glass and "
                                       "reviews outstanding, freezes and who lifted them")
    s.add_argument("--since", metavar="TIME", default="7d", help="start of the window: a "
                   "duration back from now (7d, 24h) or RFC 3339 with a zone (default 7d)")
    s.add_argument("--until", metavar="TIME", help="end of the window (default: now)")
    s.add_argument("--format", choices=["md", "html", "json"], default="md")
    s.add_argument("--rubber-stamp-seconds", type=int, default=DEFAULT_RUBBER_STAMP_SECONDS,
                   help="flag approvals decided faster than this (default %(default)s)")
    s.add_argument("--log", help="the audit log file")
    store_flag(s)
    s.add_argument("--dev", metavar="DIR", help="use the dev stack started with --run-dir DIR")
    s.set_defaults(func=cmd_report)

    s = asub.add_parser("export", help="records as JSONL or OCSF JSONL for a SIEM")
    s.add_argument("--format", choices=["jsonl", "ocsf"], default="jsonl")
    s.add_argument("--since", metavar="TIME", help="only records at or after this time: a "
                   "duration back from now (10m, 2h, 1d) or RFC 3339 with a zone")
    s.add_argument("--log", help="the audit log file")
    store_flag(s)
    s.add_argument("--dev", metavar="DIR", help="use the dev stack started with --run-dir DIR")
    s.set_defaults(func=cmd_export)
