"""Measuring speed: the one timing harness and table formatter (harness.py) that both
`anil-fast bench` (bench.py) and the pytest-benchmark suites in benches/ use."""
