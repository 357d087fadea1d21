"""README's Python examples run as written: every ```python block, in order, in one namespace.

(Blocks fenced ```py show calls that need a network or a trained run, and are not run.)
"""

import re
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_readme_examples_run(tmp_path, monkeypatch):
    blocks = python_blocks()
    assert len(blocks) >= 7  # the model example and the utilities
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i}", "exec"), namespace)
    assert namespace["logits"].shape == (1, 4, 1000)  # the model example ran
