"""The published JSON Schema for scope maps, applied to YAML with file, line and field path.

``broker/schema/scope-map.schema.json`` is what editors use (point the YAML
language server at it); the broker validates with the same file, then adds the
semantic checks a schema cannot express (:mod:`broker.core.scopemap.parse`).
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, relevance

Problem = tuple[str, str, str]  # (file:line, field path, what is wrong and what would be right)
Path = tuple[str | int, ...]
_TYPE_WORDS = {"object": "a mapping", "array": "a list", "string": "a string",
               "integer": "an integer", "boolean": "true or false"}


@cache
def schema() -> dict[str, Any]:
    """The scope-map JSON Schema (bundled with the package)."""
    text = resources.files("broker").joinpath("schema/scope-map.schema.json").read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


@cache
def _validator() -> Draft202012Validator:
    return Draft202012Validator(schema())


def field_path(path: Path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _to_data(node: yaml.Node, path: Path, lines: dict[Path, int]) -> Any:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for k, v in node.value:
            key = str(k.value) if isinstance(k, yaml.ScalarNode) else "?"
            lines[(*path, key)] = k.start_mark.line + 1
            out[key] = _to_data(v, (*path, key), lines)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_to_data(v, (*path, i), lines) for i, v in enumerate(node.value)]
    return yaml.SafeLoader("").construct_object(node, deep=True)


def _line(lines: dict[Path, int], path: Path) -> int:
    for n in range(len(path), -1, -1):
        if path[:n] in lines:
            return lines[path[:n]]
    return 1


def _describe(subschema: dict[str, Any]) -> str:
    if "$ref" in subschema:
        target: Any = schema()
        for part in subschema["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        return str(subschema.get("description") or target.get("description") or "")
    return str(subschema.get("description") or "")


def _friendly(err: ValidationError) -> list[tuple[Path, str]]:
    path: Path = tuple(err.absolute_path)  # from the document's root, also inside a oneOf
    v, inst, sch = err.validator, err.instance, err.schema
    expected: Any = err.validator_value
    if not isinstance(sch, dict):
        return [(path, err.message)]
    if "propertyNames" in err.relative_schema_path:
        return [((*path, str(inst)), f"is not a valid name: {_describe(sch)}")]
    if v == "required":
        props = sch.get("properties", {})
        out = []
        for name in expected:
            if isinstance(inst, dict) and name not in inst:
                hint = _describe(props.get(name, {}))
                out.append(((*path, name), "is required" + (f": {hint}" if hint else "")))
        return out
    if v == "additionalProperties" and isinstance(inst, dict):
        allowed = sorted(sch.get("properties", {}))
        return [((*path, k), f"unknown field; expected one of: {', '.join(allowed)}")
                for k in inst if k not in allowed]
    if v == "enum":
        return [(path, f"is {inst!r}; expected one of {', '.join(map(str, expected))}")]
    if v == "const":
        return [(path, f"is {inst!r}; expected {err.validator_value!r}")]
    if v == "type":
        wanted = _TYPE_WORDS.get(str(err.validator_value), str(err.validator_value))
        return [(path, f"must be {wanted}" + (f": {_describe(sch)}" if _describe(sch) else ""))]
    if v == "minItems":
        return [(path, "must be a non-empty list" + (f" of {_describe(sch)}" if _describe(sch)
                                                    else ""))]
    if v == "minLength":
        return [(path, "must not be empty")]
    if v == "minimum":
        return [(path, f"must be at least {err.validator_value}")]
    if v == "pattern" and isinstance(inst, str) and not inst.strip():
        return [(path, "must not be blank")]
    if v == "pattern":
        hint = _describe(sch)
        return [(path, f"{inst!r} is not of the expected form" + (f": {hint}" if hint else ""))]
    if v == "oneOf":
        # For a mapping, explain against the branch that takes mappings, not the scalar one.
        branch = [e for e in (err.context or [])
                  if e.relative_path or e.validator not in ("const", "type", "enum")]
        if isinstance(inst, dict) and branch:
            # The most relevant error of that branch itself, not the deepest one inside
            # it: a malformed duration should read as "a duration such as ...", not as
            # the duration's string branch failing its pattern.
            return _friendly(max(branch, key=relevance))
        hint = _describe(sch)
        return [(path, f"{inst!r} is not valid" + (f": expected {hint}" if hint else ""))]
    return [(path, err.message)]


def schema_problems(source: str, root: yaml.Node) -> list[Problem]:
    """Validate one composed YAML document against the schema; every problem, located."""
    lines: dict[Path, int] = {}
    data = _to_data(root, (), lines)
    out: list[Problem] = []
    seen: set[tuple[Path, str]] = set()
    for err in sorted(_validator().iter_errors(data), key=lambda e: [str(p) for p in e.path]):
        for path, what in _friendly(err):
            if (path, what) in seen:
                continue
            seen.add((path, what))
            out.append((f"{source}:{_line(lines, path)}", field_path(path) or "$", what))
    return out
