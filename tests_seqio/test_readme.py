"""The README's T5X / seqio example runs as printed, on demo data built here (no cached demo directory)."""

import contextlib
import io
import re
from pathlib import Path

import pytest

pytest.importorskip("seqio", reason="the seqio extra is not installed (make test-seqio installs it)")

from generation import demo as build  # noqa: E402
from megadoc_jax.data import demo  # noqa: E402

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_example() -> str:
    section = README.read_text().split("## T5X / seqio", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    return code


def test_readme_example_iterates_packed_batches(tmp_path, monkeypatch):
    monkeypatch.setenv(demo.DEMO_DIR_VARIABLE, str(tmp_path / "demo"))
    build.ensure_demo_stores(tmp_path / "demo")
    import seqio

    seqio.TaskRegistry.remove("megadoc_demo")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(readme_example(), str(README), "exec"), {})
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    for line in lines:
        assert "'decoder_target_tokens': (8, 256)" in line and "'decoder_segment_ids': (8, 256)" in line
        assert 0 < int(line.rsplit("}", 1)[1].split()[0]) <= 8 * 256
