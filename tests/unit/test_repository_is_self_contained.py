"""The repository references no file outside itself, and its docs link what exists."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).parents[2]
#: Documents that live outside this repository (and so must not be cited).
OUTSIDE = re.compile(r"DESIGN\.md|\.\./shared\b|(?<![\w./-])shared/")


def _tracked() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                         check=True).stdout
    return [ROOT / p for p in out.decode().split("\0") if p]


def test_no_tracked_file_cites_a_document_outside_the_repository() -> None:
    this = Path(__file__).resolve()
    found = []
    for path in _tracked():
        if path.resolve() == this or not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        found += [f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: "
                  f"{m.group()}" for m in OUTSIDE.finditer(text)]
    assert not found, "references to files outside the repository:\n" + "\n".join(found)


def test_the_readme_links_the_architecture_and_its_local_links_resolve() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "(docs/architecture.md)" in readme
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", doc.read_text()):
            assert (doc.parent / target).exists(), f"{doc.name} links {target}, which is missing"
