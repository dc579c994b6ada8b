"""The `rdonnx` command line: a thin layer over the Python API.

Exit codes: 0 success, 2 bad input or usage (one line on stderr), 3 a `--fail-above` bound
was exceeded, 1 internal error, 130 interrupted, 143 terminated. `--debug` shows tracebacks.

Importing this module (for `rdonnx --help`) loads no torch, onnx, onnxruntime or numpy: the
options come from the light settings modules, and each command imports the API it runs.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import traceback
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import click

from rdonnx import strictjson
from rdonnx.choices import (
    EXIT_CODES_EPILOG,
    METHODS_EPILOG,
    DataOptions,
    check_grid,
    parse_confidence,
)
from rdonnx.errors import UsageError
from rdonnx.flow.config import GROUPS, KEYS, CompressConfig, Measurement, Selection
from rdonnx.flow.methods.options import METHOD_OPTIONS
from rdonnx.fs import write_text
from rdonnx.option import key_of, spec_of
from rdonnx.outputs import user_error
from rdonnx.progress import Stages, heartbeat
from rdonnx.signals import EXIT_TERMINATED, clean_aborts, was_terminated
from rdonnx.version import __version__

EXIT_BOUND_EXCEEDED = 3
PLOT_RATES = (0.7, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02)  # --plot: the method measured at these


def _parse_shape(values: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for item in values:
        name, _, dims = item.rpartition("=")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            shape = ()
        if not name or not shape or any(d <= 0 for d in shape):
            raise UsageError(f"--input-shape {item!r}: write NAME=1x3x224x224")
        shapes[name] = shape
    return shapes


def _parse_range(values: tuple[str, ...]) -> dict[str, tuple[float, float]]:
    ranges = {}
    for item in values:
        name, _, span = item.rpartition("=")
        try:
            lo, hi = (float(v) for v in span.split(":"))
        except ValueError:
            lo, hi = 1.0, 0.0
        if not name or not lo <= hi:
            raise UsageError(f"--input-range {item!r}: write NAME=LO:HI with LO <= HI")
        ranges[name] = (lo, hi)
    return ranges


def common_options(func: Callable) -> Callable:
    """--quiet and --debug, shared by every command."""
    func = click.option("--debug", is_flag=True, help="Show tracebacks on errors.")(func)
    return click.option("--quiet", "-q", is_flag=True,
                        help="No progress bars or notices; errors still print.")(func)


def option_of(cls: type, name: str, **override: Any) -> Callable:
    """The click option of field `name` of a settings dataclass (`Measurement`, `DataOptions`,
    `PQIOptions`...): flag, help, choices, range and default all come from the field, so no
    default is written twice. `override` replaces click arguments (a command's own help)."""
    spec, default = spec_of(cls, name)
    key = spec.key or name
    flag = spec.flag or "--" + key.replace("_", "-")
    kwargs: dict[str, Any] = {"help": spec.help}
    if spec.negate:
        kwargs.update(is_flag=True, flag_value=False, default=True)
    elif isinstance(default, bool):
        kwargs.update(is_flag=True, default=default)
    elif spec.multiple:
        kwargs.update(multiple=True, metavar=spec.metavar)
    else:
        value_type = spec.value_type or type(default)
        if not isinstance(default, value_type):
            default = None  # given as text (--grid); the field's default applies when absent
        kwargs.update(default=default, metavar=spec.metavar,
                      show_default=spec.show_default and default is not None)
        if spec.choices is not None:
            kwargs["type"] = click.Choice(list(spec.choices))
        elif spec.range is not None:
            number = click.IntRange if value_type is int else click.FloatRange
            kwargs["type"] = number(*spec.range)
        else:
            kwargs["type"] = value_type
    kwargs.update(override)
    return click.option(flag, key, **kwargs)


def config_option(key: str, **override: Any) -> Callable:
    """The click option of a `CompressConfig` keyword (`KEYS`, or "method")."""
    if key == "method":
        return option_of(CompressConfig, key, **override)
    owner, name = KEYS[key]
    return option_of(GROUPS[owner] if owner in GROUPS else METHOD_OPTIONS[owner], name,
                     **override)


def apply(func: Callable, options: list[Callable]) -> Callable:
    """Decorate `func` with `options`, listed in --help order."""
    for option in reversed(options):
        func = option(func)
    return func


PARSERS: dict[str, Callable[[Any], Any]] = {}  # field -> parser of its command-line text


def settings(cls: type, kw: dict[str, Any]) -> dict[str, Any]:
    """Pop the options of dataclass `cls` from `kw` and parse them into option values by
    keyword (absent and unset text options keep the field's default)."""
    values = {}
    for f in fields(cls):
        key = key_of(f)
        if "option" in f.metadata and key in kw:
            value = kw.pop(key)
            if key in PARSERS:
                value = PARSERS[key](value)
            if value is not None or f.default is None:
                values[key] = value
    return values


DATA_OPTIONS = [option_of(DataOptions, name) for name in
                ("batch_size", "samples", "shapes", "ranges", "seed")]


def data_options(func: Callable) -> Callable:
    """Options that say how to read or synthesise input data, and the device."""
    return apply(func, [*DATA_OPTIONS, option_of(Measurement, "device")])


def _data(kw: dict[str, Any]) -> DataOptions:
    """The data options given on the command line (popped from `kw`)."""
    return DataOptions(**{KEYS[k][1]: v for k, v in settings(DataOptions, kw).items()})


def _log_progress(quiet: bool):
    """In a log (stderr not a terminal), a progress line at least every ~10 s."""
    return heartbeat() if not quiet and not sys.stderr.isatty() else contextlib.nullcontext()


def _note(message: str, quiet: bool) -> None:
    if not quiet:
        click.echo(f"rdonnx: {message}", err=True)


class _Group(click.Group):
    """Ctrl-C or SIGTERM inside a command ends in main()'s one line (not click's blank one)."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as exc:
            raise click.exceptions.Abort() from exc


EPILOG = f"{METHODS_EPILOG}\n\n{EXIT_CODES_EPILOG}"


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]},
             epilog=EPILOG)
@click.version_option(__version__, prog_name="rdonnx")
def cli() -> None:
    """Rate-distortion-optimised pruning of ONNX models.

    Pruning makes files smaller, not faster: ONNX Runtime densifies weights at load.
    """


def _grid(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return check_grid([float(v) for v in text.split(",") if v.strip()])
    except ValueError:
        raise UsageError(f"--grid {text!r}: write densities as 1,0.5,0.2,0.1") from None


PARSERS.update(grid=_grid, shapes=_parse_shape, ranges=_parse_range,
               confidence=parse_confidence)
CALIB = click.option("--calib", type=click.Path(path_type=Path), default=None,
                     help="Calibration data: .npz (keys = input names, axis 0 = samples) or a "
                     "folder of .npz feeds. Default: synthetic inputs.")
VERIFY = click.option("--verify", "verify_data", type=click.Path(path_type=Path), default=None,
                      help="Held-out data for every bound check, instead of --holdout's part "
                      "of --calib (give calibrate the same).")


def rd_options(func: Callable) -> Callable:
    """Options that shape the R-D measurement (shared by compress and calibrate)."""
    names = ("criterion", "metric", "reconstruct", "sequential", "damp", "hessian_mb",
             "channel_axis", "grid", "min_params", "include", "exclude", "simplify")
    return apply(func, [*(config_option(n) for n in names), CALIB,
                        config_option("holdout"), VERIFY,
                        *(config_option(n) for n in ("replay_mb", "jobs", "downstream"))])


def _config(kw: dict[str, Any]) -> CompressConfig:
    """The settings given on the command line (popped from `kw`); the rest keep defaults."""
    values = {}
    for cls in (CompressConfig, *GROUPS.values(), *METHOD_OPTIONS.values()):
        values.update(settings(cls, kw))
    return CompressConfig.of(**values)


COMPRESS_OPTIONS = [
    *(config_option(n) for n in ("rate", "max_distortion", "min_agreement", "bits_per_weight",
                                 "min_score", "max_drop", "eval", "confidence",
                                 "allow_synthetic")),
    click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
                 help="Output file [default: <model>.rdonnx, or <model>.pruned.onnx for dense "
                 "and sparse, beside the input]."),
    *(config_option(n) for n in
      ("format", "values", "value_bits", "value_budget", "quantizer", "rdoq", "bias_correction",
       "coarse_unread",
       "lossless_unpruned",
       "pattern", "method", "solver", "normalize", "pqi_p", "pqi_q", "pqi_eta", "pqi_gamma",
       "pqi_mode", "granularity", "budget", "hsic_samples", "hsic_beta")),
    click.option("--curves", "curves_path", type=click.Path(dir_okay=False, path_type=Path),
                 default=None, help="Reuse R-D curves from rdonnx calibrate (refused if the "
                 "model, data or settings differ)."),
    click.option("--test", "test_data", type=click.Path(path_type=Path), default=None,
                 help="Labelled .npz to report accuracy before and after (with --labels)."),
    click.option("--labels", default=None, help="Key of the labels array in --test data."),
    config_option("layer_distortion"),
    config_option("adaptive"),
    click.option("--report", "report_path", type=click.Path(path_type=Path), default=None,
                 help="Write the JSON report here."),
    click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None,
                 help="Draw the R-D curves and chosen densities to this PNG (needs "
                 "matplotlib)."),
    click.option("--force", is_flag=True, help="Replace existing outputs."),
]


@cli.command("compress", epilog=EPILOG)
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@functools.partial(apply, options=COMPRESS_OPTIONS)
@rd_options
@data_options
@common_options
def compress_cmd(model: Path, output: Path | None, report_path: Path | None,
                 plot_path: Path | None, force: bool, test_data: Path | None,
                 labels: str | None, curves_path: Path | None, quiet: bool, debug: bool,
                 **kw) -> None:
    """Compress MODEL to a target (--rate, --max-distortion, --min-agreement or
    --bits-per-weight) and report what it costs.

    Pruning makes files smaller, not faster: ONNX Runtime densifies weights at load.
    """
    from rdonnx.api import compress
    from rdonnx.flow.curves import Curves
    from rdonnx.graph.model import check_output
    from rdonnx.report.plot import plot_report, require_matplotlib
    from rdonnx.report.records import render

    # usage first: a bad option is reported whatever the state of the file system
    if labels and test_data is None:
        raise UsageError("--labels needs --test DATA")
    calib, verify = kw.pop("calib"), kw.pop("verify_data")
    grid_given = kw["grid"] is not None
    config = _config(kw)
    config.check()
    if plot_path is not None:
        require_matplotlib()
    if not model.is_file():
        raise UsageError(f"model file not found: {model}")
    output = output or model.with_name(
        model.stem + (".rdonnx" if config.coding.format == "rdonnx" else ".pruned.onnx"))
    paths = [p for p in (output, report_path, plot_path) if p is not None]
    if len({p.resolve() for p in paths}) < len(paths):
        raise UsageError("-o, --report and --plot must name different files")
    for path in paths:
        check_output(path, model, force)
    if curves_path is not None and not grid_given:  # the grid the curves were measured on
        grid = ",".join(str(d) for d in Curves.load(curves_path).grid)
        config = config.updated(grid=_grid(grid))
    frontier = PLOT_RATES if plot_path is not None else ()
    with _log_progress(quiet):
        result = compress(model, calib=calib, test=test_data, labels=labels,
                          curves=curves_path, config=config, quiet=quiet, frontier=frontier,
                          verify=verify)
        with Stages(result.report.timings).stage("save"):
            result.save(output, config.coding.format, force=force)
        result.report.timings["save"] = round(result.report.timings["save"], 3)
    for notice in result.report.notices:
        _note(notice, quiet)
    if report_path is not None:
        write_text(report_path, result.report.to_json())
    if plot_path is not None:
        plot_report(result.report, plot_path)
    if not quiet:
        click.echo(render(result.report), err=True)


@cli.command("calibrate")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Where to write the curves (JSON).")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@rd_options
@data_options
@common_options
def calibrate_cmd(model: Path, output: Path, force: bool, quiet: bool, debug: bool,
                  **kw) -> None:
    """Measure per-weight R-D curves of MODEL once; reuse them with compress --curves."""
    from rdonnx.api import calibrate
    from rdonnx.graph.model import check_output

    calib, verify = kw.pop("calib"), kw.pop("verify_data")
    config = _config(kw)  # usage first, then the file system
    config.verify.check()
    if not model.is_file():
        raise UsageError(f"model file not found: {model}")
    check_output(output, model, force)
    with _log_progress(quiet):
        curves = calibrate(model, calib=calib, config=config, quiet=quiet, verify=verify)
    write_text(output, curves.to_json())
    if not quiet:
        click.echo(f"rdonnx: {len(curves.distortion)} curves x {len(curves.grid)} densities "
                   f"written to {output}", err=True)


@cli.command("inspect")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@option_of(Selection, "min_params", help="Smallest weight (elements) counted as prunable.")
@option_of(Selection, "include", help="Also list these tensors.")
@option_of(Selection, "exclude", help="Leave these tensors out.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--suggest-rate", is_flag=True,
              help="Also print a data-free --rate: the PQ index fixed-point density.")
@common_options
def inspect_cmd(model: Path, min_params: int, include: tuple[str, ...],
                exclude: tuple[str, ...], as_json: bool, suggest_rate: bool, quiet: bool,
                debug: bool) -> None:
    """List the prunable weights of MODEL (or what an .rdonnx artifact holds)."""
    from rdonnx.algo.pqi import INSPECT_PAIRS
    from rdonnx.api import inspect
    from rdonnx.artifact.format import is_artifact
    from rdonnx.artifact.io import inspect_artifact

    if is_artifact(model):
        found = inspect_artifact(model)
        click.echo(strictjson.dumps(found.manifest, indent=2, sort_keys=True) if as_json
                   else found.render())
        return
    result = inspect(model, min_params=min_params, include=include, exclude=exclude,
                     suggest=suggest_rate)
    if as_json:
        pqi_keys = [f"pqi_{p:g}_{q:g}" for p, q in INSPECT_PAIRS]
        weights = [{**w.__dict__, **dict(zip(pqi_keys, v))}
                   for w, v in zip(result.weights, result.pqi)]
        found = {"model": result.model, "params_total": result.params_total,
                 "params_nonzero": result.params_nonzero, "weights": weights,
                 **dict(zip(pqi_keys, result.pqi_model))}
        if result.suggested_rate is not None:
            found["suggested_rate"] = result.suggested_rate
        click.echo(strictjson.dumps(found, indent=2))
    else:
        click.echo(result.render())


@cli.command("evaluate")
@click.argument("reference", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("candidate", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Inputs (.npz or folder of .npz feeds). Default: synthetic inputs.")
@click.option("--labels", default=None, help="Key of the labels array in --data: reports "
              "accuracy.")
@option_of(Measurement, "metric", help="The distortion that --fail-above checks.")
@click.option("--fail-above", type=float, default=None,
              help="Exit 3 when the distortion exceeds this bound (for CI).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@data_options
@common_options
def evaluate_cmd(reference: Path, candidate: Path, data: Path | None, labels: str | None,
                 metric: str, fail_above: float | None, as_json: bool, device: str,
                 quiet: bool, debug: bool, **kw) -> None:
    """Distortion of CANDIDATE against REFERENCE (and accuracy with --labels)."""
    from rdonnx.api import evaluate

    result = evaluate(reference, candidate, data, labels=labels, metric=metric, device=device,
                      options=_data(kw), quiet=quiet)
    if as_json:
        click.echo(strictjson.dumps(result.__dict__, indent=2, sort_keys=True))
    else:
        n = f"({result.samples} samples)"
        lines = [f"{metric}: {result.distortion:.6g} {n}"] + [
            f"{name}: {value:.6g} {n}" for name, value in (("nmse", result.nmse),
                                                          ("cosine", result.cosine))
            if name != metric]
        if result.kl is not None:
            lines.append(f"kl: {result.kl:.6g} {n}")
        if result.top1_agreement is not None:
            lower = "" if result.top1_lower is None else \
                f"; {result.confidence:.0%} lower bound {result.top1_lower:.2%}"
            lines.append(f"top-1 agreement: {result.top1_agreement:.2%} ({result.samples} "
                         f"samples{lower})")
        if result.accuracy_original is not None:
            lines.append(f"accuracy: {result.accuracy_original:.2%} (reference) -> "
                         f"{result.accuracy_compressed:.2%} (candidate) ({result.labelled} "
                         "labelled samples)")
        lines.append(f"samples: {result.samples}")
        click.echo("\n".join(lines))
    if fail_above is not None and result.distortion > fail_above:
        click.echo(f"rdonnx: {metric} {result.distortion:.6g} exceeds --fail-above "
                   f"{fail_above:g}", err=True)
        click.get_current_context().exit(EXIT_BOUND_EXCEEDED)


@cli.command("decompress")
@click.argument("artifact", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="The ONNX file to write.")
@click.option("--format", "fmt", type=click.Choice(("dense", "sparse")), default="dense",
              show_default=True, help="dense, or sparse_initializer where smaller.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@common_options
def decompress_cmd(artifact: Path, output: Path, fmt: str, force: bool, quiet: bool,
                   debug: bool) -> None:
    """Write ARTIFACT (.rdonnx) as plain ONNX that any tool reads."""
    from rdonnx.artifact.io import decompress
    from rdonnx.graph.model import check_output

    check_output(output, artifact, force)
    size = decompress(artifact, output, fmt, force=True)
    _note(f"wrote {output} ({size:,} bytes, {fmt})", quiet)


@cli.command("truncate")
@click.argument("artifact", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="The smaller .rdonnx to write (never the input).")
@click.option("--rate", type=float, default=None,
              help="Keep the shortest prefix with this fraction of pool weights nonzero.")
@click.option("--bits-per-weight", type=float, default=None,
              help="Keep the longest prefix whose stream takes at most B bits per pool weight.")
@click.option("--max-distortion", type=float, default=None,
              help="Keep the shortest prefix whose measured distortion (the artifact's "
              "--metric) against the original is at most D (needs --calib).")
@click.option("--reference", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The original model for --max-distortion [default: the source recorded "
              "in the artifact, if unchanged].")
@click.option("--calib", type=click.Path(path_type=Path), default=None,
              help="Calibration data for --max-distortion (.npz or folder of .npz).")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@data_options
@common_options
def truncate_cmd(artifact: Path, output: Path, rate: float | None,
                 bits_per_weight: float | None, max_distortion: float | None,
                 reference: Path | None, calib: Path | None, force: bool, quiet: bool,
                 debug: bool, device: str, **kw) -> None:
    """Cut the SuRP stream of ARTIFACT (compress --method surp) to a shorter prefix."""
    from rdonnx.flow.methods.surp import truncate_artifact

    if max_distortion is not None and calib is None:
        raise UsageError("--max-distortion needs --calib DATA")
    result = truncate_artifact(
        artifact, output, rate=rate, bits_per_weight=bits_per_weight,
        max_distortion=max_distortion, calib=calib, reference=reference,
        data=_data(kw), device=device,
        quiet=quiet, force=force)
    extra = "" if result.distortion is None else f", distortion {result.distortion:.6g}"
    _note(f"wrote {output} ({result.size:,} bytes, {result.steps:,} steps, rate "
          f"{result.rate:.4g}, {result.bits_per_weight:.4f} bits per weight{extra})", quiet)


@cli.command("doctor")
def doctor_cmd() -> None:
    """Print versions, execution providers and whether a GPU works."""
    import importlib.metadata as md

    from rdonnx.runtime.session import cuda_status

    lines = [f"python {sys.version.split()[0]}", f"rdonnx {__version__}"]
    for package in ("onnx", "onnxruntime", "onnxruntime-gpu", "numpy", "torch", "onnxsim",
                    "constriction", "click"):
        try:
            lines.append(f"{package} {md.version(package)}")
        except md.PackageNotFoundError:
            lines.append(f"{package} not installed")
    try:
        import onnxruntime as ort

        lines.append(f"providers available: {', '.join(ort.get_available_providers())}")
        lines.append(f"CUDA execution provider works: {cuda_status()}")
    except ImportError:
        lines.append("onnxruntime: not importable; pip install 'rdonnx[cpu]' or 'rdonnx[gpu]'")
    import torch

    lines.append(f"torch CUDA available: {torch.cuda.is_available()}")
    click.echo("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 internal error, 2 bad input, 3 bound,
    130 interrupted, 143 terminated)."""
    with clean_aborts():  # SIGTERM aborts like Ctrl-C; temp files and folders are removed
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    if not args:
        click.echo(cli.get_help(click.Context(cli, info_name="rdonnx")))
        return 0
    try:
        code = cli.main(args=args, prog_name="rdonnx", standalone_mode=False)
        return code if isinstance(code, int) else 0  # ctx.exit(n) comes back as n
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort as exc:
        if was_terminated(exc):
            click.echo("rdonnx: terminated", err=True)
            return EXIT_TERMINATED
        click.echo("rdonnx: aborted", err=True)
        return 130
    except click.ClickException as exc:
        return _fail(exc.format_message(), 2, debug)
    except UsageError as exc:
        if debug and getattr(exc, "detail", None):  # rdonnx.causes: the other library's words
            click.echo(exc.detail, err=True)
        return _fail(str(exc), 2, debug)
    except KeyboardInterrupt as exc:
        if was_terminated(exc):
            click.echo("rdonnx: terminated", err=True)
            return EXIT_TERMINATED
        click.echo("rdonnx: interrupted", err=True)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence
        if isinstance(exc, OSError) and user_error(exc):  # disk full, read-only, no permission
            return _fail(user_error(exc), 2, debug)
        return _fail(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the "
                     "traceback and report it)", 1, debug)


def _fail(message: str, code: int, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    click.echo(f"rdonnx: error: {' '.join(message.split())}", err=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
