"""The documentation site builds with `mkdocs build --strict` (broken links, missing API
references and bad docstring references fail), its command-line reference holds every flag of
the parser, its API reference every public name, its module map every module; the README stays
a first visit's page and every section it dropped lives in the site."""
import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the README's sections before the site existed (2026-12-04), and the page that holds each now
MOVED = {"What it is": "concepts.md", "Python API": "reference/api.md",
         "Command line": "how-to/train.md", "Use a trained model": "how-to/predict.md",
         "Re-run a run": "how-to/train.md", "Bodies": "reference/bodies.md",
         "Watch training": "how-to/train.md",
         "Checkpoints and run folders": "reference/run-folders.md",
         "Several GPUs or machines": "how-to/gpus.md", "The scenarios": "how-to/train.md",
         "Reproducing the papers": "how-to/reproduce.md",
         "Evaluation and BatchNorm at test time": "concepts.md", "Data": "how-to/own-data.md",
         "Your own data": "how-to/own-data.md",
         "The benchmarks ANIL users report on": "how-to/own-data.md", "Speed": "how-to/benchmark.md",
         "How fast": "how-to/benchmark.md",
         "Do the kernels fit the GPU? (no GPU needed)": "how-to/benchmark.md",
         "The CPU kernel": "how-to/benchmark.md", "Environment variables": "reference/environment.md",
         "Development": "development.md"}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    for package in ("mkdocs", "material", "mkdocstrings_handlers.python"):  # the dev extra
        pytest.importorskip(package)
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f",
                           str(ROOT / "mkdocs.yml"), "-d", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, NO_MKDOCS_2_WARNING="1"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def test_every_cli_flag_and_command_is_in_the_reference(site):
    from anil_fast.cli import build_parser
    page = (site / "reference" / "cli" / "index.html").read_text()
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert "--version" in page
    for name, command in sub.choices.items():
        assert f"anil-fast {name}" in page, name
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):  # -h, --help: argparse's own
                continue
            for flag in action.option_strings:
                assert f"<code>{flag}</code>" in page, (name, flag)


def test_every_public_name_is_in_the_api_reference(site):
    import anil_fast
    import anil_fast.data
    page = (site / "reference" / "api" / "index.html").read_text()
    # each public name under the module that defines it (the package imports them lazily)
    names = [f"{anil_fast._PUBLIC[n]}.{n}" for n in anil_fast.__all__
             if n not in ("__version__", "models", "data")]
    names += [f"anil_fast.data.{n}" for n in anil_fast.data.__all__]
    missing = [n for n in names if f'id="{n}"' not in page]
    assert not missing, missing


def test_the_module_map_lists_every_module():
    page = (ROOT / "docs" / "development.md").read_text()
    modules = sorted(p.relative_to(ROOT / "anil_fast").as_posix()
                     for p in (ROOT / "anil_fast").rglob("*.py"))
    missing = [m for m in modules if f"`{m}`" not in page]
    assert not missing, missing


def test_the_readme_is_short_and_every_section_it_dropped_lives_in_the_site():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 811 // 3
    for section, page in MOVED.items():
        assert re.search(rf"^#+ {re.escape(section)}$", (ROOT / "docs" / page).read_text(),
                         flags=re.M), (section, page)
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / link).is_file(), link
    # the two commands come first
    assert readme.index("make demo") < readme.index("make test") < readme.index("## ")
