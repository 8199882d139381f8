"""The documentation stays true: every ``python cli.py ...`` line in README.md and docs/*.md parses with the
real parser (commands, flags and their values exist), every docs page is linked from the README, and the
quickstart's first steps run on generated data."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _commands(path: Path) -> list[str]:
    """The ``python cli.py`` commands of a page's bash blocks (continuation lines joined, shell variables of the
    same block expanded, comments dropped)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
        block = block.replace("\\\n", " ")
        env = dict(re.findall(r'^([A-Z])="([^"]*)"$', block, re.M))
        for line in block.splitlines():
            line = line.split(" #")[0].strip()
            for k, v in env.items():
                line = line.replace(f"${k}", v)
            for part in line.split("&&"):
                part = part.strip()
                if part.startswith("python cli.py "):
                    out.append(part[len("python cli.py "):])
    return out


CASES = [(p.relative_to(ROOT).as_posix(), c) for p in PAGES for c in _commands(p)]


def test_the_pages_hold_commands_and_the_readme_links_every_page():
    assert len(CASES) > 40
    readme = (ROOT / "README.md").read_text()
    for page in (ROOT / "docs").glob("*.md"):
        assert f"docs/{page.name}" in readme, page.name


@pytest.mark.parametrize("page, command", CASES, ids=[f"{p}:{c[:40]}" for p, c in CASES])
def test_every_documented_command_parses(page, command):
    import cli

    argv = shlex.split(command.replace("$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT", "0/16"))
    try:
        args = cli.build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse's exit: the page documents a flag or value that does not exist
        pytest.fail(f"{page}: `python cli.py {command}` does not parse (exit {exc.code})")
    assert callable(args.func)


def test_the_quickstart_plan_runs_on_a_generated_st_folder(tmp_path, capsys):
    """The quickstart's import and `run --plan` lines, on generated sections instead of her2st."""
    from conftest import fake_st, run

    for i, name in enumerate(["A1", "B1"]):
        fake_st(tmp_path / "st", seed=i, name=name, genes=12)
    assert run(["tiles", "st", tmp_path / "st", "--out", tmp_path / "her2st", "--name", "her2st", "--tile-px", 60,
                "--normalize", "cpm", "--genes", 8, "--min-spots", 0, "--quiet"]) == 0
    assert run(["run", "--data", tmp_path / "her2st" / "her2st.csv", "--recipe", "default", "--budget", "30m",
                "--plan", "--cache-dir", tmp_path / "cache", "--out", tmp_path / "model"]) == 0
    out = capsys.readouterr().out
    assert "recipe default" in out and "her2st@2x.csv" in out and "fit        ridge-two:" in out
    assert not (tmp_path / "model").exists()  # --plan does nothing


def test_help_of_every_command_and_subcommand_lists_each_of_its_flags(capsys):
    import cli
    from conftest import parser_leaves

    found = [(path, [f for f in flags if f.startswith("--")]) for path, flags in parser_leaves(cli.build_parser())]
    assert len(found) >= 17  # 13 commands (fit, compare; predict, predict-slide ...) and the 4 cache actions
    for path, flags in found:
        try:
            cli.main([*path, "--help"])
        except SystemExit as exc:
            assert exc.code == 0
        text = capsys.readouterr().out
        missing = [f for f in flags if f not in text]
        assert not missing, (path, missing)


def test_help_imports_no_heavy_library():
    """``python cli.py --help`` and ``backbones`` start without torch, h5py, scipy or scikit-learn."""
    import subprocess
    import sys

    code = ("import sys, cli\ntry:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'h5py', 'scipy', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout[-300:]
