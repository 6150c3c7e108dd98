"""The repository reads on its own: every `METHOD.md §N` citation names a heading of docs/METHOD.md, and each concept
file copies out into an empty folder with exactly the files README says it needs, its doctests passing there."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CITATION = re.compile(r"METHOD\.md §(\d+(?:\.\d+)?)")


def sections() -> set[str]:
    """The section numbers of docs/METHOD.md's headings: `## 3. VSPO` is 3, `### 3.4 Value-smoothing` is 3.4."""
    text = (ROOT / "docs" / "METHOD.md").read_text(encoding="utf-8")
    return set(re.findall(r"(?m)^#{2,4} (\d+(?:\.\d+)?)\.? ", text))


def cited_files() -> list[Path]:
    return sorted([*ROOT.glob("*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("benchmarks/*.py"), ROOT / "README.md",
                   *ROOT.glob("docs/*.md"), *ROOT.glob("examples/*.py")])


def test_every_method_citation_names_a_heading():
    known = sections()
    assert {"1", "2", "2.3", "3", "3.4", "4", "4.5", "6"} <= known
    dead = [f"{path.relative_to(ROOT)}:{number}: §{section}"
            for path in cited_files() if path.name != "test_layout.py"
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
            for section in CITATION.findall(line) if section not in known]
    assert not dead, "citations of METHOD.md sections that do not exist:\n" + "\n".join(dead)
    assert sum(len(CITATION.findall(path.read_text(encoding="utf-8"))) for path in cited_files()) > 40


def test_the_citation_check_catches_a_dead_citation():
    assert "9.9" not in sections() and CITATION.findall("see METHOD.md §9.9 there") == ["9.9"]


# The pieces README's "Copying a piece" offers for copying, each with what it needs beside it.
PIECES = {
    "vspo": ["vspo.py"],
    "prs": ["prs.py", "tools.py"],
    "prs_adapters": ["prs_adapters.py", "prs.py", "tools.py"],
    "istar": ["istar.py", "vspo.py"],
    "judge": ["judge.py"],
    "tools": ["tools.py"],
    "rollout": ["rollout.py", "kv_cache.py", "tools.py"],
}


@pytest.mark.parametrize("piece", sorted(PIECES))
def test_each_piece_copies_out_and_its_doctests_pass_there(piece, tmp_path):
    for name in PIECES[piece]:
        shutil.copy(ROOT / name, tmp_path / name)
    # A fresh interpreter in the empty folder: nothing of the repository on its path, only the copied files.
    result = subprocess.run([sys.executable, "-m", "doctest", f"{piece}.py"], cwd=tmp_path, capture_output=True,
                            text=True, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    probe = subprocess.run([sys.executable, "-c", f"import {piece}, sys; print(sorted(sys.modules))"], cwd=tmp_path,
                           capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}, timeout=300)
    loaded = set(eval(probe.stdout))
    project = {path.stem for path in ROOT.glob("*.py")}
    assert loaded & project == {Path(name).stem for name in PIECES[piece]}, "imports beyond what README lists"


@pytest.mark.parametrize("module", sorted(path.stem for path in ROOT.glob("*.py")))
def test_every_modules_examples_hold(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module))
    assert result.failed == 0


def test_readme_lists_what_each_piece_needs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Copying a piece", 1)[1].split("\n## ", 1)[0]
    for piece, files in PIECES.items():
        line = next(line for line in section.splitlines() if line.startswith(f"| `{piece}.py`"))
        assert all(f"`{name}`" in line for name in files), line


def test_method_names_code_that_exists():
    # Under each subsection of METHOD.md an "In code:" line names the functions that implement it; each must exist.
    import importlib

    text = (ROOT / "docs" / "METHOD.md").read_text(encoding="utf-8")
    blocks = re.findall(r"(?ms)^In code: (.*?)(?:\n\n|\Z)", text)
    assert len(blocks) >= 18
    named = [name for block in blocks for name in re.findall(r"`([a-z_]+(?:\.[A-Za-z_]+)+)`", block)]
    missing = []
    for name in named:
        if name.endswith(".py"):  # a file named whole
            missing += [] if (ROOT / name).exists() else [name]
            continue
        module, *attributes = name.split(".")
        target = importlib.import_module(module)
        for attribute in attributes:
            target = getattr(target, attribute, None)
        if target is None:
            missing.append(name)
    assert len(named) > 40 and not missing, missing


def project_imports() -> dict[str, set[str]]:
    """Which of the project's top-level modules each one imports (at module level or inside a function)."""
    import ast

    modules = {path.stem: path for path in ROOT.glob("*.py")}
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):  # imports for type checkers only are never run
            if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
                node.body = []
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module.split(".")[0])
        graph[name] = (found & set(modules)) - {name}
    return graph


def test_no_module_imports_itself_through_others():
    graph = project_imports()

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n))) for n in graph[start])

    circles = sorted(name for name in graph if reaches(name, name))
    assert not circles, f"import circles through {circles}"
    assert graph["rollout"] <= {"kv_cache", "tools"} and graph["tools"] == set()  # what copying each one drags


def test_the_front_page_and_the_files_stay_readable():
    assert (ROOT / "README.md").stat().st_size <= 20_000, "README is a front page: dated figures go to benchmarks/"
    long = {path.name: n for path in [*ROOT.glob("*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("benchmarks/*.py")]
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > 600}
    assert not long, long
