"""The house rules: one home for the environment, no private imports across modules, library
calls without side effects, user errors as one line and programming errors with a traceback,
and rank 0 alone reading what rank 0 alone wrote."""
import ast
import re
from pathlib import Path

import matplotlib
import pytest

from anil_fast import cli, env
from anil_fast.errors import AnilFastError, InputError

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = [p for d in ("anil_fast", "kernels", "csrc") for p in (ROOT / d).rglob("*.py")]


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            yield node.module or "", node.level, [a.name for a in node.names]


def test_no_module_imports_another_modules_private_names():
    offenders = [f"{p.relative_to(ROOT)}: {name}" for p in PACKAGE
                 for _, _, names in _imports(p) for name in names
                 if name.startswith("_") and not name.startswith("__")]
    assert not offenders, offenders


def test_the_op_layer_imports_nothing_from_the_data_layer():
    op_layer = [ROOT / "anil_fast" / "ops.py", *(ROOT / "kernels").glob("*.py")]
    offenders = [f"{p.name}: {module}" for p in op_layer for module, _, _ in _imports(p)
                 if module.split(".")[-1] == "data" or ".data." in f".{module}."
                 or module.startswith("anil_fast.data")]
    assert not offenders, offenders


def test_every_environment_variable_is_read_in_env_and_documented():
    readers = [p.relative_to(ROOT) for p in PACKAGE
               if p.name != "env.py" and re.search(r"environ[^\n]*ANIL_FAST_", p.read_text())]
    assert not readers, readers
    page = (ROOT / "docs" / "reference" / "environment.md").read_text()
    for name in env.ENV_VARS:
        assert f"| `{name}` |" in page, name


def test_no_function_over_60_lines_and_a_short_trainer():
    long = []
    for p in (ROOT / "anil_fast").rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 60:
                    long.append(f"{p.name}:{node.name} ({length} lines)")
    assert not long, long
    assert len((ROOT / "anil_fast" / "trainer.py").read_text().splitlines()) < 350


def test_building_a_config_never_touches_the_network(monkeypatch):
    from anil_fast import models
    from anil_fast.scenarios import scenario_config

    def no_download(*args, **kwargs):
        raise AssertionError("a Config tried to fetch pretrained weights")
    monkeypatch.setattr(models, "resnet18", no_download)
    monkeypatch.setattr(models, "torchvision_weights_available", no_download)
    for name in ("s3", "s4", "s5"):
        assert scenario_config(name).model == "pretrained"  # resolved when a model is built


def test_validate_config_leaves_its_argument_as_it_was():
    import dataclasses

    from anil_fast.scenarios import Config, normalized_config, validate_config
    config = Config(backend="cpp", inner_lr=1, outer_lr=0, data="/some/folder")
    before = dataclasses.asdict(config)
    validate_config(config)
    assert dataclasses.asdict(config) == before
    normal = normalized_config(config)
    assert (normal.backend, normal.dataset, type(normal.inner_lr)) == ("fused", "folder", float)
    assert dataclasses.asdict(config) == before


def test_plots_leave_the_callers_matplotlib_backend_alone(tmp_path):
    from anil_fast.compare import write_plots
    previous = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        row = {"scenario": "s2", "accuracy_before": 0.2, "accuracy_after": 0.8, "ci95": 0.01}
        write_plots({}, [row], tmp_path)
        assert matplotlib.get_backend() == "svg"
        assert (tmp_path / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    finally:
        matplotlib.use(previous)


def test_user_errors_are_one_line_and_programming_errors_keep_their_traceback(monkeypatch, capsys):
    def user_error(args, info, out):
        raise InputError("ways must be at least 2, got 1")
    monkeypatch.setitem(cli.COMMANDS, "eval", user_error)
    assert cli.main(["eval", "--checkpoint", "x"]) == 2
    assert capsys.readouterr().err == "error: ways must be at least 2, got 1\n"
    assert issubclass(InputError, ValueError) and issubclass(InputError, AnilFastError)

    def bug(args, info, out):
        return None + 1  # a TypeError that is nobody's input
    monkeypatch.setitem(cli.COMMANDS, "eval", bug)
    with pytest.raises(TypeError):
        cli.main(["eval", "--checkpoint", "x"])


@pytest.mark.parametrize("command", ["compare", "reproduce"])
def test_only_rank_0_reads_the_report_rank_0_wrote(command, tmp_path, monkeypatch, capsys):
    import anil_fast.compare
    import anil_fast.reproduce
    from anil_fast import distributed
    other_rank = distributed.DistInfo(rank=1, world_size=2, local_rank=1)
    monkeypatch.setattr(distributed, "init_from_env", lambda device: other_rank)
    monkeypatch.setattr(distributed, "shutdown", lambda: None)
    # rank 1 trains its share and writes nothing (rank 0 writes the tables)
    monkeypatch.setattr(anil_fast.compare, "compare", lambda *a, **k: [{}])
    monkeypatch.setattr(anil_fast.reproduce, "reproduce", lambda *a, **k: [{}])
    args = {"compare": ["compare", "--scenarios", "s2"],
            "reproduce": ["reproduce", "--suite", "seed"]}[command]
    assert cli.main([*args, "--out", str(tmp_path / "none")]) == 0, capsys.readouterr().err
