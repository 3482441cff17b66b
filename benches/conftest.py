import sys

SUITES = ("test_bench_head", "test_bench_step", "test_bench_small_loop")


def pytest_addoption(parser):
    parser.addoption("--smoke", action="store_true",
                     help="only each suite's smallest cases (its SMOKE parameters); with "
                          "--benchmark-disable each runs once, untimed: CI keeps the suites working")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--smoke"):
        return
    kept, dropped = [], []
    for item in items:
        smoke = getattr(item.module, "SMOKE", {})
        params = getattr(getattr(item, "callspec", None), "params", {})
        (kept if all(params.get(k, v) == v for k, v in smoke.items()) else dropped).append(item)
    config.hook.pytest_deselected(items=dropped)
    items[:] = kept


def pytest_terminal_summary(terminalreporter):
    from anil_fast.measure.table import text_table
    suites = {m.__name__.rsplit(".", 1)[-1]: m for m in list(sys.modules.values())
              if getattr(m, "__name__", "").rsplit(".", 1)[-1] in SUITES
              and getattr(m, "RESULTS", None)}
    for module, mod in sorted(suites.items()):
        rows = mod.summary_rows()
        terminalreporter.write_line("")
        columns = list(dict.fromkeys(c for r in rows for c in r))
        terminalreporter.write_line(text_table(rows, columns, f"{module}: ratios (baseline time / "
                                               f"fast time), same run"))
