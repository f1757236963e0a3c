"""Bounds on what a caller may send, checked before anything is logged, audited or stored.

Every string a gRPC request carries is length-limited here, so a caller — even
one no action class allows — can only ever cost a small, bounded log line and
audit record. Identifiers that are echoed into logs, error messages and gRPC
metadata (``request_id``, ``approval_id``, credential ids) must also match a
strict charset, so they can never carry a line break or a control character.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from broker.errors import InvalidRequestError

#: request_id, approval_id, credential_id: what the broker and Vault generate, and no more.
ID_MAX = 128
_ID = re.compile(rf"[A-Za-z0-9._:-]{{1,{ID_MAX}}}")
ID_RULE = f"1 to {ID_MAX} characters from A-Z a-z 0-9 . _ : -"

#: Free-text limits (characters). Reasons go into the audit log and into freeze records.
REASON_MAX = 1000
SPIFFE_ID_MAX = 2048  # the SPIFFE-ID spec's own ceiling for a URI
ACTION_CLASS_MAX = 128
TARGET_MAX = 256
ID_TOKEN_MAX = 16 * 1024  # an OIDC ID token (a JWT): generous, still bounded
SELECTOR_IDS_MAX = 1000  # credential ids one selector may name
CACHE_HITS_MAX = 100  # cache hits one ReportCacheHits call may carry


def is_id(value: str) -> bool:
    """True when ``value`` is a well-formed identifier (see :data:`ID_RULE`)."""
    return _ID.fullmatch(value) is not None


def check_id(name: str, value: str, *, required: bool = False) -> str:
    """``value`` unchanged when it is a well-formed identifier (or empty and not ``required``).

    The message never repeats the value: it may be huge or carry control characters.

    Raises:
        InvalidRequestError: ``value`` is missing, too long or has a character outside
            :data:`ID_RULE`.
    """
    if not value and not required:
        return value
    if not is_id(value):
        raise InvalidRequestError(f"{name} must be {ID_RULE}; the {len(value)}-character "
                                  "value sent is not" if value else f"{name} is required")
    return value


def check_length(name: str, value: str, limit: int) -> str:
    """``value`` unchanged when it is at most ``limit`` characters.

    Raises:
        InvalidRequestError: ``value`` is longer than ``limit``.
    """
    if len(value) > limit:
        raise InvalidRequestError(f"{name} is longer than {limit} characters")
    return value


def check_ids(name: str, values: Iterable[str], *, limit: int = SELECTOR_IDS_MAX) -> list[str]:
    """A list of identifiers, each checked like :func:`check_id`, at most ``limit`` of them.

    Raises:
        InvalidRequestError: too many, or one is malformed.
    """
    out = list(values)
    if len(out) > limit:
        raise InvalidRequestError(f"{name} names {len(out)} ids; at most {limit} at a time")
    for value in out:
        check_id(name, value)
    return out
