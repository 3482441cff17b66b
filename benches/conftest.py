import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # `from common import ...` in the suites


def pytest_terminal_summary(terminalreporter):
    from common import print_table
    suites = {m.__name__.rsplit(".", 1)[-1]: m for m in list(sys.modules.values())
              if getattr(m, "__name__", "").rsplit(".", 1)[-1] in ("test_bench_head", "test_bench_step", "test_bench_small_loop")
              and getattr(m, "RESULTS", None)}
    for module, mod in sorted(suites.items()):
        rows = mod.summary_rows()
        terminalreporter.write_line("")
        columns = list(dict.fromkeys(c for r in rows for c in r))
        print_table(rows, columns, f"{module}: ratios (baseline time / fast time), same run")
