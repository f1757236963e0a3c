"""SPIFFE IDs and segment-safe SPIFFE ID patterns.

Validation follows the SPIFFE-ID specification (spiffe/spiffe
``standards/SPIFFE-ID.md``, section 2): scheme ``spiffe``; a trust domain of
lower-case letters, digits, ``.``, ``-`` and ``_`` with no port or user info;
a path of segments made of letters, digits, ``.``, ``-`` and ``_``, none empty,
none ``.`` or ``..``; no percent-encoding, query or fragment; at most 2048 bytes.

Pattern semantics (used by scope maps and, later, revocation selectors):

* A pattern is written like a SPIFFE ID. Its trust domain is matched exactly
  (no wildcards there, ever).
* Path segments are matched one by one. ``*`` inside a segment matches any run
  of segment characters and never crosses ``/``: ``/agent/*`` matches
  ``/agent/triage`` but not ``/agent/triage/x``; ``/agent/triage-*`` matches
  ``/agent/triage-eu``. A segment that is exactly ``*`` must match a non-empty
  segment.
* ``**`` may only be the last segment and matches one or more further
  segments: ``/ns/soc/**`` matches ``/ns/soc/a`` and ``/ns/soc/a/b`` but not
  ``/ns/soc`` itself.
* A pattern without ``*`` is an exact ID.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from broker.errors import InvalidSpiffeIdError

_SCHEME = "spiffe://"
_MAX_LEN = 2048
_MAX_TD_LEN = 255
_TD_CHARS = re.compile(r"[a-z0-9._-]+")
_SEGMENT_CHARS = re.compile(r"[A-Za-z0-9._-]+")
_PATTERN_SEGMENT_CHARS = re.compile(r"[A-Za-z0-9._*-]+")


@dataclass(frozen=True, slots=True, order=True)
class SpiffeId:
    """A validated SPIFFE ID. Build it with :meth:`parse`."""

    trust_domain: str
    path: str  # "" or "/seg/seg"

    @classmethod
    def parse(cls, value: str) -> SpiffeId:
        """Parse and validate ``value``.

        Raises:
            InvalidSpiffeIdError: ``value`` is not a valid SPIFFE ID; the message
                says which rule it breaks.
        """
        trust_domain, segments = _split(value, what="SPIFFE ID", allow_wildcards=False)
        return cls(trust_domain=trust_domain, path="".join("/" + s for s in segments))

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.path.split("/")[1:]) if self.path else ()

    def __str__(self) -> str:
        return f"{_SCHEME}{self.trust_domain}{self.path}"


def _split(value: str, *, what: str, allow_wildcards: bool) -> tuple[str, list[str]]:
    if not isinstance(value, str) or not value:
        raise InvalidSpiffeIdError(f"{what} is empty; expected spiffe://<trust-domain>/<path>")
    if len(value.encode()) > _MAX_LEN:
        raise InvalidSpiffeIdError(f"{what} {value[:60]!r}... is longer than {_MAX_LEN} bytes")
    if not value.startswith(_SCHEME):
        lowered = value.lower()
        hint = " (the scheme must be lower-case)" if lowered.startswith(_SCHEME) else ""
        raise InvalidSpiffeIdError(
            f"{what} {value!r} must start with 'spiffe://'{hint}; "
            "expected spiffe://<trust-domain>/<path>"
        )
    rest = value[len(_SCHEME) :]
    for ch, name in (("%", "percent-encoding"), ("?", "a query"), ("#", "a fragment")):
        if ch in rest:
            raise InvalidSpiffeIdError(f"{what} {value!r} must not contain {name} ({ch!r})")
    trust_domain, sep, path = rest.partition("/")
    if not trust_domain:
        raise InvalidSpiffeIdError(f"{what} {value!r} has an empty trust domain")
    if "@" in trust_domain or ":" in trust_domain:
        raise InvalidSpiffeIdError(
            f"{what} {value!r}: the trust domain must not carry user info or a port"
        )
    if "*" in trust_domain:
        raise InvalidSpiffeIdError(
            f"{what} {value!r}: wildcards are not allowed in the trust domain; "
            "it is always matched exactly"
        )
    if len(trust_domain) > _MAX_TD_LEN or not _TD_CHARS.fullmatch(trust_domain):
        hint = " (it must be lower-case)" if _TD_CHARS.fullmatch(trust_domain.lower()) else ""
        raise InvalidSpiffeIdError(
            f"{what} {value!r}: trust domain {trust_domain!r} may only contain "
            f"a-z, 0-9, '.', '-' and '_'{hint}"
        )
    if not sep:
        return trust_domain, []
    segments = path.split("/")
    chars = _PATTERN_SEGMENT_CHARS if allow_wildcards else _SEGMENT_CHARS
    for i, seg in enumerate(segments):
        if seg == "":
            where = "a trailing '/'" if i == len(segments) - 1 else "an empty segment ('//')"
            raise InvalidSpiffeIdError(f"{what} {value!r} has {where}")
        if seg in (".", ".."):
            raise InvalidSpiffeIdError(f"{what} {value!r} has a {seg!r} segment")
        if not chars.fullmatch(seg):
            allowed = "A-Z, a-z, 0-9, '.', '-', '_'" + (" and '*'" if allow_wildcards else "")
            raise InvalidSpiffeIdError(
                f"{what} {value!r}: path segment {seg!r} may only contain {allowed}"
            )
    return trust_domain, segments


@dataclass(frozen=True, slots=True)
class SpiffeIdPattern:
    """A compiled, segment-safe SPIFFE ID pattern (see the module docstring)."""

    text: str
    trust_domain: str
    exact: SpiffeId | None
    _regex: re.Pattern[str] | None

    @classmethod
    def parse(cls, text: str) -> SpiffeIdPattern:
        """Compile ``text``.

        Raises:
            InvalidSpiffeIdError: the pattern is not a valid SPIFFE ID with
                optional wildcards; the message says which rule it breaks.
        """
        trust_domain, segments = _split(text, what="SPIFFE ID pattern", allow_wildcards=True)
        if not any("*" in s for s in segments):
            exact = SpiffeId.parse(text)
            return cls(text=text, trust_domain=trust_domain, exact=exact, _regex=None)
        parts: list[str] = []
        for i, seg in enumerate(segments):
            if "**" in seg:
                if seg != "**" or i != len(segments) - 1:
                    raise InvalidSpiffeIdError(
                        f"SPIFFE ID pattern {text!r}: '**' is only allowed as the whole last "
                        "segment (e.g. spiffe://example.org/ns/soc/**)"
                    )
                parts.append(r"(?:/[A-Za-z0-9._-]+)+")
            elif seg == "*":
                parts.append(r"/[A-Za-z0-9._-]+")
            else:
                pieces = [re.escape(p) for p in seg.split("*")]
                parts.append("/" + "[A-Za-z0-9._-]*".join(pieces))
        regex = re.compile("".join(parts))
        return cls(text=text, trust_domain=trust_domain, exact=None, _regex=regex)

    def matches(self, spiffe_id: SpiffeId) -> bool:
        """True when ``spiffe_id`` is matched; the trust domain must be equal."""
        if spiffe_id.trust_domain != self.trust_domain:
            return False
        if self.exact is not None:
            return spiffe_id == self.exact
        assert self._regex is not None
        return self._regex.fullmatch(spiffe_id.path) is not None

    def overlaps(self, other: SpiffeIdPattern) -> bool:
        """True when some SPIFFE ID could match both this pattern and ``other``.

        Exact where at least one side of each segment is literal; two wildcard
        segments (``a*`` against ``*b``) count as overlapping when their literal
        prefixes and suffixes are compatible, so the answer errs towards "yes"
        and never calls two patterns disjoint that share an ID.
        """
        if self.trust_domain != other.trust_domain:
            return False
        a = _split(self.text, what="SPIFFE ID pattern", allow_wildcards=True)[1]
        b = _split(other.text, what="SPIFFE ID pattern", allow_wildcards=True)[1]
        a_open, b_open = bool(a) and a[-1] == "**", bool(b) and b[-1] == "**"
        a, b = a[:-1] if a_open else a, b[:-1] if b_open else b
        # ``**`` stands for one or more segments, so an open pattern matches longer paths only.
        if not a_open and not b_open and len(a) != len(b):
            return False
        if a_open and not b_open and len(b) <= len(a):
            return False
        if b_open and not a_open and len(a) <= len(b):
            return False
        return all(_segments_overlap(x, y) for x, y in zip(a, b, strict=False))

    def __str__(self) -> str:
        return self.text


def _segment_regex(seg: str) -> re.Pattern[str]:
    if seg == "*":
        return re.compile(r"[A-Za-z0-9._-]+")
    return re.compile("[A-Za-z0-9._-]*".join(re.escape(p) for p in seg.split("*")))


def _segments_overlap(x: str, y: str) -> bool:
    if "*" not in x:
        return _segment_regex(y).fullmatch(x) is not None
    if "*" not in y:
        return _segment_regex(x).fullmatch(y) is not None
    xp, yp = x.split("*")[0], y.split("*")[0]
    xs, ys = x.rsplit("*", 1)[1], y.rsplit("*", 1)[1]
    return (xp.startswith(yp) or yp.startswith(xp)) and (xs.endswith(ys) or ys.endswith(xs))
