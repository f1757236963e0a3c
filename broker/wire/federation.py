"""SPIFFE federation: the bundles of foreign trust domains the broker trusts.

A vendor hosts an agent in its own trust domain; the broker trusts that domain through
SPIFFE federation (the SPIFFE Trust Domain and Bundle spec,
``standards/SPIFFE_Trust_Domain_and_Bundle.md``, and the SPIFFE Federation spec,
``standards/SPIFFE_Federation.md``):

* a **bundle** is a JWK Set: keys with ``use: x509-svid`` carry one CA certificate each
  (``x5c``, a single base64 DER certificate), keys with ``use: jwt-svid`` carry a JWT
  signing key (``kid`` required); keys of another ``use`` are ignored. Optional
  ``spiffe_sequence`` and ``spiffe_refresh_hint`` (seconds) travel beside ``keys``.
* a bundle comes from a **static file** (``--federated-bundle TD=PATH``, re-read when it
  changes) or a **bundle endpoint** (``--federation-endpoint TD=URL,...``) with the
  ``https_web`` profile (ordinary HTTPS: the endpoint's certificate is checked against
  WebPKI, the system's trust store or the ``ca=PATH`` given) or the ``https_spiffe``
  profile (the endpoint presents an X.509-SVID, ``spiffe-id=ID``, verified against the
  trust domain's previous bundle, first taken from ``bundle=PATH``).
* an endpoint is polled every ``spiffe_refresh_hint`` seconds (default 5 minutes,
  between 1 s and a day); a failed poll keeps the bundle it had and retries sooner.

What this module gives the rest of the broker: the foreign CAs to add to the mTLS root
set (:meth:`FederatedBundles.x509_roots_pem`), each trust domain's authorities to check a
peer's chain against (:meth:`FederatedBundles.x509_authorities`; a foreign certificate
must chain to its own trust domain's bundle, never to another's), and each domain's JWT
bundle.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import json
import logging
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import jwt.algorithms as jwt_algorithms
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from spiffe import JwtBundle, TrustDomain

from broker.core.spiffeid import SpiffeId
from broker.errors import ConfigError, InvalidSpiffeIdError

_log = logging.getLogger(__name__)

DEFAULT_REFRESH_SECONDS = 300.0
MIN_REFRESH_SECONDS = 1.0
MAX_REFRESH_SECONDS = 86400.0
#: After a failed poll, retry after this long (or the hint, when shorter).
RETRY_SECONDS = 30.0
MAX_BUNDLE_BYTES = 1 << 20
PROFILES = ("https_web", "https_spiffe")


class BundleError(ConfigError):
    """A SPIFFE bundle could not be read, parsed or fetched (the message says which)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TrustBundle:
    """One trust domain's bundle: its X.509 authorities and JWT keys."""

    trust_domain: str
    x509_authorities: tuple[x509.Certificate, ...]
    jwt_bundle: JwtBundle | None = field(default=None, compare=False)
    refresh_hint: float | None = None
    sequence: int | None = None

    @property
    def x509_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM)
                        for c in self.x509_authorities)


def parse_bundle(trust_domain: str, data: bytes) -> TrustBundle:
    """A SPIFFE bundle (JWK Set) of ``trust_domain``, or its X.509 authorities as PEM
    certificates (a bundle without JWT keys or hints).

    Raises:
        BundleError: PEM that is not certificates; not JSON, no ``keys``, an x509-svid
            key without exactly one certificate in ``x5c``, a jwt-svid key without ``kid``,
            or a bad hint.
    """
    where = f"the bundle of {trust_domain}"
    if data.lstrip().startswith(b"-----BEGIN"):
        try:
            pem_cas = tuple(x509.load_pem_x509_certificates(data))
        except ValueError:
            raise BundleError(f"{where} is PEM but not CA certificates (-----BEGIN "
                              "CERTIFICATE-----)") from None
        return TrustBundle(trust_domain=trust_domain, x509_authorities=pem_cas,
                           jwt_bundle=None, refresh_hint=None, sequence=None)
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise BundleError(f"{where} is not JSON (a SPIFFE bundle is a JWK Set)") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise BundleError(f"{where} has no 'keys' list (a SPIFFE bundle is a JWK Set)")
    cas: list[x509.Certificate] = []
    jwt_keys: list[dict[str, object]] = []
    for i, key in enumerate(doc["keys"]):
        if not isinstance(key, dict):
            raise BundleError(f"{where}: keys[{i}] is not an object")
        use = key.get("use")
        if use == "x509-svid":
            x5c = key.get("x5c")
            if not isinstance(x5c, list) or len(x5c) != 1 or not isinstance(x5c[0], str):
                raise BundleError(f"{where}: keys[{i}] (x509-svid) must have exactly one "
                                  "certificate in x5c")
            try:
                cert = x509.load_der_x509_certificate(base64.b64decode(x5c[0], validate=True))
            except (ValueError, binascii.Error):
                raise BundleError(f"{where}: keys[{i}].x5c[0] is not a base64 DER "
                                  "certificate") from None
            cas.append(cert)
        elif use == "jwt-svid":
            if not isinstance(key.get("kid"), str) or not key["kid"]:
                raise BundleError(f"{where}: keys[{i}] (jwt-svid) has no kid")
            jwt_keys.append(key)
        # keys of any other use are ignored (spec 4.2.1)
    hint = doc.get("spiffe_refresh_hint")
    if hint is not None and (isinstance(hint, bool) or not isinstance(hint, int) or hint < 0):
        raise BundleError(f"{where}: spiffe_refresh_hint must be a whole number of seconds")
    seq = doc.get("spiffe_sequence")
    if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int)):
        raise BundleError(f"{where}: spiffe_sequence must be a whole number")
    jwt_bundle = None
    if jwt_keys:
        try:
            jwt_bundle = JwtBundle.parse(TrustDomain(trust_domain),
                                         json.dumps({"keys": jwt_keys}).encode())
        except Exception as exc:  # py-spiffe raises its own error types
            raise BundleError(f"{where}: its jwt-svid keys could not be read "
                              f"({type(exc).__name__})") from None
    if not cas and jwt_bundle is None:
        raise BundleError(f"{where} has no x509-svid or jwt-svid key")
    return TrustBundle(trust_domain=trust_domain, x509_authorities=tuple(cas),
                       jwt_bundle=jwt_bundle, refresh_hint=float(hint) if hint is not None
                       else None, sequence=seq)


def bundle_document(cas: Sequence[x509.Certificate], *, jwks: bytes = b"",
                    refresh_hint: int | None = None, sequence: int | None = None) -> bytes:
    """A SPIFFE bundle (JWK Set) of ``cas`` and the JWT keys in ``jwks``: what a bundle
    endpoint serves (used by ``credbroker dev`` and the tests)."""
    keys: list[object] = []
    for ca in cas:
        pub = ca.public_key()
        jwk = json.loads(jwt_algorithms.ECAlgorithm.to_jwk(pub)
                         if isinstance(pub, ec.EllipticCurvePublicKey)
                         else jwt_algorithms.RSAAlgorithm.to_jwk(pub))  # type: ignore[arg-type]
        jwk.update({"use": "x509-svid", "x5c": [base64.b64encode(
            ca.public_bytes(serialization.Encoding.DER)).decode()]})
        keys.append(jwk)
    if jwks:
        keys += [k for k in json.loads(jwks)["keys"] if k.get("use", "jwt-svid") == "jwt-svid"]
    doc: dict[str, object] = {"keys": keys}
    if refresh_hint is not None:
        doc["spiffe_refresh_hint"] = refresh_hint
    if sequence is not None:
        doc["spiffe_sequence"] = sequence
    return json.dumps(doc).encode()


# --- configuration ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class FederationSource:
    """Where one foreign trust domain's bundle comes from."""

    trust_domain: str
    path: Path | None = None  # a static bundle file
    url: str = ""  # a bundle endpoint
    profile: str = "https_web"
    endpoint_spiffe_id: str = ""  # https_spiffe: the SPIFFE ID the endpoint presents
    ca_path: Path | None = None  # https_web: the CA the endpoint's certificate chains to

    def describe(self) -> str:
        if self.path is not None and not self.url:
            return f"file {self.path}"
        return f"{self.profile} endpoint {self.url}"


def _trust_domain(td: str, flag: str) -> str:
    try:
        sid = SpiffeId.parse(td if td.startswith("spiffe://") else f"spiffe://{td}")
    except InvalidSpiffeIdError as exc:
        raise ConfigError(f"{flag}: {exc}") from None
    if sid.path:
        raise ConfigError(f"{flag}: {td!r} is a SPIFFE ID, not a trust domain")
    return sid.trust_domain


def parse_bundle_flag(text: str, *, flag: str = "--federated-bundle") -> FederationSource:
    """``TD=PATH`` (``--federated-bundle``; the sidecar's ``--broker-bundle``).

    Raises:
        ConfigError: not ``TD=PATH`` or not a valid trust domain.
    """
    td, sep, path = text.partition("=")
    if not sep or not td or not path:
        raise ConfigError(f"{flag} {text!r}: expected TRUST_DOMAIN=PATH, e.g. "
                          "vendor.example=/etc/credbroker/vendor.bundle.json")
    return FederationSource(trust_domain=_trust_domain(td, flag), path=Path(path))


def parse_endpoint_flag(text: str, *, flag: str = "--federation-endpoint") -> FederationSource:
    """``TD=URL[,profile=https_web|https_spiffe][,spiffe-id=ID][,bundle=PATH][,ca=PATH]``
    (``--federation-endpoint``; the sidecar's ``--broker-bundle-endpoint``).

    Raises:
        ConfigError: malformed, an unknown profile or key, a URL that is not https, or an
            https_spiffe endpoint without ``spiffe-id`` and ``bundle``.
    """
    head, *rest = text.split(",")
    td, sep, url = head.partition("=")
    if not sep or not td or not url:
        raise ConfigError(f"{flag} {text!r}: expected TRUST_DOMAIN=https://HOST/PATH"
                          "[,profile=https_web|https_spiffe][,spiffe-id=ID][,bundle=PATH]"
                          "[,ca=PATH]")
    opts: dict[str, str] = {}
    for item in rest:
        k, s, v = item.partition("=")
        if not s or k not in ("profile", "spiffe-id", "bundle", "ca"):
            raise ConfigError(f"{flag} {text!r}: unknown setting {item!r} (profile, "
                              "spiffe-id, bundle, ca)")
        opts[k] = v
    if urllib.parse.urlsplit(url).scheme != "https":
        raise ConfigError(f"{flag} {text!r}: a bundle endpoint is fetched over https only")
    profile = opts.get("profile", "https_web")
    if profile not in PROFILES:
        raise ConfigError(f"{flag} {text!r}: profile must be https_web or https_spiffe")
    trust_domain = _trust_domain(td, flag)
    endpoint_id = opts.get("spiffe-id", "")
    if profile == "https_spiffe":
        if not endpoint_id or "bundle" not in opts:
            raise ConfigError(f"{flag} {text!r}: https_spiffe needs spiffe-id=<the endpoint's "
                              "SPIFFE ID> and bundle=<a first bundle to verify it with>")
        try:
            SpiffeId.parse(endpoint_id)
        except InvalidSpiffeIdError as exc:
            raise ConfigError(f"{flag}: spiffe-id: {exc}") from None
    return FederationSource(trust_domain=trust_domain, url=url, profile=profile,
                            endpoint_spiffe_id=endpoint_id,
                            path=Path(opts["bundle"]) if "bundle" in opts else None,
                            ca_path=Path(opts["ca"]) if "ca" in opts else None)


# --- fetching ----------------------------------------------------------------------------


def _read_file(source: FederationSource) -> TrustBundle:
    assert source.path is not None
    try:
        data = source.path.read_bytes()
    except OSError as exc:
        raise BundleError(f"cannot read the bundle of {source.trust_domain} from "
                          f"{source.path}: {exc.strerror}") from None
    return parse_bundle(source.trust_domain, data)


def fetch_endpoint(source: FederationSource, *, previous: TrustBundle | None,
                   timeout: float = 10.0) -> TrustBundle:
    """Fetch ``source``'s bundle endpoint once.

    Raises:
        BundleError: the endpoint could not be reached, its certificate was refused, it
            answered other than 200, or the answer is not a bundle.
    """
    parts = urllib.parse.urlsplit(source.url)
    host, port = parts.hostname or "", parts.port or 443
    if source.profile == "https_spiffe":
        if previous is None or not previous.x509_authorities:
            raise BundleError(f"no bundle of {source.trust_domain} to verify the https_spiffe "
                              f"endpoint {source.url} with")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False  # the SPIFFE ID is checked instead (below)
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=previous.x509_pem.decode())
    else:
        ctx = ssl.create_default_context(
            cafile=str(source.ca_path) if source.ca_path is not None else None)
    conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=ctx)
    try:
        try:
            conn.connect()
        except ssl.SSLCertVerificationError as exc:
            raise BundleError(f"the bundle endpoint {source.url} of {source.trust_domain} "
                              f"presented a certificate we refuse: {exc.verify_message}") \
                from None
        if source.profile == "https_spiffe":
            assert conn.sock is not None
            der = conn.sock.getpeercert(binary_form=True)
            if not isinstance(der, bytes):
                raise BundleError(f"the bundle endpoint {source.url} presented no certificate")
            presented = _uri_sans(x509.load_der_x509_certificate(der))
            if presented != [source.endpoint_spiffe_id]:
                raise BundleError(f"the bundle endpoint {source.url} presented "
                                  f"{', '.join(presented) or 'no SPIFFE ID'}, not "
                                  f"{source.endpoint_spiffe_id}")
        conn.request("GET", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
                     headers={"Accept": "application/json"})
        resp = conn.getresponse()
        body = resp.read(MAX_BUNDLE_BYTES + 1)
    except BundleError:
        raise
    except (OSError, http.client.HTTPException) as exc:
        raise BundleError(f"cannot fetch the bundle of {source.trust_domain} from "
                          f"{source.url}: {type(exc).__name__}: {exc}"[:300]) from None
    finally:
        conn.close()
    if resp.status != 200:
        raise BundleError(f"the bundle endpoint {source.url} answered {resp.status}")
    if len(body) > MAX_BUNDLE_BYTES:
        raise BundleError(f"the bundle from {source.url} is larger than {MAX_BUNDLE_BYTES} "
                          "bytes")
    return parse_bundle(source.trust_domain, body)


def _uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(u) for u in san.get_values_for_type(x509.UniformResourceIdentifier)]


def refresh_seconds(bundle: TrustBundle | None) -> float:
    """How long until the next poll: the bundle's hint, within [1 s, 1 day]."""
    hint = bundle.refresh_hint if bundle is not None else None
    if hint is None or hint <= 0:
        return DEFAULT_REFRESH_SECONDS
    return min(max(hint, MIN_REFRESH_SECONDS), MAX_REFRESH_SECONDS)


class FederatedBundles:
    """The foreign trust domains' bundles, kept current.

    ``load()`` reads every static file (a bad one is a start-up error) and tries every
    endpoint once (an unreachable one is logged and retried: until it answers, callers
    of that trust domain are refused). ``run()`` (a thread) re-reads changed files and
    polls each endpoint per its bundle's refresh hint.
    """

    def __init__(self, sources: Sequence[FederationSource], *, local_trust_domain: str = "",
                 clock: Callable[[], float] = time.monotonic, timeout: float = 10.0) -> None:
        seen: set[str] = set()
        for s in sources:
            if s.trust_domain in seen:
                raise ConfigError(f"trust domain {s.trust_domain} is federated twice (one "
                                  "--federated-bundle or --federation-endpoint each)")
            if local_trust_domain and s.trust_domain == local_trust_domain:
                raise ConfigError(f"{s.trust_domain} is the broker's own trust domain; its "
                                  "bundle comes from the Workload API, never from federation")
            seen.add(s.trust_domain)
        self.sources = tuple(sources)
        self._clock = clock
        self._timeout = timeout
        self._lock = threading.Lock()
        self._bundles: dict[str, TrustBundle] = {}
        self._due: dict[str, float] = {}
        self._mtimes: dict[str, float] = {}
        self._stop = threading.Event()
        #: Bumped on every change of any bundle (the TLS layer rebuilds its roots on it).
        self.generation = 0
        self.on_update: Callable[[str, TrustBundle, str], object] | None = None

    @property
    def trust_domains(self) -> frozenset[str]:
        return frozenset(s.trust_domain for s in self.sources)

    def bundles(self) -> Mapping[str, TrustBundle]:
        with self._lock:
            return dict(self._bundles)

    def x509_authorities(self, trust_domain: str) -> tuple[x509.Certificate, ...]:
        with self._lock:
            b = self._bundles.get(trust_domain)
        return b.x509_authorities if b is not None else ()

    def jwt_bundle(self, trust_domain: str) -> JwtBundle | None:
        with self._lock:
            b = self._bundles.get(trust_domain)
        return b.jwt_bundle if b is not None else None

    def x509_roots_pem(self) -> bytes:
        """Every federated X.509 authority, PEM: added to the mTLS server's root set."""
        with self._lock:
            return b"".join(b.x509_pem for _, b in sorted(self._bundles.items()))

    def _set(self, source: FederationSource, bundle: TrustBundle, how: str) -> None:
        with self._lock:
            old = self._bundles.get(source.trust_domain)
            if old is not None and old.sequence is not None and bundle.sequence is not None \
                    and bundle.sequence < old.sequence:
                _log.warning("FEDERATION: %s served spiffe_sequence %d, older than %d: kept "
                             "the newer bundle", source.describe(), bundle.sequence,
                             old.sequence)
                return
            changed = old is None or old.x509_pem != bundle.x509_pem or \
                old.sequence != bundle.sequence or \
                (old.jwt_bundle is None) != (bundle.jwt_bundle is None)
            self._bundles[source.trust_domain] = bundle
            if changed:
                self.generation += 1
        if changed:
            _log.info("FEDERATION: bundle of %s %s from %s (%d X.509 authorities%s)",
                      source.trust_domain, how, source.describe(),
                      len(bundle.x509_authorities),
                      ", JWT keys" if bundle.jwt_bundle is not None else "")
            if self.on_update is not None:
                self.on_update(source.trust_domain, bundle, source.describe())

    def _poll(self, source: FederationSource, *, first: bool) -> None:
        now = self._clock()
        if source.url:
            with self._lock:
                previous = self._bundles.get(source.trust_domain)
            try:
                bundle = fetch_endpoint(source, previous=previous, timeout=self._timeout)
            except BundleError as exc:
                _log.error("FEDERATION: %s", exc)
                self._due[source.trust_domain] = now + min(RETRY_SECONDS,
                                                           refresh_seconds(previous))
                return
            self._set(source, bundle, "loaded" if first else "refreshed")
            self._due[source.trust_domain] = now + refresh_seconds(bundle)
            return
        assert source.path is not None
        try:
            mtime = source.path.stat().st_mtime
        except OSError:
            mtime = -1.0
        self._due[source.trust_domain] = now + 5.0
        if not first and mtime == self._mtimes.get(source.trust_domain):
            return
        try:
            bundle = _read_file(source)
        except BundleError as exc:
            if first:
                raise
            _log.error("FEDERATION: %s; kept the bundle loaded before", exc)
            return
        self._mtimes[source.trust_domain] = mtime
        self._set(source, bundle, "loaded" if first else "re-read")

    def load(self) -> None:
        """Raises: BundleError for a static bundle file that cannot be read or parsed."""
        for s in self.sources:
            if s.url and s.path is not None:  # https_spiffe: the first bundle, from a file
                self._set(s, _read_file(s), "loaded")
            self._poll(s, first=True)

    def poll_due(self) -> float:
        """Poll every source that is due; returns seconds until the next one is."""
        for s in self.sources:
            if self._clock() >= self._due.get(s.trust_domain, 0.0):
                self._poll(s, first=False)
        if not self._due:
            return DEFAULT_REFRESH_SECONDS
        return max(0.05, min(self._due.values()) - self._clock())

    def run(self) -> None:
        while not self._stop.is_set():
            wait = self.poll_due()
            self._stop.wait(min(wait, 60.0))

    def stop(self) -> None:
        self._stop.set()


class BundleEndpoint:
    """A SPIFFE bundle endpoint on loopback (``credbroker dev`` and tests): serves
    ``bundle()`` at ``/`` over HTTPS with the given certificate chain and key (PEM)."""

    def __init__(self, bundle: Callable[[], bytes], *, cert_pem: bytes, key_pem: bytes,
                 host: str = "127.0.0.1", port: int = 0) -> None:
        import http.server
        import os

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = bundle()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                _log.debug("bundle endpoint: " + format, *args)

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        fd = os.memfd_create("bundle-endpoint", os.MFD_CLOEXEC)  # the key never on disk
        try:
            os.write(fd, cert_pem + key_pem)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        self._server = http.server.ThreadingHTTPServer((host, port), Handler)
        self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        self.url = f"https://{host}:{self.port}/"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="bundle-endpoint")

    def start(self) -> BundleEndpoint:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
