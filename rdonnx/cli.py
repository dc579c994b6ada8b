"""The `rdonnx` command line: a thin layer over the Python API.

Exit codes: 0 success, 2 bad input or usage (one line on stderr), 3 a `--fail-above` bound
was exceeded, 1 internal error. `--debug` shows tracebacks.
"""

from __future__ import annotations

import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import click

from . import __version__, strictjson
from .choices import (  # plain data: --help imports no torch, onnx or onnxruntime
    BUDGETS,
    CRITERIA,
    DEFAULT_MIN_PARAMS,
    DEVICES,
    EXIT_CODES_EPILOG,
    FORMATS,
    GRANULARITIES,
    HSIC_SAMPLES,
    METHODS,
    METHODS_EPILOG,
    METRICS,
    PQI_MODES,
    QUANTIZERS,
    SOLVERS,
    VALUES,
)
from .errors import UsageError
from .outputs import normal_mode, user_error
from .signals import EXIT_TERMINATED, clean_aborts, removing, was_terminated

if TYPE_CHECKING:
    from .api import CompressConfig
    from .data import DataOptions

EXIT_BOUND_EXCEEDED = 3
PLOT_RATES = (0.7, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02)  # --plot: the method measured at these


def _parse_shape(values: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for item in values:
        name, _, dims = item.rpartition("=")
        try:
            shapes[name] = tuple(int(d) for d in dims.lower().split("x"))
            assert name and all(d > 0 for d in shapes[name])
        except (ValueError, AssertionError):
            raise UsageError(f"--input-shape {item!r}: write NAME=1x3x224x224") from None
    return shapes


def _parse_range(values: tuple[str, ...]) -> dict[str, tuple[float, float]]:
    ranges = {}
    for item in values:
        name, _, span = item.rpartition("=")
        try:
            lo, hi = (float(v) for v in span.split(":"))
            assert name and lo <= hi
        except (ValueError, AssertionError):
            raise UsageError(f"--input-range {item!r}: write NAME=LO:HI with LO <= HI") from None
        ranges[name] = (lo, hi)
    return ranges


def common_options(func: Callable) -> Callable:
    """--quiet and --debug, shared by every command."""
    func = click.option("--debug", is_flag=True, help="Show tracebacks on errors.")(func)
    return click.option("--quiet", "-q", is_flag=True,
                        help="No progress bars or notices; errors still print.")(func)


def data_options(func: Callable) -> Callable:
    """Options that say how to read or synthesise input data."""
    options = [
        click.option("--batch-size", type=int, default=16, show_default=True,
                     help="Samples per ONNX Runtime run (a fixed batch axis overrides it)."),
        click.option("--calib-samples", type=int, default=None,
                     help="Use at most N samples (N files for a folder). Synthetic default: 64."),
        click.option("--input-shape", multiple=True, metavar="NAME=AxBx..",
                     help="Shape for synthetic inputs with dynamic dimensions (repeatable)."),
        click.option("--input-range", multiple=True, metavar="NAME=LO:HI",
                     help="Uniform range for synthetic inputs; required for integer inputs."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed for synthetic data; same seed, same output."),
        click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
                     help="auto: CUDA when its execution provider really works, else CPU."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _data(batch_size: int, calib_samples: int | None, input_shape: tuple[str, ...],
          input_range: tuple[str, ...], seed: int) -> DataOptions:
    from .data import DataOptions

    return DataOptions(batch_size=batch_size, samples=calib_samples,
                       shapes=_parse_shape(input_shape), ranges=_parse_range(input_range),
                       seed=seed)


def _note(message: str, quiet: bool) -> None:
    if not quiet:
        click.echo(f"rdonnx: {message}", err=True)


def _write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with removing(tmp):  # no .tmp left on a full disk or an abort
        os.fchmod(fd, normal_mode())  # mkstemp's 0600 -> the mode of any new file
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)


class _Group(click.Group):
    """Ctrl-C or SIGTERM inside a command ends in main()'s one line (not click's blank one)."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as exc:
            raise click.exceptions.Abort() from exc


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]},
             epilog=f"{METHODS_EPILOG}\n\n{EXIT_CODES_EPILOG}")
@click.version_option(__version__, prog_name="rdonnx")
def cli() -> None:
    """Rate-distortion-optimised pruning of ONNX models.

    Pruning makes files smaller, not faster: ONNX Runtime densifies weights at load.
    """


def _grid(text: str | None) -> tuple[float, ...]:
    from .calibrate import DEFAULT_GRID, check_grid

    if text is None:
        return DEFAULT_GRID
    try:
        return check_grid([float(v) for v in text.split(",") if v.strip()])
    except ValueError:
        raise UsageError(f"--grid {text!r}: write densities as 1,0.5,0.2,0.1") from None


def rd_options(func: Callable) -> Callable:
    """Options that shape the R-D measurement (shared by compress and calibrate)."""
    options = [
        click.option("--criterion", type=click.Choice(CRITERIA), default="magnitude",
                     show_default=True, help="In-layer criterion: |w|; w^2 * E[x^2] of the "
                     "layer input compared within output rows (Wanda / Gao et al.); or obs, "
                     "SparseGPT's selection during reconstruction (implies --reconstruct)."),
        click.option("--metric", type=click.Choice(METRICS), default="nmse", show_default=True,
                     help="Output distortion: nmse (sum over outputs of ||y-y'||^2/||y||^2), "
                     "nmse-channel (per channel along --channel-axis, averaged), kl of class "
                     "scores, cosine."),
        click.option("--reconstruct", is_flag=True,
                     help="Update surviving weights to reconstruct each layer's output on the "
                     "calibration data (OBS / SparseGPT; GPTQ error feedback when quantizing)."),
        click.option("--sequential", is_flag=True,
                     help="Reconstruct layers in graph order, each from the inputs the already-"
                     "compressed earlier layers produce, aimed at the original model's layer "
                     "output, so later layers undo earlier layers' error (implies "
                     "--reconstruct)."),
        click.option("--damp", type=float, default=0.01, show_default=True,
                     help="Reconstruction dampening: share of the mean diagonal of X X^T."),
        click.option("--channel-axis", type=int, default=1, show_default=True,
                     help="Channel axis of the outputs for --metric nmse-channel."),
        click.option("--grid", default=None, metavar="D1,D2,..",
                     help="Densities of the R-D curves [default: 20 from 1 down to 0.002, "
                     "log-spaced]."),
        click.option("--min-params", type=int, default=DEFAULT_MIN_PARAMS, show_default=True,
                     help="Smallest weight (elements) that is pruned."),
        click.option("--include", multiple=True, metavar="GLOB", help="Also prune these."),
        click.option("--exclude", multiple=True, metavar="GLOB", help="Never prune these."),
        click.option("--no-simplify", is_flag=True, help="Skip onnxsim simplification."),
        click.option("--calib", type=click.Path(path_type=Path), default=None,
                     help="Calibration data: .npz (keys = input names, axis 0 = samples) or a "
                     "folder of .npz feeds. Default: synthetic inputs."),
        click.option("--replay-mb", type=click.IntRange(min=0), default=512, show_default=True,
                     help="MiB of calibration batches and reference outputs kept in memory "
                     "for the probes; the rest is spilled to a temporary folder."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _config(**kw) -> CompressConfig:
    from .api import CompressConfig

    data = _data(kw.pop("batch_size"), kw.pop("calib_samples"), kw.pop("input_shape"),
                 kw.pop("input_range"), kw.pop("seed"))
    return CompressConfig(
        criterion=kw["criterion"], reconstruct=kw["reconstruct"], sequential=kw["sequential"],
        damp=kw["damp"], metric=kw["metric"], channel_axis=kw["channel_axis"],
        grid=_grid(kw["grid"]), min_params=kw["min_params"], include=kw["include"],
        exclude=kw["exclude"], simplify=not kw["no_simplify"], device=kw["device"], data=data,
        replay_mb=kw["replay_mb"])


@cli.command("compress", epilog=f"{METHODS_EPILOG}\n\n{EXIT_CODES_EPILOG}")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--rate", type=float, default=None,
              help="Fraction of prunable weights kept (density), 0 < R <= 1.")
@click.option("--max-distortion", type=float, default=None,
              help="Instead of --rate: the smallest rate whose measured distortion (--metric) "
              "on the calibration data is at most D.")
@click.option("--min-agreement", type=float, default=None,
              help="Instead of --rate: the smallest rate whose measured top-1 agreement with "
              "the original is at least A (0..1).")
@click.option("--bits-per-weight", type=float, default=None,
              help="Instead of --rate: the largest rate whose coded positions + values take "
              "at most B bits per prunable weight.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Output file [default: <model>.rdonnx, or <model>.pruned.onnx for dense and "
              "sparse, beside the input].")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="rdonnx",
              show_default=True, help="rdonnx: entropy-coded artifact (rdonnx.open_session "
              "runs it in stock ONNX Runtime); dense: ONNX with zeros; sparse: ONNX "
              "sparse_initializer where smaller.")
@click.option("--values", type=click.Choice(VALUES), default="auto", show_default=True,
              help="Surviving values: quantized, exact, or auto (quantized for rdonnx only).")
@click.option("--value-bits", type=click.IntRange(2, 16), default=None,
              help="Quantize survivors to this many bits [default: the fewest bits that add "
              "at most --value-budget to the measured distortion].")
@click.option("--value-budget", type=float, default=0.02, show_default=True,
              help="Share of the measured distortion that quantization may add.")
@click.option("--quantizer", type=click.Choice(QUANTIZERS), default="uniform",
              show_default=True, help="Quantized values: a uniform grid per tensor, or a "
              "k-means codebook of 2^b - 1 centroids weighted by E[x^2] of the layer input "
              "(Gao et al.; plain k-means where no input is seen). Not with --reconstruct.")
@click.option("--lossless-unpruned", is_flag=True,
              help="Keep large unpruned tensors (embeddings...) exact instead of quantized.")
@click.option("--pattern", default=None, metavar="N:M",
              help="Structured sparsity instead of a rate: keep N of every M consecutive "
              "inputs per output row (2:4 is what GPUs accelerate).")
@click.option("--method", type=click.Choice(METHODS), default="rd", show_default=True,
              help="rd: densities from measured R-D curves; uniform: one density; global: one "
              "score threshold; lamp: LAMP scores, one threshold; gao: one density, "
              "w^2 * E[x^2] scores and activation-weighted k-means values (Gao et al.); "
              "surp: SuRP successive refinement, an embedded stream (rdonnx truncate cuts it).")
@click.option("--solver", type=click.Choice(list(SOLVERS)), default="lagrange",
              show_default=True, help="rd: equal-slope search on convex hulls, or DP over the "
              "grid points.")
@click.option("--normalize", is_flag=True,
              help="global: compare scores divided by each tensor's RMS.")
@click.option("--pqi-p", type=float, default=0.5, show_default=True,
              help="pqi: PQ index exponent p (0 < p < q).")
@click.option("--pqi-q", type=float, default=1.0, show_default=True,
              help="pqi: PQ index exponent q.")
@click.option("--pqi-eta", type=float, default=0.0, show_default=True,
              help="pqi: eta of the retained-fraction bound (>= 0; larger keeps fewer).")
@click.option("--pqi-gamma", type=float, default=1.0, show_default=True,
              help="pqi: SAP step size (each step prunes gamma * (1 - r), at most 0.9).")
@click.option("--pqi-mode", type=click.Choice(PQI_MODES), default="fixed", show_default=True,
              help="pqi: fixed: each weight's kept share where the iterated SAP step stops "
              "(prunes < 1% of survivors); single: one PQI bound.")
@click.option("--granularity", type=click.Choice(GRANULARITIES), default="layer",
              show_default=True, help="pqi: one PQI density per weight, or per output row "
              "(neuron).")
@click.option("--budget", type=click.Choice(BUDGETS), default="params", show_default=True,
              help="hsic: what --rate counts: parameters, or multiply-accumulates per sample "
              "(flops).")
@click.option("--hsic-samples", type=int, default=HSIC_SAMPLES, show_default=True,
              help="hsic: calibration samples whose layer outputs are compared.")
@click.option("--hsic-beta", type=float, default=None,
              help="hsic: importance exp(-beta * s_i) [default: 10 * number of layers].")
@click.option("--curves", "curves_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Reuse R-D curves from rdonnx calibrate (refused if the "
              "model, data or settings differ).")
@click.option("--test", "test_data", type=click.Path(path_type=Path), default=None,
              help="Labelled .npz to report accuracy before and after (with --labels).")
@click.option("--labels", default=None, help="Key of the labels array in --test data.")
@click.option("--no-layer-distortion", is_flag=True,
              help="Skip measuring each weight pruned alone (one pass per weight).")
@click.option("--report", "report_path", type=click.Path(path_type=Path), default=None,
              help="Write the JSON report here.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None,
              help="Draw the R-D curves and chosen densities to this PNG (needs matplotlib).")
@click.option("--force", is_flag=True, help="Replace existing outputs.")
@rd_options
@data_options
@common_options
def compress_cmd(model: Path, output: Path | None, fmt: str, report_path: Path | None,
                 plot_path: Path | None, force: bool, test_data: Path | None,
                 labels: str | None, curves_path: Path | None, quiet: bool, debug: bool,
                 **kw) -> None:
    """Compress MODEL to a target (--rate, --max-distortion, --min-agreement or
    --bits-per-weight) and report what it costs.

    Pruning makes files smaller, not faster: ONNX Runtime densifies weights at load.
    """
    from .api import compress
    from .calibrate import Curves
    from .model import check_output
    from .plot import plot_report, require_matplotlib
    from .report import render

    if not model.is_file():
        raise UsageError(f"model file not found: {model}")
    output = output or model.with_name(
        model.stem + (".rdonnx" if fmt == "rdonnx" else ".pruned.onnx"))
    paths = [p for p in (output, report_path, plot_path) if p is not None]
    if len({p.resolve() for p in paths}) < len(paths):
        raise UsageError("-o, --report and --plot must name different files")
    for path in paths:
        check_output(path, model, force)
    if labels and test_data is None:
        raise UsageError("--labels needs --test DATA")
    calib = kw.pop("calib")
    if curves_path is not None and kw["grid"] is None:  # the grid the curves were measured on
        kw["grid"] = ",".join(str(d) for d in Curves.load(curves_path).grid)
    config = replace(_config(**{k: kw.pop(k) for k in list(kw) if k in _CONFIG_KEYS}),
                     rate=kw["rate"], max_distortion=kw["max_distortion"],
                     min_agreement=kw["min_agreement"], bits_per_weight=kw["bits_per_weight"],
                     method=kw["method"], solver=kw["solver"], normalize=kw["normalize"],
                     layer_distortion=not kw["no_layer_distortion"], format=fmt,
                     values=kw["values"], value_bits=kw["value_bits"],
                     value_budget=kw["value_budget"],
                     lossless_unpruned=kw["lossless_unpruned"], pattern=kw["pattern"],
                     quantizer=kw["quantizer"])
    config = replace(config, pqi_p=kw["pqi_p"], pqi_q=kw["pqi_q"], pqi_eta=kw["pqi_eta"],
                     pqi_gamma=kw["pqi_gamma"], pqi_mode=kw["pqi_mode"],
                     granularity=kw["granularity"], budget=kw["budget"],
                     hsic_samples=kw["hsic_samples"], hsic_beta=kw["hsic_beta"])
    config.check()
    if plot_path is not None:
        require_matplotlib()
    frontier = PLOT_RATES if plot_path is not None else ()
    result = compress(model, calib=calib, test=test_data, labels=labels, curves=curves_path,
                      config=config, quiet=quiet, frontier=frontier)
    result.save(output, fmt, force=force)
    for notice in result.report.notices:
        _note(notice, quiet)
    if report_path is not None:
        _write_text(report_path, result.report.to_json())
    if plot_path is not None:
        plot_report(result.report, plot_path)
    if not quiet:
        click.echo(render(result.report), err=True)


_CONFIG_KEYS = ("criterion", "reconstruct", "sequential", "damp", "metric", "channel_axis",
                "grid", "min_params", "include", "exclude", "no_simplify", "device",
                "batch_size", "calib_samples", "input_shape", "input_range", "seed", "replay_mb")


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
    from .api import calibrate
    from .model import check_output

    if not model.is_file():
        raise UsageError(f"model file not found: {model}")
    check_output(output, model, force)
    calib = kw.pop("calib")
    curves = calibrate(model, calib=calib, config=_config(**kw), quiet=quiet)
    _write_text(output, curves.to_json())
    if not quiet:
        click.echo(f"rdonnx: {len(curves.distortion)} curves x {len(curves.grid)} densities "
                   f"written to {output}", err=True)


@cli.command("inspect")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--min-params", type=int, default=DEFAULT_MIN_PARAMS, show_default=True,
              help="Smallest weight (elements) counted as prunable.")
@click.option("--include", multiple=True, metavar="GLOB", help="Also list these tensors.")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Leave these tensors out.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--suggest-rate", is_flag=True,
              help="Also print a data-free --rate: the PQ index fixed-point density.")
@common_options
def inspect_cmd(model: Path, min_params: int, include: tuple[str, ...],
                exclude: tuple[str, ...], as_json: bool, suggest_rate: bool, quiet: bool,
                debug: bool) -> None:
    """List the prunable weights of MODEL (or what an .rdonnx artifact holds)."""
    from .api import inspect
    from .artifact import inspect_artifact
    from .container import is_artifact
    from .pqi import INSPECT_PAIRS

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
@click.option("--metric", type=click.Choice(METRICS), default="nmse", show_default=True,
              help="The distortion that --fail-above checks.")
@click.option("--fail-above", type=float, default=None,
              help="Exit 3 when the distortion exceeds this bound (for CI).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@data_options
@common_options
def evaluate_cmd(reference: Path, candidate: Path, data: Path | None, labels: str | None,
                 metric: str, fail_above: float | None, as_json: bool, batch_size: int,
                 calib_samples: int | None, input_shape: tuple[str, ...],
                 input_range: tuple[str, ...], seed: int, device: str, quiet: bool,
                 debug: bool) -> None:
    """Distortion of CANDIDATE against REFERENCE (and accuracy with --labels)."""
    from .api import evaluate

    result = evaluate(reference, candidate, data, labels=labels, metric=metric, device=device,
                      options=_data(batch_size, calib_samples, input_shape, input_range, seed),
                      quiet=quiet)
    if as_json:
        click.echo(strictjson.dumps(result.__dict__, indent=2, sort_keys=True))
    else:
        lines = [f"{metric}: {result.distortion:.6g}"] + [
            f"{name}: {value:.6g}" for name, value in (("nmse", result.nmse),
                                                      ("cosine", result.cosine))
            if name != metric]
        if result.kl is not None:
            lines.append(f"kl: {result.kl:.6g}")
        if result.top1_agreement is not None:
            lines.append(f"top-1 agreement: {result.top1_agreement:.2%}")
        if result.accuracy_original is not None:
            lines.append(f"accuracy: {result.accuracy_original:.2%} (reference) -> "
                         f"{result.accuracy_compressed:.2%} (candidate)")
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
    from .artifact import decompress
    from .model import check_output

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
                 debug: bool, batch_size: int, calib_samples: int | None,
                 input_shape: tuple[str, ...], input_range: tuple[str, ...], seed: int,
                 device: str) -> None:
    """Cut the SuRP stream of ARTIFACT (compress --method surp) to a shorter prefix."""
    from .surp import truncate_artifact

    if max_distortion is not None and calib is None:
        raise UsageError("--max-distortion needs --calib DATA")
    result = truncate_artifact(
        artifact, output, rate=rate, bits_per_weight=bits_per_weight,
        max_distortion=max_distortion, calib=calib, reference=reference,
        data=_data(batch_size, calib_samples, input_shape, input_range, seed), device=device,
        quiet=quiet, force=force)
    extra = "" if result.distortion is None else f", distortion {result.distortion:.6g}"
    _note(f"wrote {output} ({result.size:,} bytes, {result.steps:,} steps, rate "
          f"{result.rate:.4g}, {result.bits_per_weight:.4f} bits per weight{extra})", quiet)


@cli.command("doctor")
def doctor_cmd() -> None:
    """Print versions, execution providers and whether a GPU works."""
    import importlib.metadata as md

    from .runtime import cuda_status

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
    """Run the CLI; returns the exit code (0 ok, 1 internal error, 2 bad input, 3 bound)."""
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
