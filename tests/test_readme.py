"""The README's Python and editing examples run as written, and CI runs exactly the README's test command."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pipelines  # noqa: F401  (pipelines.erase in sys.modules)
from studio.cli import main

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_python_example_runs_as_written(tmp_path, monkeypatch, capsys):
    example = re.search(r"```python\n(.*?)```", README, re.DOTALL).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "README.md", "exec"), {})
    assert (tmp_path / "out" / "00000-1.png").is_file()
    assert "Seed: 1" in capsys.readouterr().out


def test_editing_examples_run_as_written(tmp_path, monkeypatch, capsys):
    section = README.split("## Editing", 1)[1].split("\n## ", 1)[0]
    example = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    command = re.search(r"```bash\n(.*?)\n```", section, re.DOTALL).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "README.md", "exec"), {})
    assert "Source prompt: a red circle on the left" in capsys.readouterr().out
    assert shlex.split(command)[0] == "studio" and main(shlex.split(command)[1:]) == 0
    assert {p.name for p in (tmp_path / "out" / "edit").glob("*.png")} == {"edited.png", "reconstruction.png",
                                                                          "mask.png"}


def test_ci_runs_the_readme_test_command():
    test_section = README.split("## Test", 1)[1]
    command = re.search(r"```bash\n(.*?)\n```", test_section, re.DOTALL).group(1).strip()
    ci_commands = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
                   if line.strip() and not line.lstrip().startswith("#")]
    assert ci_commands[-1] == command


def test_erase_examples_run_with_fewer_steps(tmp_path, monkeypatch):
    """The erase section's API and first command as written but for the step count (500 steps: the bench's, minutes
    on a CPU): the names, arguments and the membrane they hand to `generate` are right."""
    monkeypatch.setattr(sys.modules["pipelines.erase"], "SAMPLING_STEPS", 6)  # x_t on a shorter schedule
    monkeypatch.setenv("STUDIO_ADAPTER_DIR", str(tmp_path / "library"))
    section = README.split("## Erase a concept", 1)[1].split("\n## ", 1)[0]
    example = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1).replace("steps=500", "steps=2")
    command = re.search(r"```bash\n(.*?)\n", section, re.DOTALL).group(1).replace("--steps 500", "--steps 2")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(example, "README.md", "exec"), scope)
    assert scope["result"].images and (tmp_path / "runs" / "no-triangle" / "erase-triangle.safetensors").is_file()
    assert shlex.split(command)[0] == "studio" and main(shlex.split(command)[1:]) == 0
