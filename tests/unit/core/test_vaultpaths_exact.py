"""Vault policy paths, rule by rule, with the exact words an operator reads: what a
class's path could reach, and which mounts the operator may allow."""

from __future__ import annotations

import pytest

from broker.core.scopemap.vaultpaths import normalize_allowed_mounts, vault_path_problem

MOUNTS = ("secret/", "kv/soc/")
EXAMPLE = "e.g. secret/data/<team>/*"


# -- the operator's allowed mounts

@pytest.mark.parametrize("mount", ["secret/.", "./secret", "kv/./soc", "kv/../sys"])
def test_dot_segments_are_not_mount_paths(mount: str) -> None:
    with pytest.raises(ValueError) as err:
        normalize_allowed_mounts([mount])
    assert str(err.value) == (f"Vault mount {mount!r} is not a mount path; write e.g. secret "
                              "or kv/soc (no globs, no leading '/')")


def test_a_mount_keeps_every_character_and_gets_one_trailing_slash() -> None:
    assert normalize_allowed_mounts(["vaultX", "kvX/", " XsocX "]) == (
        "vaultX/", "kvX/", "XsocX/")


def test_the_control_plane_is_named_when_refused() -> None:
    with pytest.raises(ValueError) as err:
        normalize_allowed_mounts(["identity"])
    assert str(err.value) == ("Vault mount 'identity' is Vault's control plane (sys/, auth/, "
                              "identity/); it can never be allowed")


def test_an_empty_list_says_what_to_name() -> None:
    with pytest.raises(ValueError) as err:
        normalize_allowed_mounts([])
    assert str(err.value) == ("the allowed Vault mounts are empty; name at least one, "
                              "e.g. secret")


# -- a class's path: syntax

@pytest.mark.parametrize(("path", "why"), [
    ("secret/./x", "'.' and '..' segments are not allowed"),
    ("secret//x", "empty segments ('//') are not allowed"),
    ("secret/a+b", "'+' matches one whole segment: write it alone between '/'"),
    ("secret/*/x", "'*' is a glob only as the last character of a path"),
])
def test_syntax_problems_are_named_with_an_example(path: str, why: str) -> None:
    assert vault_path_problem(path, MOUNTS) == f"{path!r}: {why}; {EXAMPLE}"


def test_a_leading_slash_is_outside_the_mounts_not_an_empty_segment() -> None:
    # An empty *first* segment is no '//': the path is simply not under any mount.
    assert vault_path_problem("/secret/data/x", MOUNTS) == (
        "'/secret/data/x' is outside the allowed Vault mounts (secret/, kv/soc/); start it "
        f"with one of them, {EXAMPLE}, or have the operator allow the mount "
        "(--vault-allowed-mount)")


def test_only_braces_make_a_template() -> None:
    # Letters are literal: a path that starts with no mount is outside, not "anything".
    assert vault_path_problem("XX/data", MOUNTS).startswith("'XX/data' is outside")
    assert vault_path_problem("{{identity.entity.id}}/x", MOUNTS).startswith(
        "'{{identity.entity.id}}/x' could reach Vault's control plane")


# -- a class's path: what it could reach

def test_a_path_that_could_reach_managed_objects_says_so() -> None:
    assert vault_path_problem("+/policies/*", MOUNTS) == (
        "'+/policies/*' could reach Vault's control plane: sys/ (policies, mounts, audit "
        "devices), auth/ (token roles, token creation), identity/ (entities, the kill "
        "switch), including other classes' credbroker-* policies and token roles; write a "
        f"path under an allowed mount (secret/, kv/soc/), {EXAMPLE}")


def test_a_path_that_reaches_the_control_plane_but_no_managed_object() -> None:
    assert vault_path_problem("auth/userpass/*", MOUNTS) == (
        "'auth/userpass/*' could reach Vault's control plane: auth/ (token roles, token "
        f"creation); write a path under an allowed mount (secret/, kv/soc/), {EXAMPLE}")


def test_a_wildcard_before_any_mount_could_match_paths_outside() -> None:
    assert vault_path_problem("+/data/x", MOUNTS) == (
        "'+/data/x' could reach Vault's control plane: sys/ (policies, mounts, audit "
        "devices), auth/ (token roles, token creation), identity/ (entities, the kill "
        f"switch); write a path under an allowed mount (secret/, kv/soc/), {EXAMPLE}")
    assert vault_path_problem("kv/+/x", MOUNTS) == (
        "'kv/+/x' could match paths outside the allowed Vault mounts (secret/, kv/soc/); "
        f"start it with one of them, {EXAMPLE}, or have the operator allow the mount "
        "(--vault-allowed-mount)")


def test_many_one_segment_wildcards_are_judged_like_one() -> None:
    # 400 '+' segments: each can take any length, yet only one way on survives each.
    path = "/".join(["+"] * 400) + "/x"
    assert vault_path_problem(path, MOUNTS).startswith(f"{path!r} could reach Vault's control")
    assert vault_path_problem("secret/" + "/".join(["+"] * 400), MOUNTS) == ""
