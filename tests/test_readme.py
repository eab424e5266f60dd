"""The README's Python example runs as written, and CI runs exactly the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_python_example_runs_as_written(tmp_path, monkeypatch, capsys):
    example = re.search(r"```python\n(.*?)```", README, re.DOTALL).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "README.md", "exec"), {})
    assert (tmp_path / "out" / "00000-1.png").is_file()
    assert "Seed: 1" in capsys.readouterr().out


def test_ci_runs_the_readme_test_command():
    test_section = README.split("## Test", 1)[1]
    command = re.search(r"```bash\n(.*?)\n```", test_section, re.DOTALL).group(1).strip()
    ci_commands = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
                   if line.strip() and not line.lstrip().startswith("#")]
    assert ci_commands[-1] == command
