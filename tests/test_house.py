"""The house rules: one home for the environment, no private imports across modules, library
calls without side effects, user errors as one line and programming errors with a traceback,
and rank 0 alone reading what rank 0 alone wrote."""
import ast
import re
import subprocess
import sys
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
    op_layer = [ROOT / "anil_fast" / "models" / "ops.py", *(ROOT / "kernels").glob("*.py")]
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
    assert len((ROOT / "anil_fast" / "training" / "run.py").read_text().splitlines()) < 400


def test_building_a_config_never_touches_the_network(monkeypatch):
    from anil_fast.config import scenario_config, validate_config
    from anil_fast.models import bodies

    def no_download(*args, **kwargs):
        raise AssertionError("a Config tried to fetch pretrained weights")
    monkeypatch.setattr(bodies, "resnet18", no_download)
    monkeypatch.setattr(bodies, "torchvision_weights_available", no_download)
    for name in ("s3", "s4", "s5"):
        config = scenario_config(name)
        validate_config(config)
        assert config.model == "pretrained"  # resolved when a run starts (runs.settings)


def test_validate_config_leaves_its_argument_as_it_was():
    import dataclasses

    from anil_fast.config import Config, normalized_config, validate_config
    config = Config(backend="cpp", inner_lr=1, outer_lr=0, data="/some/folder")
    before = dataclasses.asdict(config)
    validate_config(config)
    assert dataclasses.asdict(config) == before
    normal = normalized_config(config)
    assert (normal.backend, normal.dataset, type(normal.inner_lr)) == ("fused", "folder", float)
    assert dataclasses.asdict(config) == before


def test_plots_leave_the_callers_matplotlib_backend_alone(tmp_path):
    from anil_fast.experiments.compare import write_plots
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
    import anil_fast.experiments.compare
    import anil_fast.experiments.reproduce
    from anil_fast import distributed
    other_rank = distributed.DistInfo(rank=1, world_size=2, local_rank=1)
    monkeypatch.setattr(distributed, "init_from_env", lambda device: other_rank)
    monkeypatch.setattr(distributed, "shutdown", lambda: None)
    # rank 1 trains its share and writes nothing (rank 0 writes the tables)
    monkeypatch.setattr(anil_fast.experiments.compare, "compare", lambda *a, **k: [{}])
    monkeypatch.setattr(anil_fast.experiments.reproduce, "reproduce", lambda *a, **k: [{}])
    args = {"compare": ["compare", "--scenarios", "s2"],
            "reproduce": ["reproduce", "--suite", "seed"]}[command]
    assert cli.main([*args, "--out", str(tmp_path / "none")]) == 0, capsys.readouterr().err


# -- the layout: rooms on floors, arrows only down or sideways --------------------------------
# Each room's floor: a module imports only from its own floor or below (lazy imports too).
FLOORS = {"anil_fast.errors": 0, "anil_fast.env": 0, "anil_fast.config": 0,
          "anil_fast.data": 1, "anil_fast.models": 1, "anil_fast.kernels": 1, "anil_fast.csrc": 1,
          "anil_fast.distributed": 1, "anil_fast.metrics": 1,
          "anil_fast.runs": 2, "anil_fast.evaluation": 3, "anil_fast.training": 4,
          "anil_fast.use": 4, "anil_fast.measure": 5, "anil_fast.experiments": 5,
          "anil_fast.cli": 6, "anil_fast.__main__": 6, "anil_fast": 6}
TOP_LEVEL = {"__init__.py", "__main__.py", "cli.py", "config.py", "env.py", "errors.py",
             "distributed.py", "metrics.py", "evaluation.py"}
ROOMS = {"models", "data", "runs", "training", "use", "experiments", "measure"}


def floor_of(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in FLOORS:
            return FLOORS[".".join(parts[:n])]
    raise AssertionError(f"{module}: in no room of FLOORS")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    if rel.parts[0] in ("kernels", "csrc"):
        rel = Path("anil_fast", *rel.parts)
    parts = list(rel.with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, top_level_only: bool = False):
    """The anil_fast modules `path` imports (absolute imports; the package writes no others)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("anil_fast"):
            assert node.level == 0, f"{path}: a relative import"
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                yield sub if _is_module(sub) else node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("anil_fast"))


def _is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    roots = [ROOT / "anil_fast", ROOT]  # kernels/ and csrc/ are anil_fast.kernels / .csrc
    return any((r / rel).with_suffix(".py").is_file() or (r / rel / "__init__.py").is_file()
               for r in roots)


def test_the_package_is_in_rooms_and_its_top_level_is_short():
    top = {p.name for p in (ROOT / "anil_fast").glob("*.py")}
    assert top == TOP_LEVEL, top ^ TOP_LEVEL
    rooms = {p.name for p in (ROOT / "anil_fast").iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert rooms == ROOMS, rooms ^ ROOMS


def test_no_file_of_the_package_is_ignored_by_git():
    # a clone must hold every module (a "runs/" rule once hid anil_fast/runs/ from commits)
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    files = [str(p.relative_to(ROOT)) for p in PACKAGE + [*(ROOT / "anil_fast").rglob("*.json"),
                                                         *(ROOT / "csrc").rglob("*.cpp")]]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *files], cwd=ROOT,
                             capture_output=True, text=True).stdout.split()
    assert not ignored, ignored


def test_no_import_runs_up_a_floor():
    up = [f"{module_name(p)} -> {m}" for p in PACKAGE for m in imported_modules(p)
          if floor_of(m) > floor_of(module_name(p))]
    assert not up, up


def test_no_import_cycle():
    graph = {module_name(p): set(imported_modules(p, top_level_only=True)) for p in PACKAGE}
    state = {}

    def visit(node, path):
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", " -> ".join([*path, node])
        state[node] = "open"
        for nxt in graph.get(node, ()):
            if nxt != node and not node.startswith(f"{nxt}."):  # a package's own __init__
                visit(nxt, [*path, node])
        state[node] = "done"
    for node in graph:
        visit(node, [])


def test_the_command_line_imports_a_command_only_when_it_runs():
    code = ("import sys, anil_fast.cli as c; c.build_parser(); "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith(('anil_fast', 'torch')))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    loaded = set(out.stdout.split())
    assert loaded == {"anil_fast", "anil_fast.cli", "anil_fast.config", "anil_fast.env",
                      "anil_fast.errors"}, (loaded, out.stderr[-2000:])


def test_a_config_reaches_the_model_resolved_once_through_few_modules(tmp_path, offline):
    """train(config): the settings are checked and resolved once each (runs.settings.resolve),
    and the call path from train() to the model's constructor stays short and runs down."""
    import anil_fast.runs.build
    from anil_fast.config import scenario_config
    from anil_fast.training.run import train

    class Reached(Exception):
        pass

    def the_model(*args, **kwargs):
        raise Reached
    calls, edges = {}, []

    def profile(frame, event, arg):
        if event != "call":
            return
        callee = frame.f_globals.get("__name__", "")
        caller = frame.f_back.f_globals.get("__name__", "") if frame.f_back else ""
        if callee.startswith("anil_fast"):
            key = f"{callee}.{frame.f_code.co_name}"
            calls[key] = calls.get(key, 0) + 1
            if caller.startswith("anil_fast") and caller != callee:
                edges.append((caller, callee))
    config = scenario_config("s2", image_size=28, meta_steps=1, meta_batch=2, test_tasks=2,
                             backend="cpp", device="cpu", precision="auto")
    original = anil_fast.runs.build.ANIL
    anil_fast.runs.build.ANIL = the_model
    sys.setprofile(profile)
    try:
        with pytest.raises(Reached):
            train(config, tmp_path / "run", progress=False)
    finally:
        sys.setprofile(None)
        anil_fast.runs.build.ANIL = original
    edges.append(("anil_fast.runs.build", "anil_fast.models.anil"))
    for name in ("anil_fast.runs.settings.resolve", "anil_fast.config.validate_config",
                 "anil_fast.config.normalized_config", "anil_fast.config.backend_name",
                 "anil_fast.runs.settings.resolve_device", "anil_fast.runs.settings.machine_choices",
                 "anil_fast.models.anil.prefers_channels_last"):
        assert calls.get(name) == 1, (name, calls.get(name))
    modules = {m for edge in edges for m in edge}
    ups = [e for e in edges if floor_of(e[1]) > floor_of(e[0])]
    assert len(modules) <= 10, sorted(modules)
    assert len(ups) <= 4, ups
