"""Vault policy paths: what a class's path could reach, and the operator's allowed mounts."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from broker.core.scopemap.model import MANAGED_PREFIXES, RESERVED_MOUNTS

_MOUNT = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*/?")

#: A Vault ACL path as tokens: a literal character, ``_SEGMENT`` (``+``: any one
#: segment) or ``_ANY`` (a trailing ``*``, or a ``{{template}}``: anything at all).
#: The two cannot be confused with literal characters: a ``+`` inside a segment and
#: a ``*`` before the end are refused.
_SEGMENT = "+"
_ANY = "*"


def normalize_allowed_mounts(mounts: Iterable[str]) -> tuple[str, ...]:
    """The operator's allow-list of Vault mounts as ``("secret/", "kv/soc/")``.

    Raises:
        ValueError: an entry is not a plain mount path (no globs, no leading '/'),
            or names Vault's control plane (``sys``, ``auth``, ``identity``),
            or the list is empty.
    """
    out: list[str] = []
    for raw in mounts:
        m = raw.strip()
        if not _MOUNT.fullmatch(m) or any(seg in (".", "..") for seg in m.split("/")):
            raise ValueError(f"Vault mount {raw!r} is not a mount path; write e.g. secret or "
                             "kv/soc (no globs, no leading '/')")
        m = m.rstrip("/") + "/"
        if any(m.startswith(r) or r.startswith(m) for r in RESERVED_MOUNTS):
            raise ValueError(f"Vault mount {raw!r} is Vault's control plane "
                             f"({', '.join(RESERVED_MOUNTS)}); it can never be allowed")
        out.append(m)
    if not out:
        raise ValueError("the allowed Vault mounts are empty; name at least one, e.g. secret")
    return tuple(dict.fromkeys(out))


def _path_tokens(path: str) -> tuple[list[str], str]:
    """Tokenize a Vault ACL path; the second value says what is wrong with it ("" if fine)."""
    tokens: list[str] = []
    segments = path.split("/")
    for n, seg in enumerate(segments):
        if n:
            tokens.append("/")
        if seg in (".", ".."):
            return tokens, "'.' and '..' segments are not allowed"
        if not seg and 0 < n < len(segments) - 1:
            return tokens, "empty segments ('//') are not allowed"
        if seg == _SEGMENT:
            tokens.append(_SEGMENT)
            continue
        if _SEGMENT in seg:
            return tokens, "'+' matches one whole segment: write it alone between '/'"
        for i, ch in enumerate(seg):
            if ch in "{}":
                tokens.append(_ANY)  # a template can expand to anything, '/' included
                return tokens, ""
            if ch == "*":
                if n != len(segments) - 1 or i != len(seg) - 1:
                    return tokens, "'*' is a glob only as the last character of a path"
                tokens.append(_ANY)
                return tokens, ""
            tokens.append(ch)
    return tokens, ""


def _could_start_with(tokens: Sequence[str], prefix: str) -> bool:
    """True when some path the tokens match begins with ``prefix``.

    Linear without memoising: a ``+`` is a whole segment, so the token after it is ``/``
    or the end, and of the lengths a ``+`` may take only the one reaching the next ``/``
    of ``prefix`` (or its end) goes on; every other branch stops at once.
    """

    def walk(i: int, j: int) -> bool:
        if j == len(prefix):
            return True
        if i == len(tokens):
            return False
        tok = tokens[i]
        if tok == _ANY:
            return True
        if tok == _SEGMENT:  # any run of non-'/' characters (possibly empty)
            k = j
            while True:
                if walk(i + 1, k):
                    return True
                if k == len(prefix) or prefix[k] == "/":
                    return False
                k += 1
        return tok == prefix[j] and walk(i + 1, j + 1)

    return walk(0, 0)


def vault_path_problem(path: str, allowed_mounts: Sequence[str]) -> str:
    """What is wrong with ``path`` as a class's Vault policy path, or "" when it is safe.

    Judged by every path it could match (``*`` as a trailing prefix glob, ``+``
    as any one segment, a ``{{template}}`` as anything): it must not be able to
    reach Vault's control plane (:data:`RESERVED_MOUNTS`, which holds every
    class's managed policy and token role), and everything it matches must lie
    under one of ``allowed_mounts`` (normalized, see :func:`normalize_allowed_mounts`).
    """
    tokens, syntax = _path_tokens(path)
    example = f"e.g. {allowed_mounts[0]}data/<team>/*"
    if syntax:
        return f"{path!r}: {syntax}; {example}"
    reached = [r for r in RESERVED_MOUNTS if _could_start_with(tokens, r)]
    if reached:
        managed = any(_could_start_with(tokens, p) for p in MANAGED_PREFIXES)
        what = ", ".join(f"{r} ({RESERVED_MOUNTS[r]})" for r in reached)
        return (f"{path!r} could reach Vault's control plane: {what}"
                + (", including other classes' credbroker-* policies and token roles"
                   if managed else "")
                + f"; write a path under an allowed mount ({', '.join(allowed_mounts)}), "
                + example)
    # Everything the path matches begins with its characters before the first wildcard,
    # and nothing more is certain: that literal prefix must lie under an allowed mount.
    first_wild = next((i for i, t in enumerate(tokens) if t in (_SEGMENT, _ANY)), len(tokens))
    literal = "".join(tokens[:first_wild])
    if not any(literal.startswith(m) for m in allowed_mounts):
        wild = first_wild < len(tokens)
        return (f"{path!r} " + ("could match paths outside" if wild else "is outside")
                + f" the allowed Vault mounts ({', '.join(allowed_mounts)}); start it with one "
                f"of them, {example}, or have the operator allow the mount "
                "(--vault-allowed-mount)")
    return ""
