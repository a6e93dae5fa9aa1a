"""The code base stays clean under the ruff configuration in pyproject.toml."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
    cmd = [sys.executable, "-m", "ruff"] if shutil.which("ruff") is None else ["ruff"]
    result = subprocess.run([*cmd, "check", str(ROOT)], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_python_apis_messages_speak_in_keywords_not_flags():
    """An exception raised outside ``tools/`` names keyword arguments (``overwrite=True``),
    never the command line's flags (``--overwrite``): the CLI says those
    (``tools.outputs.in_flags``)."""
    import ast
    import re

    flag = re.compile(r"(?<![\w-])--[a-z][a-z-]+")
    found = []
    for path in sorted((ROOT / "ray_convrfm").rglob("*.py")):
        if "tools" in path.relative_to(ROOT / "ray_convrfm").parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and node.exc is not None:
                texts = [c.value for c in ast.walk(node.exc)
                         if isinstance(c, ast.Constant) and isinstance(c.value, str)]
                found += [f"{path.relative_to(ROOT)}:{node.lineno}: {t!r}" for t in texts
                          if flag.search(t)]
    assert not found, "\n".join(found)
