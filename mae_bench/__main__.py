"""``python -m mae_bench``: the command line (what launchers start workers with)."""

from mae_bench.cli import main

main()
