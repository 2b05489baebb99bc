"""The README's Python examples, taken from README.md itself and run as
written in a fresh interpreter, in a directory holding the `my_code/` and
`held_out/` they name, so the README and the code cannot drift apart."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from crystalline import checkpoint
from commandline import cli

README = Path(__file__).resolve().parents[1] / "README.md"
STDLIB = Path(sysconfig.get_paths()["stdlib"])


def python_blocks() -> list[str]:
    """The ```python blocks of README.md, in order."""
    return re.findall(r"^```python\n(.*?)^```$", README.read_text(), re.S | re.M)


def test_readme_python_examples_run_as_written(tmp_path, env):
    blocks = python_blocks()
    assert any("crystalline.train(" in block for block in blocks), "README.md lost its Python API example"
    shutil.copytree(STDLIB / "json", tmp_path / "my_code")
    (tmp_path / "held_out").mkdir()
    shutil.copy(STDLIB / "textwrap.py", tmp_path / "held_out")
    for block in blocks:
        r = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, f"{block}\n{r.stderr}"
        if "crystalline.train(" not in block:
            continue
        # what the API example prints: the run's final loss and checkpoint, a sample, the bits per byte
        lines = r.stdout.splitlines()
        final_loss, ckpt = lines[0].split(" ", 1)
        run_dir = (tmp_path / ckpt).parent
        losses = [json.loads(line)["loss"] for line in (run_dir / checkpoint.METRICS).read_text().splitlines()]
        assert float(final_loss) == losses[-1] < losses[0] - 1.0
        assert checkpoint.load(tmp_path / ckpt).state.step == len(losses)
        evaluated = cli(["eval", ckpt, "held_out/", "--no-progress"], env, cwd=tmp_path)
        assert evaluated.returncode == 0, evaluated.stderr
        assert f"bits/byte   {float(lines[-1]):.4f}" in evaluated.stdout
