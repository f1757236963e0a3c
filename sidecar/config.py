"""The sidecar's configuration, validated at the edge from :data:`broker.options.SIDECAR_OPTIONS`.

The CLI builds it with :func:`sidecar_config_from` (flags > environment > defaults) and
passes it down; the sidecar never reads ``os.environ`` itself. Only the option
declarations and the wire contract are imported from ``broker``: no server module.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from broker.errors import ConfigError
from broker.options import (
    DEFAULT_AUDIENCE,
    DEFAULT_BROKER_DNS,
    SIDECAR_OPTIONS,
    hostport_value,
    resolve,
    socket_value,
    text_value,
)
from broker.wire.federation import FederationSource, parse_bundle_flag, parse_endpoint_flag


@dataclass(frozen=True, slots=True, kw_only=True)
class SidecarConfig:
    listen_socket: Path  # the agent-facing unix socket
    workload_api_socket: str
    broker_addr: str  # host:port
    broker_dns_name: str = DEFAULT_BROKER_DNS
    jwt_audience: str = DEFAULT_AUDIENCE
    send_jwt_svid: bool = True
    broker_timeout: float = 10.0
    #: The broker's trust domain's bundle, when the sidecar's own trust domain is another
    #: (a vendor-hosted agent): None verifies the broker with our own bundle.
    broker_trust: FederationSource | None = None


def _broker_trust(bundle: str, endpoint: str) -> FederationSource | None:
    """The source of the broker's trust domain's bundle (``--broker-bundle`` and/or
    ``--broker-bundle-endpoint``), or None (the sidecar's own trust domain).

    Raises: ConfigError for a malformed value, or the two naming different trust domains.
    """
    if not bundle and not endpoint:
        return None
    file = parse_bundle_flag(bundle, flag="--broker-bundle") if bundle else None
    if not endpoint:
        return file
    source = parse_endpoint_flag(endpoint, flag="--broker-bundle-endpoint")
    if file is None:
        return source
    if file.trust_domain != source.trust_domain:
        raise ConfigError(f"--broker-bundle names {file.trust_domain} but "
                          f"--broker-bundle-endpoint {source.trust_domain}: both are the "
                          "broker's trust domain")
    if source.path is not None and source.path != file.path:
        raise ConfigError("--broker-bundle-endpoint has bundle=PATH and --broker-bundle "
                          "another file: give the first bundle once")
    return replace(source, path=file.path)


def sidecar_config_from(*, env: Mapping[str, str], flags: Mapping[str, object] | None = None
                        ) -> SidecarConfig:
    """Build and validate sidecar configuration from :data:`SIDECAR_OPTIONS`.

    Raises:
        ConfigError: something is missing or malformed.
    """
    s = resolve(SIDECAR_OPTIONS, flags=flags or {}, env=env, file={})
    sock = text_value(s, "listen")
    if not sock:
        raise ConfigError("no agent socket: pass --listen /run/credbroker/sidecar.sock")
    return SidecarConfig(
        broker_trust=_broker_trust(text_value(s, "broker_bundle"),
                                   text_value(s, "broker_bundle_endpoint")),
        listen_socket=Path(sock.removeprefix("unix:")),
        workload_api_socket=socket_value(text_value(s, "workload_api"), "Workload API socket"),
        broker_addr=hostport_value(text_value(s, "broker"), "--broker"),
        broker_dns_name=text_value(s, "broker_dns_name"),
        jwt_audience=text_value(s, "audience"),
        send_jwt_svid=not s["no_jwt_svid"].value,
    )
