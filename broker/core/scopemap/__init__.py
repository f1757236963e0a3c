"""Scope maps: the model, parsing (text in, a ScopeMap or every problem out), and the decision.

- :mod:`.model`: the values (:class:`ScopeMap`, :class:`ActionClass`, ...) and fixed limits;
- :mod:`.schema`: the published JSON Schema, which owns the structure (keys, types, enums,
  patterns), applied with file, line and field path;
- :mod:`.parse`: YAML → model, plus the semantic checks a schema cannot express;
- :mod:`.vaultpaths`: what a class's Vault path could reach;
- :mod:`.evaluate`: the pure decision;
- :mod:`.tools`: explain, test, diff, replay (``credbroker scope ...``).

This package re-exports the names its users need; import them from here.
"""

from broker.core.scopemap.evaluate import evaluate
from broker.core.scopemap.model import (
    ALLOWED_CAPABILITIES,
    API_VERSION,
    DEFAULT_BREAK_GLASS_LIMIT,
    DEFAULT_VAULT_ALLOWED_MOUNTS,
    HARD_MAX_TTL_SECONDS,
    KIND,
    MANAGED_PREFIXES,
    REQUIRABLE_FIELDS,
    RESERVED_MOUNTS,
    RISKS,
    ActionClass,
    ApprovalRule,
    BreakGlass,
    Budget,
    PolicyRule,
    ScopeMap,
)
from broker.core.scopemap.parse import (
    parse_budget,
    parse_duration,
    parse_rate,
    parse_scope_map,
    yaml_error_text,
)
from broker.core.scopemap.vaultpaths import normalize_allowed_mounts, vault_path_problem

__all__ = [
    "ALLOWED_CAPABILITIES",
    "API_VERSION",
    "DEFAULT_BREAK_GLASS_LIMIT",
    "DEFAULT_VAULT_ALLOWED_MOUNTS",
    "HARD_MAX_TTL_SECONDS",
    "KIND",
    "MANAGED_PREFIXES",
    "REQUIRABLE_FIELDS",
    "RESERVED_MOUNTS",
    "RISKS",
    "ActionClass",
    "ApprovalRule",
    "BreakGlass",
    "Budget",
    "PolicyRule",
    "ScopeMap",
    "evaluate",
    "normalize_allowed_mounts",
    "parse_budget",
    "parse_duration",
    "parse_rate",
    "parse_scope_map",
    "vault_path_problem",
    "yaml_error_text",
]
