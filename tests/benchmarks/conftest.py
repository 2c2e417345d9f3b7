"""Prints the figures benchmarks record in ``extra_info`` (beside pytest-benchmark's table)."""

from __future__ import annotations

FIGURES: list[str] = []


def pytest_runtest_logreport(report):
    if report.when == "call" and report.passed:
        for name, value in getattr(report, "user_properties", []):
            if name == "figure":
                FIGURES.append(value)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if FIGURES and config.getoption("benchmark_enable", False):  # not for the smoke run
        terminalreporter.section("scale-out figures (this machine, one run)")
        for line in FIGURES:
            terminalreporter.write_line(line)
