"""Write docs/troubleshooting.md from the code that words every reason a snapshot can fail or be refused with.

    python scripts/troubleshooting.py            # rewrite docs/troubleshooting.md
    python scripts/troubleshooting.py --check    # exit 1 if the page is not what the code says (tests run it)

Two sources, both read from the package itself, never copied: the drive and share errors
(``fserrors``' tables: what each errno means and what to do), and every sentence the package
hands to the exceptions and results that carry a snapshot's failure, refusal or skip (found in
its syntax tree, parts that depend on the file shown as ``…``). A reason added to the code
changes the page, so the tests fail until it is regenerated.
"""

from __future__ import annotations

import ast
import errno
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dlc_snapshot_fix"
PAGE = ROOT / "docs" / "troubleshooting.md"

CARRIERS = {
    "SnapshotReadError": "a snapshot that cannot be read",
    "RefusedSnapshotError": "a snapshot refused before anything of it runs",
    "ArchiveTrickError": "a snapshot refused before anything of it runs",
    "SnapshotFormatError": "a file that is not a snapshot DeepLabCut made",
    "KeyCollisionError": "keys that would collide",
    "NotEnoughSpaceError": "the drive",
    "FileSystemGoneError": "the drive",
    "ReadBackError": "the new file read back",
    "ProjectError": "the project",
    "ProjectBusyError": "the project",
    "ManifestError": "the project",
    "AdaptRefusedError": "adapt",
    "SkippedPath": "paths left alone",
    "ModelCheck": "DeepLabCut's verdict",
    "reason": "the drive",
}
"""The exceptions and results whose words reach the user as a snapshot's (or a project's) reason, by name,
with the section of the page each goes to. ``reason`` is ``fserrors.reason(error, failed, state, advice)``."""

SECTIONS = [
    "a snapshot that cannot be read",
    "a snapshot refused before anything of it runs",
    "a file that is not a snapshot DeepLabCut made",
    "keys that would collide",
    "DeepLabCut's verdict",
    "the new file read back",
    "the drive",
    "the project",
    "paths left alone",
    "adapt",
    "while a snapshot was handled",
]
PLACEHOLDER = "…"


def _constants(tree: ast.Module) -> dict[str, str]:
    """Module-level names bound to a string (advice shared by several reasons)."""
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            text = _words(node.value, {})
            if text and PLACEHOLDER not in text:
                found[node.targets[0].id] = text
    return found


def _words(node: ast.AST, names: dict[str, str]) -> str | None:
    """The text an expression makes, ``…`` for what depends on the file; None if it holds no words at all."""
    if isinstance(node, ast.Constant):
        return node.value if isinstance(node.value, str) else None
    if isinstance(node, ast.JoinedStr):
        return "".join(
            part.value if isinstance(part, ast.Constant) else PLACEHOLDER for part in node.values
        )  # FormattedValue parts
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _words(node.left, names), _words(node.right, names)
        if left is None and right is None:
            return None
        return (left or PLACEHOLDER) + (right or PLACEHOLDER)
    if isinstance(node, ast.Name) and node.id in names:
        return names[node.id]
    if isinstance(node, ast.IfExp):
        body, orelse = _words(node.body, names), _words(node.orelse, names)
        return body or orelse
    return None


def _callee(call: ast.Call) -> str | None:
    if isinstance(call.func, ast.Name):
        return call.func.id
    if isinstance(call.func, ast.Attribute):
        return call.func.attr
    return None


def _is_sentence(text: str) -> bool:
    """Words a person reads (not a status name, a path or a bare placeholder)."""
    return len(text.replace(PLACEHOLDER, " ").split()) >= 3


def _trees() -> list[ast.Module]:
    return [
        ast.parse(source.read_text(encoding="utf-8"))
        for source in sorted(PACKAGE.glob("*.py"))
        if source.name != "testing.py"  # makes broken snapshots for tests; says nothing to users
    ]


def _carriers(trees: list[ast.Module]) -> dict[str, str]:
    """CARRIERS and the private helpers that word a reason for one (``_beyond(path, why)``), to a fixpoint."""
    carriers = dict(CARRIERS)
    grew = True
    while grew:
        grew = False
        for function in (n for tree in trees for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
            if not function.name.startswith("_") or function.name.startswith("__") or function.name in carriers:
                continue
            parameters = {argument.arg for argument in function.args.args}
            for call in (n for n in ast.walk(function) if isinstance(n, ast.Call) and _callee(n) in carriers):
                if any(isinstance(a, ast.Name) and a.id in parameters for a in call.args):
                    carriers[function.name] = carriers[_callee(call)]
                    grew = True
                    break
    return carriers


def reasons() -> dict[str, set[str]]:
    """Every reason sentence in the package, by section."""
    found: dict[str, set[str]] = {section: set() for section in SECTIONS}
    trees = _trees()
    carriers = _carriers(trees)
    shared = {name: text for tree in trees for name, text in _constants(tree).items()}  # imported constants too
    for tree in trees:
        names = {**shared, **_constants(tree)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _callee(node) in carriers:
                section = carriers[_callee(node)]
                for argument in [*node.args, *(k.value for k in node.keywords)]:
                    text = _words(argument, names)
                    if text and _is_sentence(text):
                        found[section].add(text)
            elif isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Attribute) and t.attr == "reason" for t in node.targets
            ):
                text = _words(node.value, names)
                if text and _is_sentence(text):
                    found["while a snapshot was handled"].add(text)
            elif isinstance(node, ast.FunctionDef) and node.name.endswith("_reason"):  # words a failure it is handed
                for returned in (n.value for n in ast.walk(node) if isinstance(n, ast.Return) and n.value):
                    text = _words(returned, names)
                    if text and _is_sentence(text):
                        found["while a snapshot was handled"].add(text)
    return found


def _drive_table() -> list[str]:
    sys.path.insert(0, str(ROOT))
    from dlc_snapshot_fix import fserrors

    def posix_name(code: int) -> str:  # ENOTCONN, not Windows' errorcode name for the same value (WSAENOTCONN)
        return min(name for name in dir(errno) if name.startswith("E") and getattr(errno, name) == code)

    rows = ["| the system said | in words | what to do |", "| --- | --- | --- |"]
    for code, (meaning, advice) in sorted(fserrors._MEANINGS.items(), key=lambda item: posix_name(item[0])):
        rows.append(f"| `{posix_name(code)}` | {meaning} | {advice} |")
    for code, (meaning, advice) in sorted(fserrors._WINDOWS_MEANINGS.items()):
        rows.append(f"| `WinError {code}` (Windows) | {meaning} | {advice} |")
    for when, (meaning, advice) in (
        ("`WinError 5` on a file with the read-only attribute (Windows)", fserrors._READ_ONLY_FILE),
        ("`WinError 3` or `206` on a path of 260 characters or more (Windows)", fserrors._LONG_PATH),
    ):
        rows.append(f"| {when} | {meaning} | {advice} |")
    return [row.replace("\\", "\\\\") if "C:\\" in row else row for row in rows]


def render(found: dict[str, set[str]]) -> str:
    lines = [
        "# Troubleshooting",
        "",
        "Every reason the tool can give for a snapshot it could not fix, a file it refused or a path it left",
        "alone, with what to do (most reasons end with it). Search this page for the words your run printed;",
        f"`{PLACEHOLDER}` stands for what depends on your file (a path, a number, a name). The page is generated",
        "from the code that words each reason (`python scripts/troubleshooting.py`), and a test fails when the",
        "code says something the page does not. A snapshot that failed is left as it was (or put back), the",
        "other snapshots are still handled, and the run exits 3; `--debug` adds the traceback. What each status",
        "and exit code means: [](fixing.md).",
        "",
        "## When a drive or a share refuses",
        "",
        "A step that meets an error from the operating system says which step it was, what the error means,",
        "whether the snapshot was changed, and what to do:",
        "",
        *_drive_table(),
        "",
    ]
    for section, texts in found.items():
        if not texts:
            continue
        lines += [f"## {section[0].upper()}{section[1:]}", ""]
        lines += [f"- {_markdown(text)}" for text in sorted(texts, key=str.lower)]
        lines.append("")
    return "\n".join(lines)


def _markdown(text: str) -> str:
    """A reason as a list item: literally (no Markdown in it), on one line."""
    return "``" + " ".join(text.split()).replace("``", "` `") + "``"


if __name__ == "__main__":
    found = reasons()
    page = render(found)
    if "--check" in sys.argv:
        if PAGE.read_text(encoding="utf-8") != page:
            print(f"{PAGE} is not what the code says: run python scripts/troubleshooting.py", file=sys.stderr)
            sys.exit(1)
    else:
        PAGE.write_text(page, encoding="utf-8")
        print(f"wrote {PAGE}: {sum(len(t) for t in found.values())} reasons")
