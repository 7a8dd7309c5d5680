"""Every script in examples/ says how to launch it and is run by a test, so none of them rots.

The runs themselves live next to what they exercise (examples/ddp_torchrun.py: tests/test_integrations.py,
two gloo ranks compared with one process); this file fails when an example is added without one.
"""
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples").glob("*.py"))


def test_there_are_examples():
    assert EXAMPLES, "examples/ is empty"


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_is_documented_and_run_by_a_test(example):
    import ast

    doc = ast.get_docstring(ast.parse(example.read_text()))
    assert doc and f"examples/{example.name}" in doc, f"{example.name}: its docstring must show the command"
    runners = [t for t in (REPO / "tests").glob("test_*.py")
               if t.name != "test_examples.py" and f'"examples" / "{example.name}"' in t.read_text()]
    assert runners, f"no test runs examples/{example.name}"
    docs = [p for p in (REPO / "docs").glob("*.md") if f"examples/{example.name}" in p.read_text()]
    assert docs, f"examples/{example.name} is not mentioned in docs/"
