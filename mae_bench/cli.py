"""The ``mae-bench`` command line: run, run-cell, status, validate, plugins, leaderboard,
report, export.

Each command imports what it needs when it runs, so ``--help`` and ``status`` answer without
loading torch."""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import textwrap
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click
import yaml

from mae_bench import __version__
from mae_bench.errors import MaeBenchWarning, UserError

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # Ctrl-C
EXIT_TERMINATED = 143  # SIGTERM (what SLURM and `kill` send)
LISTING_WIDTH = 100  # `mae-bench plugins` wraps descriptions at this many columns


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

sweep_option = click.option(
    "--sweep",
    "-m",
    "sweeps",
    multiple=True,
    metavar="PATH=A,B,C",
    help="Sweep a field of every variant, e.g. --sweep masking.ratio=0.5,0.75,0.9, or of one: "
    "--sweep variants.vit-mae.encoder.decoder_depth=1,2,4 (repeatable: a product).",
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
@click.option(
    "--launcher",
    default="inline",
    show_default=True,
    help="How cells run: inline (this process), local (worker processes), submitit "
    "(SLURM), or a plugin's launcher.",
)
@click.option(
    "--workers", type=click.IntRange(min=1), help="Worker processes (the local launcher)."
)
@click.option(
    "--launcher-opt",
    "launcher_opts",
    multiple=True,
    metavar="KEY=VALUE",
    help="A launcher option, e.g. --launcher-opt partition=gpu (repeatable; see "
    "`mae-bench plugins`).",
)
@click.option(
    "--launcher-config",
    type=click.Path(dir_okay=False),
    help="A YAML file of launcher options (e.g. examples/slurm.yaml); --launcher-opt wins.",
)
@set_option
@sweep_option
@_user_errors
def run(
    suite_file: str,
    out_dir: str,
    device: str,
    loggers: tuple[str, ...],
    replace: bool,
    launcher: str,
    workers: int | None,
    launcher_opts: tuple[str, ...],
    launcher_config: str | None,
    overrides: tuple[str, ...],
    sweeps: tuple[str, ...],
) -> None:
    """Run a suite: pretrain and evaluate every (variant, seed) cell not yet finished.

    Under torchrun every process runs this same command: the cells train data-parallel."""
    from mae_bench.distributed import env_world
    from mae_bench.memory import check_memory
    from mae_bench.plugins import load_registry
    from mae_bench.runner import local_device, run_suite
    from mae_bench.suite import load_suite

    registry = load_registry()
    suite = load_suite(suite_file, registry, overrides, loggers, sweeps)
    chosen = _build_launcher(registry, launcher, workers, launcher_opts, launcher_config)
    world = env_world()
    if world.is_main:
        for warning in (*registry.problems(), *suite.warnings):
            _print_warning(warning)
    # before anything is loaded or written; a variant whose plugins fail here runs (and
    # its cells fail with the reason)
    check_memory(suite, local_device(device), world.world_size, warn=world.is_main)
    with _stopping(Path(out_dir) / suite.name):
        summary = run_suite(suite, Path(out_dir), device, replace=replace, launcher=chosen)
    if not world.is_main:
        return
    click.echo(summary.markdown)
    click.echo(f"results: {summary.root}", err=True)
    _report_failures(summary)


def _build_launcher(
    registry: Any,
    name: str,
    workers: int | None,
    options: tuple[str, ...],
    config_file: str | None = None,
):
    """The launcher named by --launcher with its options: those of --launcher-config, then
    --launcher-opt."""
    from mae_bench.runner import resolve_launcher
    from mae_bench.suite import read_suite_file

    params = {}
    if config_file:
        params = read_suite_file(config_file, "launcher options")
    params.update(parse_options(options, "--launcher-opt"))
    if workers is not None:
        if name != "local":
            raise UserError(f"--workers: only the local launcher has workers (not {name!r})")
        params.setdefault("workers", workers)
    return resolve_launcher(registry, name, params)


def parse_options(items: Sequence[str], flag: str) -> dict[str, Any]:
    """``key=value`` command-line options (values parsed as YAML, with a suite's limits) as a
    mapping."""
    from mae_bench.suite import parse_yaml

    options: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"{flag} {item!r}: expected key=value")
        try:
            options[key] = parse_yaml(text)
        except yaml.YAMLError:
            raise UserError(f"{flag} {key}: cannot parse value {text!r}") from None
    return options


@contextlib.contextmanager
def _stopping(root: Path):
    """SIGTERM and SIGUSR1 checkpoint the cell in training (see mae_bench.resume); a stop
    (or Ctrl-C) exits 143 (130) with one line saying what was kept."""
    from mae_bench import resume

    try:
        with resume.handle_signals():
            yield
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, resume.Terminated)
        what = "terminated (SIGTERM)" if terminated else "interrupted"
        saved = f"; {exc.detail}" if terminated and exc.detail else ""
        click.echo(
            f"\n{what}: finished cells are kept under {root}, nothing half-written{saved}; run "
            "the same command again to resume",
            err=True,
        )
        sys.exit(EXIT_TERMINATED if terminated else EXIT_INTERRUPTED)


def _report_failures(summary: Any) -> None:
    if summary.failed:
        click.echo(f"{len(summary.failed)} cell(s) failed (a re-run retries them):", err=True)
        for cell_id, failure in summary.failed.items():
            where = f" (traceback: {failure.log})" if failure.log else ""
            click.echo(f"  {cell_id}: {failure.reason}{where}", err=True)
        sys.exit(1)


@cli.command("run-cell")
@click.argument("results_dir", metavar="DIR", type=click.Path())
@click.argument("cell_ids", metavar="[CELL_ID]...", nargs=-1)
@click.option("--device", default="auto", show_default=True, help="As for run.")
@_user_errors
def run_cell(results_dir: str, cell_ids: tuple[str, ...], device: str) -> None:
    """Run cells of a suite's results folder DIR (all pending ones if none are named).

    What a launcher's worker runs: the suite is read from DIR/suite.json, each cell is
    claimed (a cell another worker holds is left to it), resumed from its checkpoint and
    stored. Under torchrun the processes train each cell data-parallel."""
    from mae_bench.distributed import env_world
    from mae_bench.worker import RunSummary, run_cells

    summary = RunSummary(root=Path(results_dir))
    with _stopping(Path(results_dir)):
        run_cells(Path(results_dir), list(cell_ids), device, summary=summary)
    if env_world().is_main:
        _report_failures(summary)


@cli.command()
@click.argument("results_dir", metavar="DIR", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="One JSON object per cell.")
@_user_errors
def status(results_dir: str, as_json: bool) -> None:
    """Per cell of a results folder: done, running (where, since when, epoch), failed (its
    traceback) or pending (and from which checkpoint it would resume)."""
    from mae_bench.results import cell_status

    rows = cell_status(Path(results_dir))
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
        return
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
        click.echo(f"{row['state']:8} {row['cell_id']}  {row['detail']}".rstrip())
    click.echo(", ".join(f"{n} {state}" for state, n in counts.items()), err=True)


@cli.command()
@click.argument("suite_file", metavar="SUITE")
@click.option("--show", is_flag=True, help="Print the resolved suite with every default.")
@set_option
@sweep_option
@_user_errors
def validate(
    suite_file: str, show: bool, overrides: tuple[str, ...], sweeps: tuple[str, ...]
) -> None:
    """Check a suite file against the schema and the plugins, without running it."""
    from mae_bench.device import resolve_device
    from mae_bench.leaderboard import plural
    from mae_bench.memory import memory_check
    from mae_bench.plan import baseline_variants, suite_cells
    from mae_bench.plugins import load_registry
    from mae_bench.suite import load_suite

    registry = load_registry()
    suite = load_suite(suite_file, registry, overrides, sweeps=sweeps)
    for warning in (*registry.problems(), *suite.warnings):
        _print_warning(warning)
    check = memory_check(suite, resolve_device("auto"))
    for note in check.notes:
        _print_warning(note)
    if check.problem:  # it may be run elsewhere: `run` refuses on the device it runs on
        _print_warning(f"{check.problem} (on this machine; `run` refuses it here)")
    cells = suite_cells(suite)
    baselines = len(baseline_variants(suite))
    extra = f" + {plural(baselines, 'baseline')}" if baselines else ""
    adaptive = suite.adaptive
    seeds = (
        f"{adaptive.min}-{adaptive.max} seeds (until conclusive) = {plural(len(cells), 'cell')}"
        " to begin with"
        if adaptive
        else f"{plural(len(suite.initial_seeds), 'seed')} = {plural(len(cells), 'cell')}"
    )
    click.echo(
        f"ok: suite {suite.name!r}: ({plural(len(suite.variants), 'variant')}{extra}) x {seeds}"
    )
    if show:
        click.echo(yaml.safe_dump(suite.resolved, sort_keys=False))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins(as_json: bool) -> None:
    """List every plugin, the components it provides, and any load errors."""
    from mae_bench.plugins import KINDS, describe_params, load_registry

    registry = load_registry()
    if as_json:
        data = [
            {
                "name": p.name,
                "module": p.module,
                "distribution": p.distribution,
                "version": p.version,
                "components": {
                    KINDS[kind].plural: [c.name for c in p.components if c.kind == kind]
                    for kind in KINDS
                },
                "params": {
                    f"{c.kind}:{c.name}": describe_params(c.cls.Params) for c in p.components
                },
                "errors": p.errors,
            }
            for p in registry.plugins
        ]
        click.echo(json.dumps(data, indent=2, default=str))  # a default of any type: as text
        return
    if not registry.plugins:
        click.echo("no plugins loaded")
    for p in registry.plugins:
        status = click.style(" (errors)", fg="red") if p.errors else ""
        click.echo(f"{p.distribution} {p.version}: {p.name} ({p.module}){status}")
        for kind in KINDS:
            comps = [c for c in p.components if c.kind == kind]
            for c in comps:
                head = f"  {kind:9} {c.name:14} "
                indent = " " * len(head)
                click.echo(
                    textwrap.fill(
                        c.description or "-", LISTING_WIDTH, initial_indent=head,
                        subsequent_indent=indent, break_on_hyphens=False,
                    )
                )  # fmt: skip
                for name, param in describe_params(c.cls.Params).items():
                    line = _param_line(name, param)
                    click.echo(
                        textwrap.fill(
                            line, LISTING_WIDTH, initial_indent=f"{indent}  ",
                            subsequent_indent=f"{indent}      ", break_on_hyphens=False,
                        )
                    )  # fmt: skip
        for error in p.errors:
            click.echo(click.style(f"  error: {error}", fg="red"))


def _param_line(name: str, param: dict[str, Any]) -> str:
    """``name: type = default  (description)``, or ``name: type (required)``."""
    text = f"{name}: {param['type']}"
    text += " (required)" if param["required"] else f" = {param['default']!r}"
    return text + (f"  ({param['description']})" if param["description"] else "")


@cli.command()
@click.argument("results_dir", metavar="DIR", type=click.Path())
@_user_errors
def leaderboard(results_dir: str) -> None:
    """Re-render runs.csv and leaderboard.csv/.md of a suite's results folder."""
    from mae_bench.leaderboard import rebuild_leaderboard
    from mae_bench.metrics import DEFAULT_PRIMARY_METRIC
    from mae_bench.results import read_suite_record, recorded_cells
    from mae_bench.suite import adaptive_rule

    root = Path(results_dir)
    record = read_suite_record(root)
    ids = recorded_cells(record)
    primary = record["resolved"].get("primary_metric", DEFAULT_PRIMARY_METRIC)
    reference = record["resolved"].get("reference")
    rule = adaptive_rule(record["resolved"])
    _, markdown, done = rebuild_leaderboard(root, ids, record["name"], primary, reference, rule)
    click.echo(markdown)
    click.echo(f"{done} of {len(ids)} cells finished; written under {root}", err=True)


@cli.command()
@click.argument("results_dir", metavar="DIR", type=click.Path())
@click.option("--open", "open_page", is_flag=True, help="Open report.html in a browser.")
@_user_errors
def report(results_dir: str, open_page: bool) -> None:
    """Regenerate every table and plot of a suite's results folder, and its self-contained
    results page DIR/report.html, without retraining."""
    from mae_bench.leaderboard import plural
    from mae_bench.plugins import load_registry
    from mae_bench.report import render_report

    paths, page = render_report(Path(results_dir), load_registry())
    for path in paths:
        click.echo(str(path))
    click.echo(str(page))
    click.echo(f"{plural(len(paths), 'plot')} and the results page written", err=True)
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
    type=click.Choice(["timm", "hf"]),
    default="timm",
    show_default=True,
    help="Layout of the written weights: timm (the encoder, OUT a .safetensors file) or hf "
    "(a Hugging Face ViTMAEForPreTraining folder OUT: config.json and model.safetensors, "
    "encoder and decoder; `vit` cells).",
)
@_user_errors
def export(cell_dir: str, out_file: str, fmt: str) -> None:
    """Write a finished cell's weights for another library (OUT: a .safetensors file, or a
    folder with --format hf).

    Prints the call that loads it, e.g. timm.create_model(..., pretrained=True,
    pretrained_cfg_overlay=dict(file=OUT)), whose arguments are also saved as OUT.json, or
    transformers.ViTMAEForPreTraining.from_pretrained(OUT).
    """
    from mae_bench.plugins import load_registry
    from mae_bench.weights import export_cell

    out, kwargs = export_cell(Path(cell_dir), Path(out_file), fmt, load_registry())
    if fmt == "hf":
        click.echo(
            "from transformers import ViTMAEForPreTraining\n"
            f"model = ViTMAEForPreTraining.from_pretrained({str(out)!r})"
        )
        click.echo(f"written: {out}/config.json and {out}/model.safetensors", err=True)
        return
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
