"""Mutation testing helpers around mutmut (``make mutation``; see docs/mutation.md).

``python -m tests.mutation summary [DIR ...]``
    Reads mutmut's result files (``<DIR>/mutants/**/*.py.meta``; default: this
    checkout and the integration phase's directory) and prints, per mutated module,
    killed / timeout / survived / no-tests / equivalent and the score. A mutant counts
    as killed if any phase killed it. Equivalent mutants are the ones listed in
    docs/mutation.md, each with its reason.

``python -m tests.mutation integration [--sample N] [--seed S] [--max-minutes M] [--module PATH]``
    The second phase: the adapter mutants the unit phase left alive (survived, or no
    unit test reaches them), run against the real-server integration tests that
    exercise them. mutmut has one configuration per directory and resets every result
    when the test selection changes, so this phase runs in its own directory
    (``.mutation-integration/``, symlinks to the code and tests plus a generated
    ``pyproject.toml``) and never touches the unit phase's results. Each mutant starts
    its own OpenBao, so the phase samples N of them (seeded) rather than running all.
    ``--module`` (repeatable) samples only those of INTEGRATION_MODULES; ``--tests``
    (repeatable) runs only those integration test files (a new selection resets the
    directory's results).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INTEGRATION_DIR = ROOT / ".mutation-integration"
EQUIVALENTS_DOC = ROOT / "docs" / "mutation.md"

#: The modules whose surviving mutants the integration phase samples, and the
#: integration test files that exercise them (each starts a real OpenBao).
INTEGRATION_MODULES = ["broker/adapters/vault.py", "broker/app/responder.py", "sidecar/app.py"]
INTEGRATION_TESTS = [
    "tests/integration/test_broker.py",
    "tests/integration/test_revocation.py",
    "tests/integration/test_sidecar.py",
    "tests/integration/test_kill_switch_isolated.py",
    "tests/integration/test_freeze_push.py",
    "tests/integration/test_vault_policy.py",
    "tests/integration/test_vault_drift.py",
    "tests/integration/test_vault_adapter_exact.py",
    "tests/integration/test_responder_exact.py",
    "tests/integration/test_responder_environments.py",
]

# mutmut's exit-code vocabulary (mutmut.stats.status_by_exit_code, 3.8).
KILLED = {1, 3}
TIMEOUT = {36, 24, -24, 152, 255}
SURVIVED = {0}
NO_TESTS = {5, 33}
NOT_CHECKED = {None}

_EQUIVALENT = re.compile(r"^- `(?P<name>[^`]+__mutmut_\d+)` *[—-]+ *(?P<why>\S.*)$")


def equivalents() -> dict[str, str]:
    """Mutant name -> one-line reason, from docs/mutation.md."""
    if not EQUIVALENTS_DOC.exists():
        return {}
    out = {}
    for line in EQUIVALENTS_DOC.read_text().splitlines():
        m = _EQUIVALENT.match(line.strip())
        if m:
            out[m["name"]] = m["why"]
    return out


def load_results(base: Path) -> dict[str, dict[str, int | None]]:
    """Source path -> {mutant name: exit code} from one mutmut directory."""
    out: dict[str, dict[str, int | None]] = {}
    mutants = base / "mutants"
    for meta in sorted(mutants.rglob("*.py.meta")):
        source = str(meta.relative_to(mutants))[: -len(".meta")]
        out[source] = json.loads(meta.read_text())["exit_code_by_key"]
    return out


def merged_results(bases: list[Path]) -> dict[str, dict[str, int | None]]:
    """Every phase's verdicts together: killed anywhere wins, else the last phase that
    ran the mutant, else the first phase's verdict."""
    merged: dict[str, dict[str, int | None]] = {}
    for base in bases:
        for source, codes in load_results(base).items():
            into = merged.setdefault(source, {})
            for name, code in codes.items():
                old = into.get(name)
                if name not in into or (old not in KILLED and code is not None):
                    into[name] = code
    return merged


def status(code: int | None) -> str:
    if code in KILLED:
        return "killed"
    if code in TIMEOUT:
        return "timeout"
    if code in SURVIVED:
        return "survived"
    if code in NO_TESTS:
        return "no tests"
    if code in NOT_CHECKED:
        return "not checked"
    return "other"


def summary(bases: list[Path], *, show_survivors: bool = False) -> int:
    eq = equivalents()
    results = merged_results([b for b in bases if (b / "mutants").is_dir()])
    if not results:
        print("no mutmut results found; run `make mutation` first", file=sys.stderr)
        return 1
    cols = ["killed", "timeout", "survived", "no tests", "equivalent", "not checked", "other"]
    print(f"{'module':<28}{'mutants':>8}" + "".join(f"{c:>12}" for c in cols) + f"{'score':>8}")
    totals: collections.Counter[str] = collections.Counter()
    left: list[str] = []
    for source, codes in sorted(results.items()):
        c: collections.Counter[str] = collections.Counter()
        for name, code in codes.items():
            s = "equivalent" if name in eq and code not in KILLED else status(code)
            c[s] += 1
            if s in ("survived", "no tests"):
                left.append(f"{name}: {s}")
        c["mutants"] = len(codes)
        totals.update(c)
        print(_row(source, c, cols))
    print(_row("TOTAL", totals, cols))
    print("score = (killed + timeout) / (mutants - equivalent - not checked); "
          "'no tests' counts against the score")
    if show_survivors:
        print("\n".join(left))
    return 0


def _row(label: str, c: collections.Counter[str], cols: list[str]) -> str:
    judged = c["mutants"] - c["equivalent"] - c["not checked"]
    score = f"{100 * (c['killed'] + c['timeout']) / judged:.1f}%" if judged else "-"
    return f"{label:<28}{c['mutants']:>8}" + "".join(f"{c[k]:>12}" for k in cols) + f"{score:>8}"


def _toml_value(v: object) -> str:
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(v)


def _prepare_integration_dir(tests: list[str] | None = None,
                             modules: list[str] | None = None) -> None:
    INTEGRATION_DIR.mkdir(exist_ok=True)
    for name in ("broker", "sidecar", "tests", "README.md", "docs", "k8s", "proto"):
        link = INTEGRATION_DIR / name
        if not link.exists():
            link.symlink_to(ROOT / name)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    mut = dict(project["tool"]["mutmut"])
    mut["only_mutate"] = modules or INTEGRATION_MODULES
    mut["pytest_add_cli_args_test_selection"] = tests or INTEGRATION_TESTS
    mut["also_copy"] = [p for p in mut.get("also_copy", []) if (INTEGRATION_DIR / p).exists()]
    # A mutant that hangs a real server waits on sockets, not the CPU: bound wall time.
    mut.setdefault("timeout_multiplier", 3.0)
    lines = ["# generated by tests/mutation.py from ../pyproject.toml; do not edit"]
    for table, values in (("tool.pytest.ini_options", project["tool"]["pytest"]["ini_options"]),
                          ("tool.mutmut", mut)):
        lines.append(f"[{table}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    (INTEGRATION_DIR / "pyproject.toml").write_text("\n".join(lines) + "\n")


def integration(sample: int, seed: int, max_minutes: float, max_children: int,
                modules: list[str] | None = None, tests: list[str] | None = None) -> int:
    unit = load_results(ROOT)
    if not unit:
        print("run the unit phase first (`make mutation`)", file=sys.stderr)
        return 1
    unknown = [m for m in modules or [] if m not in INTEGRATION_MODULES]
    if unknown:
        print(f"--module {', '.join(unknown)}: not one of {', '.join(INTEGRATION_MODULES)}",
              file=sys.stderr)
        return 2
    eq = equivalents()
    alive = sorted(name for source in (modules or INTEGRATION_MODULES)
                   for name, code in unit.get(source, {}).items()
                   if code in SURVIVED | NO_TESTS and name not in eq)
    done = load_results(INTEGRATION_DIR)
    already = {n for codes in done.values() for n, c in codes.items() if c is not None}
    todo = [n for n in alive if n not in already]
    chosen = sorted(random.Random(seed).sample(todo, min(sample, len(todo))))  # noqa: S311
    print(f"integration phase: {len(alive)} adapter mutants left alive by the unit phase, "
          f"{len(already)} already run here, running a sample of {len(chosen)} (seed {seed})")
    if not chosen:
        return 0
    _prepare_integration_dir(tests, modules)
    cmd = [sys.executable, "-m", "mutmut", "run", "--max-children", str(max_children), *chosen]
    try:
        subprocess.run(cmd, cwd=INTEGRATION_DIR, timeout=max_minutes * 60, check=False)
    except subprocess.TimeoutExpired:
        print(f"stopped after {max_minutes} minutes; finished mutants keep their verdicts")
    return 0


def run_sample(per_module: int, seed: int, modules: list[str], max_children: int,
               recheck: list[str]) -> int:
    """The unit phase on a budget: up to ``per_module`` unchecked mutants of each module
    (all of them where fewer are left), seeded, plus every mutant named in ``recheck``
    (globs allowed: re-run after adding tests). Needs one full ``mutmut run`` first,
    or at least its mutant generation, so the names exist."""
    results = load_results(ROOT)
    chosen: list[str] = []
    for source, codes in sorted(results.items()):
        if modules and source not in modules:
            continue
        unchecked = sorted(n for n, c in codes.items() if c is None)
        chosen += random.Random(seed).sample(unchecked, min(per_module, len(unchecked)))  # noqa: S311
    chosen += recheck
    if not chosen:
        print("nothing left to check")
        return 0
    print(f"running {len(chosen)} mutants")
    cmd = [sys.executable, "-m", "mutmut", "run", "--max-children", str(max_children), *chosen]
    return subprocess.run(cmd, cwd=ROOT, check=False).returncode


def clean() -> None:
    shutil.rmtree(ROOT / "mutants", ignore_errors=True)
    shutil.rmtree(INTEGRATION_DIR, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.mutation")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("summary")
    s.add_argument("dirs", nargs="*", type=Path, default=[ROOT, INTEGRATION_DIR])
    s.add_argument("--survivors", action="store_true", help="list every mutant left alive")
    i = sub.add_parser("integration")
    i.add_argument("--sample", type=int, default=int(os.environ.get("MUTATION_SAMPLE", "30")))
    i.add_argument("--seed", type=int, default=18)
    i.add_argument("--max-minutes", type=float, default=45.0)
    i.add_argument("--max-children", type=int, default=1)
    i.add_argument("--module", action="append", default=[],
                   help="only this module's mutants, e.g. broker/app/responder.py")
    i.add_argument("--tests", action="append", default=[],
                   help="run only these of INTEGRATION_TESTS (changing the selection resets "
                        "the directory's results)")
    r = sub.add_parser("sample")
    r.add_argument("--per-module", type=int, default=100)
    r.add_argument("--seed", type=int, default=18)
    r.add_argument("--module", action="append", default=[], help="e.g. broker/core/scopemap.py")
    r.add_argument("--max-children", type=int, default=2)
    r.add_argument("--recheck", action="append", default=[], help="mutant name or glob")
    sub.add_parser("clean")
    a = p.parse_args(argv)
    if a.cmd == "summary":
        return summary(a.dirs, show_survivors=a.survivors)
    if a.cmd == "integration":
        return integration(a.sample, a.seed, a.max_minutes, a.max_children, a.module, a.tests)
    if a.cmd == "sample":
        return run_sample(a.per_module, a.seed, a.module, a.max_children, a.recheck)
    clean()
    return 0


if __name__ == "__main__":
    sys.exit(main())
