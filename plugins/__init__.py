"""mae-bench's built-in plugins, installed as ``mae_bench_plugins``.

Each module is registered through the ``mae_bench`` entry-point group in pyproject.toml,
exactly as a third-party plugin package registers its own.
"""
