"""docs/methods.md's map of the workflow: every rule -> its .smk file -> the step module (and mode)
-> the library modules the step imports, built here from the source so the page cannot drift.
`python tests/test_rule_map.py` prints the table."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
SHARED = ("moefy.workflow", "moefy.errors", "moefy.files", "moefy.dist")  # the plumbing every step uses
RULE = re.compile(r"^\s*(?:use rule (\w+) as (\w+)|rule (\w+))", re.M)  # indented: inside an `if`


def rules() -> list[tuple[str, str, str | None, str]]:
    """(rule, .smk file, step module, --mode) for every rule, in file order."""
    found: list[tuple[str, str, str | None, str]] = []
    for smk in sorted((ROOT / "rules").glob("*.smk")):
        text = smk.read_text()
        starts = list(RULE.finditer(text))
        for match, end in zip(starts, [m.start() for m in starts[1:]] + [len(text)]):
            body = text[match.start() : end]
            base, alias, plain = match.groups()
            step = re.search(r'(?:launch|plain)\("(\w+)"\)', body)
            mode = re.search(r"--mode (\w+)", body)
            if alias:  # `use rule base as alias with:` runs the base rule's step
                inherited = next(r for r in found if r[0] == base)
                found.append((alias, smk.name, inherited[2], inherited[3]))
            else:
                found.append((plain, smk.name, step.group(1) if step else None, mode.group(1) if mode else ""))
    return found


def library_imports(step: str) -> list[str]:
    """The library modules `moefy.steps.<step>` imports (the workflow layer and plumbing left out)."""
    tree = ast.parse((SRC / "moefy" / "steps" / f"{step}.py").read_text())
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("moefy"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                module = candidate if (SRC / (candidate.replace(".", "/") + ".py")).exists() else node.module
                if module != "moefy" and not module.startswith(SHARED):
                    modules.add(module.removeprefix("moefy."))
    return sorted(modules)


def table() -> str:
    lines = ["| rule | file | step module | library modules it imports |", "|---|---|---|---|"]
    for rule, smk, step, mode in rules():
        where = f"`moefy.steps.{step}`" + (f" `--mode {mode}`" if mode else "")
        lines.append(f"| {rule} | `rules/{smk}` | {where} | {', '.join(f'`{m}`' for m in library_imports(step))} |")
    return "\n".join(lines)


def test_every_rule_runs_one_step_module():
    assert all(step for _, _, step, _ in rules())
    assert len(rules()) == 34


def test_the_map_in_methods_md_is_the_source_s():
    assert table() in (ROOT / "docs" / "methods.md").read_text(), "regenerate it: python tests/test_rule_map.py"


if __name__ == "__main__":
    print(table())
