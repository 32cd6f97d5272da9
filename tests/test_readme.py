"""The README's commands are the ones CI runs."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    command = next(line for line in ci_lines if "pytest" in line)
    readme_lines = (ROOT / "README.md").read_text().splitlines()
    assert command in readme_lines


def test_readme_main_command_builds_the_extension_where_it_imports_from():
    """`python -m fastkd.bench` run from the checkout's root imports its fastkd/ folder, not
    site-packages: a plain `pip install .` would leave the benchmark without the C++ kernel."""
    readme_lines = (ROOT / "README.md").read_text().splitlines()
    command = next(line for line in readme_lines if line.endswith("python -m fastkd.bench"))
    install = next(step for step in command.split(" && ") if "--no-build-isolation" in step)
    assert install.split()[-2:] == ["-e", "."], install
