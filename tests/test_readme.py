"""The README's two set-up commands stay what CI runs."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands():
    lines = ROOT.joinpath("README.md").read_text().splitlines()
    return [line.strip() for line in lines[:20] if line.startswith("    python3 -m venv")]


def test_readme_opens_with_two_setup_commands_and_ci_runs_the_second():
    commands = _readme_commands()
    assert len(commands) == 2, commands
    assert commands[0].endswith("npr pipeline") and "pytest" in commands[1]
    ci = ROOT.joinpath(".ci", "run").read_text().splitlines()
    assert commands[1] in ci, "`.ci/run` must run the README's test command verbatim"
