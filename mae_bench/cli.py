"""The ``mae-bench`` command line: run, validate, plugins, leaderboard."""

from __future__ import annotations

import functools
import json
import signal
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import yaml

from mae_bench import __version__
from mae_bench.errors import MaeBenchWarning, UserError
from mae_bench.plugins import KIND_PLURALS, describe_params, load_registry

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # Ctrl-C
EXIT_TERMINATED = 143  # SIGTERM (what SLURM and `kill` send)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so that it stops as cleanly as on Ctrl-C."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


def _print_warning(text: str) -> None:
    click.echo(click.style(f"warning: {text}", fg="yellow"), err=True)


_python_showwarning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """mae-bench's own warnings as one ``warning: ...`` line; others as Python prints them."""
    if issubclass(category, MaeBenchWarning):
        _print_warning(str(message))
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


def _user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a UserError into one message on stderr and exit code 2, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except UserError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_BAD_INPUT)

    return wrapper


set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY.PATH=VALUE",
    help="Override a suite field, e.g. --set pretrain.epochs=1 (repeatable).",
)


@click.group()
@click.version_option(__version__, prog_name="mae-bench")
def cli() -> None:
    """Benchmark Masked Autoencoder variants: encoders x masking x losses x datasets."""
    warnings.showwarning = _show_warning


@cli.command()
@click.argument("suite_file", metavar="SUITE")
@click.option(
    "--out",
    "out_dir",
    default="results",
    show_default=True,
    type=click.Path(),
    help="Results folder; the suite writes under OUT/<suite name>/.",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.",
)
@click.option(
    "--logger",
    "loggers",
    multiple=True,
    metavar="NAME",
    help="Add a logger plugin to the suite's own (e.g. tensorboard, wandb); repeatable.",
)
@click.option(
    "--replace",
    is_flag=True,
    help="If OUT/<suite name>/ holds another suite's results, move them aside instead of "
    "refusing to run.",
)
@set_option
@_user_errors
def run(
    suite_file: str,
    out_dir: str,
    device: str,
    loggers: tuple[str, ...],
    replace: bool,
    overrides: tuple[str, ...],
) -> None:
    """Run a suite: pretrain and evaluate every (variant, seed) cell not yet finished."""
    from mae_bench.device import resolve_device
    from mae_bench.memory import check_memory
    from mae_bench.runner import run_suite
    from mae_bench.suite import load_suite

    registry = load_registry()
    suite = load_suite(suite_file, registry, overrides, loggers)
    for warning in (*registry.problems(), *suite.warnings):
        _print_warning(warning)
    torch_device = resolve_device(device)
    check_memory(suite, torch_device)  # before anything is loaded or written
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        summary = run_suite(suite, Path(out_dir), torch_device, replace=replace)
    except KeyboardInterrupt as exc:
        what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        click.echo(
            f"\n{what}: finished cells are kept under {Path(out_dir) / suite.name}, nothing "
            "half-written; run the same command again to resume",
            err=True,
        )
        sys.exit(EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED)
    finally:
        signal.signal(signal.SIGTERM, previous)
    click.echo(summary.markdown)
    click.echo(f"results: {summary.root}", err=True)
    if summary.failed:
        click.echo(f"{len(summary.failed)} cell(s) failed (a re-run retries them):", err=True)
        for cell_id, failure in summary.failed.items():
            where = f" (traceback: {failure.log})" if failure.log else ""
            click.echo(f"  {cell_id}: {failure.reason}{where}", err=True)
        sys.exit(1)


@cli.command()
@click.argument("suite_file", metavar="SUITE")
@click.option("--show", is_flag=True, help="Print the resolved suite with every default.")
@set_option
@_user_errors
def validate(suite_file: str, show: bool, overrides: tuple[str, ...]) -> None:
    """Check a suite file against the schema and the plugins, without running it."""
    from mae_bench.device import resolve_device
    from mae_bench.memory import memory_problem
    from mae_bench.suite import load_suite

    registry = load_registry()
    suite = load_suite(suite_file, registry, overrides)
    for warning in (*registry.problems(), *suite.warnings):
        _print_warning(warning)
    problem = memory_problem(suite, resolve_device("auto"))
    if problem:  # it may be run elsewhere: `run` refuses on the device it runs on
        _print_warning(f"{problem} (on this machine; `run` refuses it here)")
    cells = suite.cells()
    baselines = len(suite.baseline_variants())
    extra = f" + {baselines} baseline(s)" if baselines else ""
    click.echo(
        f"ok: suite {suite.name!r}: ({len(suite.variants)} variants{extra}) x "
        f"{len(suite.config.seeds)} seeds = {len(cells)} cells"
    )
    if show:
        click.echo(yaml.safe_dump(suite.resolved, sort_keys=False))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins(as_json: bool) -> None:
    """List every plugin, the components it provides, and any load errors."""
    registry = load_registry()
    if as_json:
        data = [
            {
                "name": p.name,
                "module": p.module,
                "distribution": p.distribution,
                "version": p.version,
                "components": {
                    KIND_PLURALS[kind]: [c.name for c in p.components if c.kind == kind]
                    for kind in KIND_PLURALS
                },
                "params": {
                    f"{c.kind}:{c.name}": describe_params(c.cls.Params) for c in p.components
                },
                "errors": p.errors,
            }
            for p in registry.plugins
        ]
        click.echo(json.dumps(data, indent=2))
        return
    if not registry.plugins:
        click.echo("no plugins loaded")
    for p in registry.plugins:
        status = click.style(" (errors)", fg="red") if p.errors else ""
        click.echo(f"{p.distribution} {p.version}: {p.name} ({p.module}){status}")
        for kind in KIND_PLURALS:
            comps = [c for c in p.components if c.kind == kind]
            for c in comps:
                click.echo(f"  {kind:9} {c.name:14} {c.description}")
                for name, param in describe_params(c.cls.Params).items():
                    click.echo(f"  {'':9} {'':14}   {name}: {param['type']} = {param['default']!r}")
        for error in p.errors:
            click.echo(click.style(f"  error: {error}", fg="red"))


@cli.command()
@click.argument("results_dir", metavar="DIR", type=click.Path())
@_user_errors
def leaderboard(results_dir: str) -> None:
    """Re-render runs.csv and leaderboard.csv/.md of a suite's results folder."""
    from mae_bench.leaderboard import write_leaderboard
    from mae_bench.results import CellStore, read_suite_record, suite_cells

    root = Path(results_dir)
    record = read_suite_record(root)
    store = CellStore(root)
    ids = suite_cells(record)
    done = list(store.finished(ids, repair=False).values())
    primary = record["resolved"].get("primary_metric", "lp_acc")
    reference = record["resolved"].get("reference")
    _, markdown = write_leaderboard(root, done, record["name"], primary, reference)
    click.echo(markdown)
    click.echo(f"{len(done)} of {len(ids)} cells finished; written under {root}", err=True)


@cli.command()
@click.argument("results_dir", metavar="DIR", type=click.Path())
@click.option("--open", "open_page", is_flag=True, help="Open report.html in a browser.")
@_user_errors
def report(results_dir: str, open_page: bool) -> None:
    """Regenerate every table and plot of a suite's results folder, and its self-contained
    results page DIR/report.html, without retraining."""
    from mae_bench.report import render_report

    paths, page = render_report(Path(results_dir), load_registry())
    for path in paths:
        click.echo(str(path))
    click.echo(str(page))
    click.echo(f"{len(paths)} plots and the results page written", err=True)
    if open_page:
        import webbrowser

        if not webbrowser.open(page.resolve().as_uri()):
            click.echo(f"no browser found: open {page} yourself", err=True)


@cli.command()
@click.argument("cell_dir", metavar="CELL_DIR", type=click.Path())
@click.argument("out_file", metavar="OUT")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["timm"]),
    default="timm",
    show_default=True,
    help="Layout of the written weights.",
)
@_user_errors
def export(cell_dir: str, out_file: str, fmt: str) -> None:
    """Write a finished cell's encoder for another library (OUT: a .safetensors file).

    Prints the call that loads it, e.g. timm.create_model(..., pretrained=True,
    pretrained_cfg_overlay=dict(file=OUT)); the arguments are also saved as OUT.json.
    """
    from mae_bench.export import export_cell

    out, kwargs = export_cell(Path(cell_dir), Path(out_file), fmt, load_registry())
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items() if k != "model_name")
    click.echo(
        f"import timm\nmodel = timm.create_model({kwargs['model_name']!r}, pretrained=True, "
        f"pretrained_cfg_overlay=dict(file={str(out)!r}), {args})"
    )
    click.echo(f"written: {out} and {out}.json", err=True)


def main() -> None:
    """Console-script entry point."""
    cli()


if __name__ == "__main__":
    main()
