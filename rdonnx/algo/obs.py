"""Layer-wise reconstruction: prune and/or quantize one weight while updating its survivors.

This is SparseGPT (Frantar & Alistarh 2023) with GPTQ's error feedback, framework-free and on
torch tensors. A weight of a linear operator is viewed as one or more matrices W [rows, d] whose
columns meet the input features of its layer; H = E[x x^T] of those features (streamed from
calibration data by `Hessian`) measures how a change of W shows at the layer's output:

    layer_error(W, W') = trace((W - W') H (W - W')^T)   (the mean squared output change)

`reconstruct` zeroes (and/or rounds) the columns of W left to right and, after each column,
moves its error onto the columns not yet processed along the optimal (OBS) direction, in
SparseGPT's blocked lazy-update form. The mask is given (`keep`), or chosen on the fly from the
OBS saliency w^2 / [H^-1]_jj^2 (`sparsity`: adaptive per column block; `n_m`: N of every M).

Math is float32 except H's inversion (float64) and the error measure (float64). Everything
runs on the device of the tensors handed in (`device` for `Hessian`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import NamedTuple, TypeVar

import numpy as np
import torch

from rdonnx.algo.layout import LayerInput, unfold
from rdonnx.choices import DEFAULT_DAMP

RECURRENT = ("LSTM", "GRU", "RNN")
_T = TypeVar("_T")


class Target(NamedTuple):
    """Statistics that aim a layer fed compressed inputs x at the original output W x_original:
    cross = E[x_original x^T], original = E[x_original x_original^T] (H is E[x x^T])."""

    cross: torch.Tensor
    original: torch.Tensor


# ---------------------------------------------------------------------------------------------
# H = E[x x^T] of one weight's layer input


def _matmul_rank(entry: LayerInput) -> int:
    """The weight's rank as implied by a MatMul entry's axes (see `rdonnx.graph.layers`)."""
    return max(entry.in_axis or 0, entry.row_axis) + 1


def _check_entry(entry: LayerInput) -> None:
    if entry.op == "Conv":
        if len(entry.kernel) not in (1, 2):
            raise ValueError(f"{entry.weight}: only 1-D and 2-D convolutions are supported")
        return
    if entry.op == "MatMul" and _matmul_rank(entry) != 2:
        raise ValueError(f"{entry.weight}: a MatMul weight of rank > 2 multiplies a different "
                         "input per batch slice; layer reconstruction needs a rank-2 weight")
    if entry.op not in ("MatMul", "Gemm", *RECURRENT):
        raise ValueError(f"{entry.weight}: {entry.op} weights are not supported by layer "
                         "reconstruction")


def input_key(entry: LayerInput) -> LayerInput:
    """What a layer's Hessian depends on: entries with equal keys have equal Hessians (the same
    input tensors, unfolded the same way; which weight multiplies them, and along which axes,
    aside). Attention's q, k and v projections share one."""
    return replace(entry, weight="", in_axis=None, row_axis=0)


def torch_device(name: str) -> str:
    """`name` ("cpu" or "cuda") where torch can use it, else "cpu" (a CPU-only torch next to
    onnxruntime-gpu reconstructs on the CPU)."""
    return name if name != "cuda" or torch.cuda.is_available() else "cpu"


class Hessian:
    """Running mean of x x^T over the input features of one weight (one matrix per conv group).

    Columns are built exactly as `layout.SecondMoments` builds them: for MatMul/Gemm/LSTM/GRU/RNN
    the features lie along `entry.feature_axis` and every other axis holds samples; convolutions
    are unfolded (im2col, `layout.unfold`), one feature per (input channel, kernel position).
    A grouped convolution keeps one [C/g * K, C/g * K] matrix per group (never the full one).
    Memory is independent of the number of samples: each batch is folded into the mean as
    H <- H * n / (n + k) + X X^T / (n + k), as SparseGPT's add_batch does.

    `add_pair` folds in the input the layer sees in a compressed model (H of it) together with
    the original model's input of the same samples: G = E[x_original x^T], with which
    `reconstruct` aims the compressed layer at the original layer's output (`cross`).
    """

    def __init__(self, entry: LayerInput, device: str | torch.device | None = None,
                 dtype: torch.dtype = torch.float32):
        _check_entry(entry)
        self.entry = entry
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self.groups = entry.groups if entry.op == "Conv" else 1
        self.count = 0  # samples (columns) seen
        self._h: torch.Tensor | None = None  # [groups, d, d]
        self._g: torch.Tensor | None = None  # [groups, d, d], E[x_original x^T]
        self._ho: torch.Tensor | None = None  # [groups, d, d], E[x_original x_original^T]

    def columns(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        """The batch as feature columns [groups, d, samples] (float32, on `device`)."""
        t = x if isinstance(x, torch.Tensor) else torch.from_numpy(
            np.ascontiguousarray(x, dtype=np.float32))
        t = t.to(self.device, torch.float32)
        e = self.entry
        if e.op == "Conv":
            if t.dim() != len(e.kernel) + 2:
                raise ValueError(f"{e.weight}: a {len(e.kernel)}-D convolution input must have "
                                 f"rank {len(e.kernel) + 2}, got shape {tuple(t.shape)}")
            cols = unfold(t, e)  # [C * K, positions], channel-major
            if cols.shape[0] % self.groups:
                raise ValueError(f"{e.weight}: {cols.shape[0]} unfolded features do not split "
                                 f"into {self.groups} groups")
            return cols.reshape(self.groups, cols.shape[0] // self.groups, -1)
        t = t.movedim(e.feature_axis, -1)
        return t.reshape(-1, t.shape[-1]).T.unsqueeze(0)

    def add_batch(self, x: np.ndarray | torch.Tensor) -> None:
        """Fold one batch of the consumer's input tensor (as ONNX Runtime returns it) in."""
        if self._g is not None:
            raise ValueError(f"{self.entry.weight}: this Hessian takes input pairs (add_pair)")
        self._fold(self.columns(x).to(self.dtype), None)

    def add_pair(self, original: np.ndarray | torch.Tensor,
                 compressed: np.ndarray | torch.Tensor) -> None:
        """Fold in one batch of the layer's input in a compressed model and in the original."""
        if self._h is not None and self._g is None:
            raise ValueError(f"{self.entry.weight}: this Hessian takes single inputs "
                             "(add_batch)")
        cols = self.columns(compressed).to(self.dtype)
        orig = self.columns(original).to(self.dtype)
        if orig.shape != cols.shape:
            raise ValueError(f"{self.entry.weight}: original and compressed inputs differ in "
                             f"shape ({tuple(orig.shape)} vs {tuple(cols.shape)})")
        self._fold(cols, orig)

    def _fold(self, cols: torch.Tensor, orig: torch.Tensor | None) -> None:
        k = cols.shape[2]
        if self._h is not None and cols.shape[1] != self._h.shape[1]:
            raise ValueError(f"{self.entry.weight}: batch has {cols.shape[1]} features per "
                             f"group, earlier batches had {self._h.shape[1]}")
        if k == 0:
            return
        if self._h is None:
            self._h = torch.zeros(cols.shape[0], cols.shape[1], cols.shape[1],
                                  device=self.device, dtype=self.dtype)
            if orig is not None:
                self._g, self._ho = torch.zeros_like(self._h), torch.zeros_like(self._h)
        total = self.count + k
        # H <- H * n/(n+k) + X X^T / (n+k), all groups in one batched product
        self._h = torch.baddbmm(self._h, cols, cols.transpose(1, 2),
                                beta=self.count / total, alpha=1.0 / total)
        if orig is not None:
            self._g = torch.baddbmm(self._g, orig, cols.transpose(1, 2),
                                    beta=self.count / total, alpha=1.0 / total)
            self._ho = torch.baddbmm(self._ho, orig, orig.transpose(1, 2),
                                     beta=self.count / total, alpha=1.0 / total)
        self.count = total

    @property
    def matrices(self) -> list[torch.Tensor]:
        """H of each group, [d, d] each (one matrix unless the layer is a grouped conv)."""
        if self._h is None:
            raise ValueError(f"{self.entry.weight}: no batch was added")
        return list(self._h.unbind(0))

    @property
    def targets(self) -> list[Target] | None:
        """(E[x_original x^T], E[x_original x_original^T]) of each group (None unless filled by
        `add_pair`)."""
        if self._g is None:
            return None
        return [Target(g, ho) for g, ho in zip(self._g.unbind(0), self._ho.unbind(0))]


# ---------------------------------------------------------------------------------------------
# The weight as matrices whose columns align with H's features


def to_matrices(weight: np.ndarray, entry: LayerInput) -> list[np.ndarray]:
    """The weight as [rows, d] matrices whose column j multiplies input feature j.

    MatMul/Gemm: one matrix ([in, out] weights are transposed). Conv [O, C/g, *kernel]: one
    matrix per group, W[g*O/g:(g+1)*O/g].reshape(O/g, -1) (channel-major, then kernel position,
    as im2col). LSTM/GRU/RNN W [dirs, gates*hidden, in]: one matrix per direction, all sharing
    the single H. Other layouts (ConvTranspose, rank > 2 MatMul weights) raise ValueError.
    """
    w = np.asarray(weight)
    _check_layout(entry, w.shape)
    if entry.op == "Conv":
        per = w.shape[0] // entry.groups
        return [np.ascontiguousarray(w[g * per:(g + 1) * per].reshape(per, -1))
                for g in range(entry.groups)]
    if entry.op in RECURRENT:
        return [np.ascontiguousarray(w[k]) for k in range(w.shape[0])]
    return [np.ascontiguousarray(w if entry.in_axis == 1 else w.T)]


def from_matrices(mats: Sequence[np.ndarray | torch.Tensor], entry: LayerInput,
                  shape: Sequence[int]) -> np.ndarray:
    """The exact inverse of `to_matrices`: the weight of `shape` (dtype of the matrices)."""
    shape = tuple(int(s) for s in shape)
    _check_layout(entry, shape)
    arrays = [m.detach().cpu().numpy() if isinstance(m, torch.Tensor) else np.asarray(m)
              for m in mats]
    if entry.op == "Conv":
        per = shape[0] // entry.groups
        if len(arrays) != entry.groups:
            raise ValueError(f"{entry.weight}: expected {entry.groups} matrices, got "
                             f"{len(arrays)}")
        out = np.concatenate([a.reshape(per, *shape[1:]) for a in arrays], axis=0)
    elif entry.op in RECURRENT:
        out = np.stack(arrays, axis=0)
    else:
        if len(arrays) != 1:
            raise ValueError(f"{entry.weight}: expected one matrix, got {len(arrays)}")
        out = arrays[0] if entry.in_axis == 1 else arrays[0].T
    if out.shape != shape:
        raise ValueError(f"{entry.weight}: matrices rebuild shape {out.shape}, not {shape}")
    return np.ascontiguousarray(out)


def supports(entry: LayerInput, shape: Sequence[int]) -> bool:
    """Whether a weight of this layout can be reconstructed."""
    try:
        _check_layout(entry, tuple(shape))
    except ValueError:
        return False
    return True


def hessian_bytes(entry: LayerInput, shape: Sequence[int]) -> int:
    """Peak bytes one layer's reconstruction holds in Hessians: [groups, d, d] float32 H, G and
    H_o (sequential mode) and about three float64 working copies while inverting (d: the
    input features of one output row, C/g x kernel for a convolution)."""
    shape = tuple(int(s) for s in shape)
    d = int(np.prod(shape[1:])) if entry.op == "Conv" else shape[entry.in_axis]
    groups = entry.groups if entry.op == "Conv" else 1
    return groups * d * d * (3 * 4 + 3 * 8)


def _check_layout(entry: LayerInput, shape: tuple[int, ...]) -> None:
    _check_entry(entry)
    name, op = entry.weight, entry.op
    if op == "Conv":
        if len(shape) != len(entry.kernel) + 2 or tuple(shape[2:]) != tuple(entry.kernel):
            raise ValueError(f"{name}: Conv weight shape {shape} does not match kernel "
                             f"{entry.kernel}")
        if entry.groups < 1 or shape[0] % entry.groups:
            raise ValueError(f"{name}: {shape[0]} output channels do not split into "
                             f"{entry.groups} groups")
    elif op in RECURRENT:
        if len(shape) != 3 or entry.in_axis != 2:
            raise ValueError(f"{name}: {op} input weight must be [dirs, gates*hidden, in]")
    elif len(shape) != 2 or {entry.in_axis, entry.row_axis} != {0, 1}:
        raise ValueError(f"{name}: {op} weight of shape {shape} is not a plain matrix")


def _pair(hs: Sequence[_T], count: int) -> list[_T]:
    """The H (or Target) of each of `count` matrices (per group, or one shared by every
    direction)."""
    if len(hs) == count:
        return list(hs)
    if len(hs) == 1:
        return [hs[0]] * count
    raise ValueError(f"{count} matrices do not pair with {len(hs)} Hessians")


# ---------------------------------------------------------------------------------------------
# SparseGPT / GPTQ


def layer_error(W: torch.Tensor, W_new: torch.Tensor, H: torch.Tensor,
                target: Target | None = None) -> float:
    """trace((W - W_new) H (W - W_new)^T) in float64: the mean squared change of the layer's
    output on the calibration data (H is a mean over samples). With `target`, W_new is fed the
    compressed inputs (H) and compared with W on the original ones: E||W x_original - W_new x||^2.
    """
    return float(_row_errors(W, W_new, H, target).sum())


def _round(w: torch.Tensor, step: float | np.ndarray | torch.Tensor | None, levels: int | None,
           nonzero: bool = False) -> torch.Tensor:
    """Nearest multiple of `step` (float32, as quantize.quantize), clipped to +-levels*step;
    `step` is one number or one per row (w is a column [rows] or a matrix [rows, d], either
    with a leading batch axis, and a per-row step then [batch, rows]).

    With `nonzero`, a nonzero value never rounds to 0 (it takes the first level of its sign), so
    a structured N:M mask survives quantization."""
    if step is None:
        return w
    s = torch.as_tensor(np.asarray(step, dtype=np.float32), device=w.device) \
        if not isinstance(step, torch.Tensor) else step.to(w.device, torch.float32)
    if s.dim() and s.dim() == w.dim() - 1:  # per row, against a matrix
        s = s[..., None]
    q = torch.round(w / s)
    if nonzero:
        q = torch.where((q == 0) & (w != 0), torch.sign(w), q)
    if levels is not None:
        q = q.clamp(-levels, levels)
    return q * s


def _inverse_factor(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dead-input masks [b, d] and the upper Cholesky factors of (H + damp I)^-1 [b, d, d], in
    float64, of a batch of Hessians H [b, d, d].

    Dead inputs (H_jj = 0) get H_jj = 1, so they neither take nor give updates. Dampening is
    percdamp * mean(diag(H)) of each matrix; where a matrix is still not positive definite
    (e.g. percdamp = 0 on rank-deficient data) its dampening grows tenfold until the
    factorisations succeed.
    """
    H = H.to(torch.float64).clone()
    if not torch.isfinite(H).all():
        raise ValueError("the Hessian holds inf or NaN values")
    dead = torch.diagonal(H, dim1=-2, dim2=-1) <= 0
    H = H.masked_fill(dead[:, :, None] | dead[:, None, :], 0)
    torch.diagonal(H, dim1=-2, dim2=-1).masked_fill_(dead, 1)

    def upper_inverse(L: torch.Tensor, *_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
        return U, (info == 0) & torch.isfinite(U).flatten(1).all(1)

    return dead, _dampened(H, percdamp, upper_inverse)


def _dampened(H64: torch.Tensor, percdamp: float,
              use: Callable[[torch.Tensor, torch.Tensor, torch.Tensor],
                            tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """use(L, damp, index) of each matrix of the batch H64 [b, d, d] (float64): L the Cholesky
    factors of H[index] + damp I, damp = percdamp * mean(diag(H)) grown tenfold (at least to
    1e-10 * mean) until the factorisation succeeds and `use` says its result is good (`use`
    returns the results and a success flag per matrix)."""
    b, d = H64.shape[0], H64.shape[-1]
    eye = torch.eye(d, dtype=torch.float64, device=H64.device)
    mean = torch.diagonal(H64, dim1=-2, dim2=-1).mean(-1) if d else \
        torch.zeros(b, dtype=torch.float64, device=H64.device)
    damp = percdamp * mean
    out: torch.Tensor | None = None
    todo = torch.arange(b, device=H64.device)
    for _ in range(12):
        L, info = torch.linalg.cholesky_ex(H64[todo] + damp[todo, None, None] * eye)
        factored = info == 0
        if factored.any():
            at = todo[factored]
            result, good = use(L[factored], damp[at], at)
            if out is None:
                out = torch.empty((b, *result.shape[1:]), dtype=result.dtype,
                                  device=result.device)
            out[at[good]] = result[good]
            done = torch.zeros_like(factored)
            done[factored] = good
            factored = done
        todo = todo[~factored]
        if not todo.numel():
            return out
        damp[todo] = torch.maximum(torch.maximum(damp[todo] * 10, 1e-10 * mean[todo]),
                                   torch.full_like(damp[todo], 1e-30))
    raise ValueError("the Hessian could not be inverted, even with dampening")


def reconstruct(W: torch.Tensor, H: torch.Tensor, *, keep: torch.Tensor | None = None,
                sparsity: float | None = None, n_m: tuple[int, int] | None = None,
                step: float | np.ndarray | torch.Tensor | None = None,
                levels: int | None = None, blocksize: int = 128,
                percdamp: float = DEFAULT_DAMP, target: Target | None = None,
                factors: dict | None = None) -> torch.Tensor:
    """Prune and/or quantize W [rows, d] with SparseGPT's OBS updates (H [d, d] = E[x x^T]).

    A batch of matrices W [b, rows, d], each with its own H [b, d, d] (a grouped convolution's
    groups), is reconstructed in one sweep: every argument then has the leading batch axis
    (`keep` [b, rows, d], a per-row `step` [b, rows], `target`'s matrices [b, d, d]) and each
    matrix gets what it would get alone.

    The mask is `keep` (bool, True = kept), or chosen during the sweep from the OBS saliency
    w^2 / [Hinv]_jj^2 of the current (already updated) weights: `sparsity` prunes
    round(sparsity * rows * width) entries of each column block (SparseGPT's adaptive
    selection, compared across the block's rows), `n_m = (N, M)` keeps N of every M consecutive
    columns of each row (with `keep` given too, `keep` is the N:M mask and is only checked).
    With `step` (one number, or one per row), survivors are rounded to multiples of step
    (clipped to +-levels*step) with GPTQ's error feedback. Pruned entries are exactly 0 and
    survivors are exact multiples of step (float32 q * step, as quantize.dequantize; a survivor
    that rounds to 0 is 0).
    Dampening adds percdamp * mean(diag(H)) to H's diagonal before the inversion (grown tenfold
    per retry if H + damp I is still not positive definite).

    `factors`: a dict kept across calls with the same H, holding its inverse factors (computed
    once per dampening and column order: most of the time of GPTQ's grid search).

    With `target` (sequential mode: H is the input the layer sees once earlier layers are
    compressed), the error to minimise is E||W x_original - W' x||^2: the sweep starts from its
    unconstrained optimum W G (H + damp I)^-1 instead of W, so the layer also undoes what the
    earlier layers' compression changed in its input.

    The algorithm is IST-DASLab/sparsegpt `fasterprune` with these deviations:
    - a kept weight of a dead input (H_jj = 0) keeps its (rounded) value (SparseGPT zeroes it:
      free on the calibration data, not on unseen data); the OBS selection scores dead inputs
      0, so they go first, as in SparseGPT;
    - the block selection prunes exactly round(sparsity * numel) entries (SparseGPT's threshold
      `<=` takes one more, and ties);
    - an N:M group that would straddle a block boundary cannot occur (the block size is rounded
      down to a multiple of M); a last, partial group of r < M columns keeps min(N, r);
    - when quantizing without N:M, columns are swept in descending H_jj (GPTQ's act-order):
      the inputs that matter most are rounded first, while every later column can still
      absorb their error.

    Guarantee: layer_error(W, result, H, target) <= layer_error(W, plain, H, target), where
    `plain` applies the
    same final mask and the same rounding to W without any update. The sequential sweep alone
    can violate this: dampening biases the updates, and each update also flows into columns
    that are pruned later (where it is lost) or clipped, so on ill-conditioned H a row can end
    up far worse than not compensating at all. The error decomposes over rows, so each row's
    error is measured both ways (float64, undamped H) and a row whose sweep is worse is
    returned as `plain` (same mask, same grid): the guarantee then holds row by row.
    """
    if W.dim() == 2:  # one matrix: a batch of one
        if H.dim() != 2:
            raise ValueError(f"H of shape {tuple(H.shape)} does not match a matrix W")
        if step is not None and np.ndim(step) == 1:  # per row
            step = torch.as_tensor(np.asarray(step, dtype=np.float32)) \
                if not isinstance(step, torch.Tensor) else step
            step = step[None]
        return reconstruct(W[None], H[None], keep=None if keep is None else keep[None],
                           sparsity=sparsity, n_m=n_m, step=step, levels=levels,
                           blocksize=blocksize, percdamp=percdamp,
                           target=None if target is None else Target(*(t[None] for t in target)),
                           factors=factors)[0]
    if W.dim() != 3:
        raise ValueError(f"W must be a matrix, got shape {tuple(W.shape)}")
    b, rows, d = W.shape
    if tuple(H.shape) != (b, d, d):
        raise ValueError(f"H of shape {tuple(H.shape[1:] if H.dim() == 3 else H.shape)} does "
                         f"not match W's {d} columns")
    if keep is not None and tuple(keep.shape) != (b, rows, d):
        raise ValueError(f"keep of shape {tuple(keep.shape[1:])} does not match W "
                         f"{(rows, d)}")
    if sparsity is not None and (keep is not None or n_m is not None):
        raise ValueError("sparsity selects the mask: give neither keep nor n_m with it")
    if sparsity is not None and not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    if n_m is not None:
        n, m = (int(v) for v in n_m)
        if not 0 <= n <= m or m < 1:
            raise ValueError(f"n_m must satisfy 0 <= N <= M, M >= 1, got {n_m}")
    if step is not None:
        step_array = step.detach().cpu().numpy() if isinstance(step, torch.Tensor) else \
            np.asarray(step, dtype=np.float64)
        if step_array.ndim > 2 or step_array.ndim and step_array.shape != (b, rows) or \
                not np.all(np.isfinite(step_array) & (step_array > 0)):
            raise ValueError(f"step must be one positive number or one per row, got {step}")
    if levels is not None and (step is None or int(levels) < 1):
        raise ValueError("levels needs a step and must be >= 1")
    if blocksize < 1:
        raise ValueError("blocksize must be >= 1")
    W0 = W.to(torch.float32)
    if not torch.isfinite(W0).all():
        raise ValueError("W holds inf or NaN values")
    device = W0.device
    pruned = torch.zeros(b, rows, d, dtype=torch.bool, device=device)
    if keep is not None:
        pruned = ~keep.to(device, torch.bool)
        if n_m is not None:
            _check_n_m(~pruned, n, m)
    if (keep is None or not pruned.any()) and sparsity is None and n_m is None and \
            step is None and target is None:
        return W0.clone()  # nothing pruned, rounded or aimed: no update
    if isinstance(step, torch.Tensor) or np.ndim(step):
        step = torch.as_tensor(step_array, dtype=torch.float32, device=device)
    select = n_m if keep is None else None
    nonzero = n_m is not None
    H = H.to(device)
    start = W0 if target is None else _aimed(W0, H, target, percdamp)
    if keep is None and sparsity is None and n_m is None and step is None:
        Wc = start  # aimed, nothing pruned or rounded: no sweep
    elif step is not None and n_m is None:  # GPTQ's act-order: largest H_jj first
        order = torch.argsort(-torch.diagonal(H, dim1=-2, dim2=-1), dim=-1, stable=True)
        back = torch.argsort(order, dim=-1)
        columns = order[:, None, :].expand(b, rows, d)
        permuted = pruned.gather(2, columns)  # filled in by the sparsity selection
        Hp = H.gather(1, order[:, :, None].expand(b, d, d)).gather(2, order[:, None, :]
                                                                   .expand(b, d, d))
        Wc = _sweep(start.gather(2, columns), Hp, permuted, sparsity, None, step, levels,
                    blocksize, percdamp, factors=_slot(factors, "ordered"))
        Wc = Wc.gather(2, back[:, None, :].expand(b, rows, d))
        pruned = permuted.gather(2, back[:, None, :].expand(b, rows, d))
    else:
        Wc = _sweep(start, H, pruned, sparsity, select, step, levels, blocksize, percdamp,
                    nonzero, _slot(factors, "given"))
    plain = torch.where(pruned, torch.zeros_like(W0), _round(W0, step, levels, nonzero))
    worse = _row_errors(W0, Wc, H, target) > _row_errors(W0, plain, H, target)
    return torch.where(worse[..., None], plain, Wc)


def _slot(factors: dict | None, key: object) -> dict | None:
    """The sub-dict of `factors` under `key` (None without `factors`)."""
    return None if factors is None else factors.setdefault(key, {})


def _sweep(W0: torch.Tensor, H: torch.Tensor, pruned: torch.Tensor, sparsity: float | None,
           n_m: tuple[int, int] | None, step: float | torch.Tensor | None, levels: int | None,
           blocksize: int, percdamp: float, nonzero: bool = False,
           factors: dict | None = None) -> torch.Tensor:
    """SparseGPT's blocked sweep without the final check, over a batch W0 [b, rows, d] with
    H [b, d, d] (or one matrix [rows, d] with H [d, d]). `pruned` (True = pruned) is the given
    mask, or all False and filled in place by the `sparsity` / `n_m` selection."""
    if W0.dim() == 2:
        view = pruned[None]
        out = _sweep(W0[None], H[None], view, sparsity, n_m,
                     step[None] if isinstance(step, torch.Tensor) and step.dim() else step,
                     levels, blocksize, percdamp, nonzero, factors)
        return out[0]
    b, rows, d = W0.shape
    device = W0.device
    factors = {} if factors is None else factors
    if percdamp not in factors:
        factors[percdamp] = _inverse_factor(H, percdamp)
    dead, U64 = factors[percdamp]
    Hinv = U64.to(torch.float32)
    select_n_m = n_m is not None
    if select_n_m:
        n, m = (int(v) for v in n_m)
        blocksize = max(m, blocksize // m * m)
    Wc = W0.clone()
    for i1 in range(0, d, blocksize):
        i2 = min(i1 + blocksize, d)
        count = i2 - i1
        W1 = Wc[:, :, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[:, i1:i2, i1:i2]
        hdiag = torch.diagonal(Hinv1, dim1=-2, dim2=-1)  # [b, count]
        dead1 = dead[:, i1:i2]
        P1 = pruned[:, :, i1:i2]  # a view: selections below write into `pruned`
        if sparsity is not None:
            score = (W1.pow(2) / hdiag.pow(2)[:, None, :]).masked_fill(dead1[:, None, :], 0)
            k = int(round(sparsity * rows * count))
            order = torch.argsort(score.reshape(b, -1), dim=1, stable=True)[:, :k]
            chosen = torch.zeros(b, rows * count, dtype=torch.bool, device=device)
            chosen.scatter_(1, order, True)
            pruned[:, :, i1:i2] = chosen.view(b, rows, count)
        for i in range(count):
            if select_n_m and i % m == 0:
                width = min(m, count - i)
                drop = width - min(n, width)
                if drop:
                    score = (W1[:, :, i:i + width].pow(2) /
                             hdiag[:, i:i + width].pow(2)[:, None, :]).masked_fill(
                                 dead1[:, None, i:i + width], 0)
                    idx = torch.topk(score, drop, dim=2, largest=False).indices
                    P1[:, :, i:i + width].scatter_(2, idx, True)
            w = W1[:, :, i]
            q = torch.where(P1[:, :, i], torch.zeros_like(w), _round(w, step, levels, nonzero))
            Q1[:, :, i] = q
            err = (w - q) / hdiag[:, i, None]
            W1[:, :, i:] -= err[:, :, None] * Hinv1[:, None, i, i:]
            Err1[:, :, i] = err
        Wc[:, :, i1:i2] = Q1
        if i2 < d:
            Wc[:, :, i2:] -= Err1 @ Hinv[:, i1:i2, i2:]
    return Wc


def _row_errors(W: torch.Tensor, W_new: torch.Tensor, H: torch.Tensor,
                target: Target | None = None) -> torch.Tensor:
    W64, N64 = W.to(torch.float64), W_new.to(W.device, torch.float64)
    H64 = H.to(W.device, torch.float64)
    if target is None:
        D = W64 - N64
        return ((D @ H64) * D).sum(-1)
    G, Ho = (t.to(W.device, torch.float64) for t in target)
    return ((W64 @ Ho) * W64).sum(-1) - 2 * ((W64 @ G) * N64).sum(-1) + \
        ((N64 @ H64) * N64).sum(-1)


def _aimed(W: torch.Tensor, H: torch.Tensor, target: Target, percdamp: float) -> torch.Tensor:
    """argmin_W' E||W x_original - W' x||^2 + damp ||W' - W||^2 = (W G + damp W)(H + damp I)^-1
    (float32) of each matrix of the batch W [b, rows, d]: the dampening pulls towards W, so
    unchanged inputs (G = H) give W back and an input never seen keeps its weight. Dampening
    grows tenfold while H + damp I is singular."""
    W64 = W.to(torch.float64)
    H64 = H.to(W.device, torch.float64)
    G64 = target.cross.to(W.device, torch.float64)
    if not (torch.isfinite(H64).all() and torch.isfinite(G64).all()):
        raise ValueError("the Hessian holds inf or NaN values")

    def solve(L: torch.Tensor, damp: torch.Tensor, index: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        w = W64[index]
        aimed = torch.cholesky_solve((w @ G64[index] + damp[:, None, None] * w).mT, L).mT
        return aimed.to(torch.float32), torch.isfinite(aimed).flatten(1).all(1)

    return _dampened(H64, percdamp, solve)


def _check_n_m(kept: torch.Tensor, n: int, m: int) -> None:
    d = kept.shape[-1]
    full = d // m * m
    if full and int(kept[..., :full].reshape(*kept.shape[:-1], -1, m).sum(-1).max()) > n:
        raise ValueError(f"keep holds more than {n} of {m} consecutive entries in a row")


# ---------------------------------------------------------------------------------------------
# Whole weights


def reconstruct_weight(weight: np.ndarray, entry: LayerInput, hessian: Hessian, *,
                       keep: np.ndarray | None = None, device: str | torch.device | None = None,
                       **options) -> np.ndarray:
    """`reconstruct` applied to the matrices of a weight tensor, all in one batch (options as
    `reconstruct`; `factors`: one dict kept across calls with the same `hessian`).

    `keep` has the weight's shape; a per-row `step` is given broadcastable to it (one value per
    index along the weight's output-row axis). Returns the new weight in the weight's dtype.
    """
    w = np.asarray(weight)
    dev = torch.device(device) if device is not None else hessian.device
    W = torch.from_numpy(np.stack(to_matrices(w.astype(np.float32, copy=False), entry))).to(dev)
    if keep is not None:
        keep = torch.from_numpy(np.stack(to_matrices(np.asarray(keep, dtype=bool), entry))
                                ).to(dev)
    if np.ndim(options.get("step")) > 0:  # per row: given broadcastable to the weight
        options["step"] = torch.from_numpy(np.stack([m[:, 0] for m in to_matrices(
            np.broadcast_to(np.asarray(options["step"], dtype=np.float32), w.shape), entry)]))
    H, target = _stacked(hessian, len(W))
    out = reconstruct(W, H.to(dev), keep=keep, target=target, **options)
    return from_matrices(list(out), entry, w.shape).astype(w.dtype, copy=False)


def _stacked(hessian: Hessian, count: int) -> tuple[torch.Tensor, Target | None]:
    """H [count, d, d] of each of a weight's `count` matrices (per group, or one shared by
    every direction), and their targets (None unless filled by `add_pair`)."""
    H = torch.stack(_pair(hessian.matrices, count))
    targets = hessian.targets
    if targets is None:
        return H, None
    paired = _pair(targets, count)
    return H, Target(torch.stack([t.cross for t in paired]),
                     torch.stack([t.original for t in paired]))


def _paired_matrices(weight: np.ndarray, new: np.ndarray, entry: LayerInput, hessian: Hessian
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Target | None]:
    """(W, W_new, H, target) of a weight's matrices as batches, W on H's device."""
    a = np.stack(to_matrices(np.array(weight, dtype=np.float32), entry))
    b = np.stack(to_matrices(np.array(new, dtype=np.float32), entry))
    H, target = _stacked(hessian, len(a))
    return torch.from_numpy(a).to(H.device), torch.from_numpy(b), H, target


def weight_error(weight: np.ndarray, new: np.ndarray, entry: LayerInput,
                 hessian: Hessian) -> float:
    """Sum of `layer_error` over a weight's matrices: its output change on the calibration data."""
    return layer_error(*_paired_matrices(weight, new, entry, hessian))


def row_energies(weight: np.ndarray, entry: LayerInput, hessian: Hessian) -> torch.Tensor:
    """Each output row's output energy on the calibration data, [matrices, rows]."""
    x, _, h, t = _paired_matrices(weight, weight, entry, hessian)
    return _row_errors(x, torch.zeros_like(x), h, t)


def relative_error(weight: np.ndarray, new: np.ndarray, entry: LayerInput, hessian: Hessian,
                   energies: torch.Tensor | None = None) -> float:
    """Sum over output rows of each row's output change relative to the row's own output
    energy on the calibration data (`grids.choose`'s measure): a channel 100x smaller than the
    others, which a normalisation downstream may scale back up, counts as much as they do.
    `energies`: `row_energies` of the same weight, when already computed (they do not depend
    on `new`)."""
    if energies is None:
        energies = row_energies(weight, entry, hessian)
    error = _row_errors(*_paired_matrices(weight, new, entry, hessian))
    live = energies > 0
    return float((error[live] / energies[live]).sum())
