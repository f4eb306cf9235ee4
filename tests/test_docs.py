"""The Python snippets of README.md and docs/*.md run as written, offline: the docs match the code.

Every ```python block of a file runs, in order, in one namespace per file (as doctest does), in a
scratch folder holding what the snippets name: task files at `runs/clipart-gps/delta.safetensors`,
`task.safetensors`, `runs/pets/...` and `runs/cars/...` (GPS on the test ViT at 32 px, three
classes), images `a.jpg` and `b.png`, and the names `base` and `my_base` (that test ViT) and `x`
(three images for it). A block that cannot run here (a download, a fragment of the reader's own
program, a task file of another kind) is preceded by the line

    <!-- doctest: skip (the reason) -->

which a Markdown viewer does not show. A block naming an offline backbone or a mini-vtab task that
is not in the cache skips its file (`make test` fetches them).
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import toy_base, write_png, write_task

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP = re.compile(r"^<!--\s*doctest:\s*skip\b\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^```python\s*$")


@dataclass
class Snippet:
    path: Path
    line: int  # of the opening fence, 1-based
    code: str
    skip: str | None  # the reason, when marked


def snippets(path: Path, text: str | None = None) -> list[Snippet]:
    """The ```python blocks of a Markdown file, each with its skip marker's reason (None: it runs)."""
    lines = (path.read_text() if text is None else text).splitlines()
    out, i = [], 0
    while i < len(lines):
        if FENCE.match(lines[i]):
            before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            marker = SKIP.match(before.strip())
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), len(lines))
            reason = (marker.group(1).strip("() ") or "marked") if marker else None
            out.append(Snippet(path, i + 1, "\n".join(lines[i + 1:end]), reason))
            i = end
        i += 1
    return out


def run_snippets(found: list[Snippet], namespace: dict) -> int:
    """Run the unmarked snippets in order in `namespace`; returns how many ran. A failing one fails
    the test naming its file and line."""
    ran = 0
    for s in found:
        if s.skip is not None:
            continue
        try:
            exec(compile(textwrap.dedent(s.code), f"{s.path.name}:{s.line}", "exec"), namespace)
        except Exception as err:  # noqa: BLE001 - any failure of a documented snippet is the finding
            pytest.fail(f"{s.path.relative_to(ROOT)}:{s.line}: the snippet fails: {type(err).__name__}: {err} "
                        "(fix the docs or the code; a snippet that cannot run offline gets "
                        "`<!-- doctest: skip (why) -->` on the line before it)", pytrace=False)
        ran += 1
    return ran


def _missing_cache(found: list[Snippet]) -> str | None:
    """An offline backbone or mini-vtab task the runnable snippets name that is not cached."""
    from sparseft.data.tasks import is_complete, suite_dir
    from sparseft.hub import REGISTRY, cached_weights

    code = "\n".join(s.code for s in found if s.skip is None)
    for name in REGISTRY:
        if re.search(rf"\b{re.escape(name)}\b", code) and cached_weights(name) is None:
            return f"{name} is not cached (sparseft weights fetch {name})"
    for task in re.findall(r"mini-vtab/(\w+)", code):
        if not is_complete(suite_dir("mini-vtab") / task):
            return f"mini-vtab/{task} is not provisioned (sparseft data fetch mini-vtab --tasks {task})"
    return None


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """The files the docs name, written once."""
    root = tmp_path_factory.mktemp("docs")
    for rel, seed in (("runs/clipart-gps/delta.safetensors", 1), ("task.safetensors", 2),
                      ("runs/pets/delta.safetensors", 3), ("runs/cars/delta.safetensors", 4)):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        write_task("gps", root / rel, seed=seed)
    write_png(root / "a.jpg.png", value=1, size=40).rename(root / "a.jpg")
    write_png(root / "b.png", value=2, size=28)
    return root


@pytest.mark.parametrize("path", [p for p in DOCS if snippets(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_the_python_snippets_of_the_docs_run(path, scratch, monkeypatch):
    found = snippets(path)
    missing = _missing_cache(found)
    if missing:
        pytest.skip(missing)
    monkeypatch.chdir(scratch)
    # the docs export real ViTs' GPS tasks, whose patch embedding is ~1 % of the model; the test ViT's is 16 %
    monkeypatch.setattr("sparseft.export.peft.AUTO_DENSE_SHARE", 0.2)
    torch.manual_seed(0)
    namespace = {"__name__": "__docs__", "torch": torch, "base": toy_base(), "my_base": toy_base(),
                 "x": torch.randn(3, 3, 32, 32)}
    ran = run_snippets(found, namespace)
    if not ran:
        pytest.skip(f"every snippet of {path.name} is marked to skip")


def test_a_failing_snippet_is_reported_with_its_file_and_line_and_a_marked_one_is_not_run():
    text = "intro\n\n```python\nvalue = 1\n```\n\n<!-- doctest: skip (needs the network) -->\n```python\n" \
           "raise SystemExit('must not run')\n```\n\n```python\nvalue = missing_name + 1\n```\n"
    found = snippets(ROOT / "README.md", text)
    assert [(s.line, s.skip) for s in found] == [(3, None), (8, "needs the network"), (12, None)]
    namespace: dict = {}
    with pytest.raises(pytest.fail.Exception, match=r"README\.md:12: the snippet fails: NameError: .*missing_name"):
        run_snippets(found, namespace)
    assert namespace["value"] == 1  # the first ran, in the shared namespace
