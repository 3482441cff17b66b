import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # `from common import ...` in the suites


def pytest_terminal_summary(terminalreporter):
    from common import print_table
    for module in ("test_bench_head", "test_bench_step"):
        mod = sys.modules.get(module)
        if mod is None or not getattr(mod, "RESULTS", None):
            continue
        rows = mod.summary_rows()
        terminalreporter.write_line("")
        columns = list(dict.fromkeys(c for r in rows for c in r))
        print_table(rows, columns, f"{module}: ratios (baseline time / fast time), same run")
