"""The options of each method that has its own, one dataclass per method (plain data: the CLI
imports this). `rdonnx.flow.methods.registry` registers each class with its implementation;
a run holds the options of its method only (`CompressConfig.method_options`)."""

from __future__ import annotations

from dataclasses import dataclass

from rdonnx.choices import BUDGETS, HSIC_SAMPLES, SOLVERS, PQIOptions
from rdonnx.errors import UsageError
from rdonnx.option import option


@dataclass(frozen=True)
class RDOptions:
    """`--method rd`: how the equal-slope allocation is solved."""

    solver: str = option(  # "lagrange" (convex hulls) or "dp" (grid points only)
        "lagrange", "rd: equal-slope search on convex hulls, or DP over the grid points.",
        choices=tuple(SOLVERS))

    def check(self) -> None:
        if self.solver not in SOLVERS:
            raise UsageError(f"unknown solver {self.solver!r}; choose one of "
                             f"{', '.join(SOLVERS)}")


@dataclass(frozen=True)
class GlobalOptions:
    """`--method global`: one score threshold over all weights."""

    normalize: bool = option(  # scores divided by each tensor's RMS
        False, "global: compare scores divided by each tensor's RMS.")

    def check(self) -> None:
        pass


@dataclass(frozen=True)
class HSICOptions:
    """`--method hsic` (ITPruner): what the rate counts and how layers are compared."""

    budget: str = option(
        "params", "hsic: what --rate counts: parameters, or multiply-accumulates per sample "
        "(flops).", choices=BUDGETS)
    samples: int = option(
        HSIC_SAMPLES, "hsic: calibration samples whose layer outputs are compared.",
        key="hsic_samples")
    beta: float | None = option(
        None, "hsic: importance exp(-beta * s_i) [default: 10 * number of layers].",
        value_type=float, key="hsic_beta")

    def check(self) -> None:
        if self.budget not in BUDGETS:
            raise UsageError(f"unknown --budget {self.budget!r}; choose one of "
                             f"{', '.join(BUDGETS)}")
        if self.samples < 2:
            raise UsageError(f"--hsic-samples must be >= 2, got {self.samples}")
        if self.beta is not None and self.beta < 0:
            raise UsageError(f"--hsic-beta must be >= 0, got {self.beta}")


MethodOptions = RDOptions | GlobalOptions | PQIOptions | HSICOptions
# the methods with options of their own (the registry checks it registers the same classes)
METHOD_OPTIONS: dict[str, type] = {"rd": RDOptions, "global": GlobalOptions, "pqi": PQIOptions,
                                   "hsic": HSICOptions}
