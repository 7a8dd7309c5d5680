"""Every code block of README.md and docs/*.md runs as written, so the documentation stays true.

Rules (also stated in docs/index.md):
- ```python blocks of one page run in order in one namespace, in a scratch working directory;
- a ```python block preceded by ``<!-- gpu: reason -->`` runs only where CUDA is available;
- a block in any other language (shell commands) must be followed by ``<!-- not-run: reason -->`` naming
  what covers it instead; a reason that names a test (``tests/x.py::name``) must name an existing one.

Also checked: relative links point at files that exist, no page cites material outside the repository,
and the README's hand-written part stays short.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n(?:\s*<!-- not-run: (.+?) -->)?", re.S | re.M)
GPU = re.compile(r"<!-- gpu: (.+?) -->\s*$")


def _blocks(page: Path):
    text = page.read_text()
    for m in FENCE.finditer(text):
        before = text[:m.start()].rstrip("\n").splitlines()[-1:] or [""]
        gpu = GPU.search(before[0])
        yield m.group(1), m.group(2), m.group(3), (gpu.group(1) if gpu else None), text[:m.start()].count("\n") + 1


def _id(page):
    return str(page.relative_to(REPO))


@pytest.mark.parametrize("page", PAGES, ids=_id)
def test_python_blocks_run(page, tmp_path, monkeypatch):
    blocks = [b for b in _blocks(page) if b[0] == "python"]
    if not blocks:
        pytest.skip(f"{_id(page)} has no python block")
    monkeypatch.chdir(tmp_path)  # examples that write files (checkpoints, logs) write them here
    monkeypatch.syspath_prepend(str(REPO))
    ns = {"__name__": f"docs_{page.stem}"}
    for _, code, _, gpu, line in blocks:
        if gpu and not torch.cuda.is_available():
            continue  # the reason is printed in the page itself
        try:
            exec(compile(code, f"{_id(page)}:{line}", "exec"), ns)
        except Exception as exc:
            raise AssertionError(f"{_id(page)} line {line}: the block does not run as written: "
                                 f"{type(exc).__name__}: {exc}") from exc
    if page.name == "README.md":
        k = torch.stack(list(ns["bal"].coefficients.values()))
        assert ((k > 0) & (k <= 1)).all() and (k < 1).any()  # OGM-GE damped the dominant modality


@pytest.mark.parametrize("page", PAGES, ids=_id)
def test_other_blocks_say_what_covers_them(page):
    for lang, _, reason, gpu, line in _blocks(page):
        if lang == "python":
            continue
        assert reason, (f"{_id(page)} line {line}: a ```{lang} block is not executed; add "
                        "'<!-- not-run: <what covers it> -->' right after it")
        for test in re.findall(r"(tests/[\w/]+\.py)(?:::(\w+))?", reason):
            path, name = REPO / test[0], test[1]
            assert path.exists(), f"{_id(page)} line {line}: {test[0]} does not exist"
            if name:
                assert f"def {name}(" in path.read_text(), f"{_id(page)} line {line}: no test {name} in {test[0]}"


@pytest.mark.parametrize("page", PAGES, ids=_id)
def test_links_and_sources(page):
    text = page.read_text()
    assert "SPEC" not in re.sub(r"<!-- (demo|bench):begin -->.*?<!-- (demo|bench):end -->", "", text, flags=re.S), \
        f"{_id(page)} cites a document that is not part of the repository"
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        assert (page.parent / target).exists(), f"{_id(page)} links to {target}, which does not exist"


def test_readme_stays_short():
    text = (REPO / "README.md").read_text()
    for marker in ("demo", "bench"):  # the generated sections keep their markers
        assert f"<!-- {marker}:begin -->" in text and f"<!-- {marker}:end -->" in text
    hand = re.sub(r"<!-- (demo|bench):begin -->.*?<!-- (demo|bench):end -->", "", text, flags=re.S)
    assert len(hand.splitlines()) <= 200
