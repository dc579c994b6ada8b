"""rdonnx.algo.obs: streamed Hessians, weight-matrix views and SparseGPT / GPTQ reconstruction.

Hessians are checked against brute-force X^T X / n (convolutions through an explicit im2col),
the matrix views against ONNX Runtime's own output, and `reconstruct` against its defining
properties: the mask is respected exactly, the layer's output error never grows beyond that
of the same mask (and rounding) without updates, and it vanishes when the pruned inputs are
copies of kept ones.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from _graphs import make_model, ort_run, vi
from onnx import TensorProto, helper, numpy_helper

from rdonnx.algo import obs
from rdonnx.algo.layout import LayerInput
from rdonnx.algo.obs import (
    Hessian,
    from_matrices,
    layer_error,
    reconstruct,
    reconstruct_weight,
    relative_error,
    supports,
    to_matrices,
    weight_error,
)
from rdonnx.algo.prune import prune
from rdonnx.graph.layers import layer_inputs
from rdonnx.graph.model import load_model
from rdonnx.graph.weights import find_weights

F = TensorProto.FLOAT


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _y():
    return helper.make_tensor_value_info("y", F, None)


def _entry(proto, name: str = "W") -> LayerInput:
    model = load_model(proto)
    return layer_inputs(model, find_weights(model, min_params=1))[name]


def _features_last(x: np.ndarray, axis: int) -> np.ndarray:
    x = np.moveaxis(x.astype(np.float64), axis, -1)
    return x.reshape(-1, x.shape[-1])


def _hessian(entry: LayerInput, *batches: np.ndarray) -> Hessian:
    h = Hessian(entry)
    for x in batches:
        h.add_batch(x)
    return h


# ---------------------------------------------------------------------------------------------
# Graphs: one consumer of the weight "W"


def _matmul_right(seed=0):
    w = _rng(seed).standard_normal((8, 16)).astype(np.float32)
    proto = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])],
                       [vi("x", F, ["N", 5, 8])], [_y()], {"W": w})
    return proto, w, (3, 5, 8), -1


def _matmul_left(seed=0):
    w = _rng(seed).standard_normal((16, 8)).astype(np.float32)
    proto = make_model([helper.make_node("MatMul", ["W", "x"], ["y"])],
                       [vi("x", F, ["N", 8, 5])], [_y()], {"W": w})
    return proto, w, (3, 8, 5), -2


def _gemm(trans_a=0, trans_b=1, seed=0):
    w = _rng(seed).standard_normal((16, 8) if trans_b else (8, 16)).astype(np.float32)
    x_shape = (8, 6) if trans_a else (6, 8)
    proto = make_model([helper.make_node("Gemm", ["x", "W"], ["y"], transA=trans_a,
                                         transB=trans_b)],
                       [vi("x", F, list(x_shape))], [_y()], {"W": w})
    return proto, w, x_shape, 0 if trans_a else 1


def _lstm(seed=0, hidden=4, features=8, direction="bidirectional"):
    dirs = 2 if direction == "bidirectional" else 1
    rng = _rng(seed)
    arrays = {"W": rng.standard_normal((dirs, 4 * hidden, features)).astype(np.float32),
              "R": rng.standard_normal((dirs, 4 * hidden, hidden)).astype(np.float32)}
    node = helper.make_node("LSTM", ["x", "W", "R"], ["y"], hidden_size=hidden,
                            direction=direction)
    proto = make_model([node], [vi("x", F, [5, "N", features])], [_y()], arrays)
    return proto, arrays["W"], (5, 3, features), -1


def _conv(x_shape=(3, 4, 7, 7), w_shape=(6, 2, 3, 3), seed=0, **attrs):
    w = _rng(seed).standard_normal(w_shape).astype(np.float32)
    proto = make_model([helper.make_node("Conv", ["x", "W"], ["y"], **attrs)],
                       [vi("x", F, ["N", *x_shape[1:]])], [_y()], {"W": w})
    return proto, w, x_shape


CONV2 = dict(strides=[2, 2], pads=[1, 1, 1, 1], group=2)  # stride 2, pad 1, groups 2


def _im2col(x: np.ndarray, kernel, stride: int, pad: int) -> np.ndarray:
    """2-D im2col by explicit indexing: [C, kh, kw, N, oh, ow] (float64, zero padding)."""
    x = np.pad(x.astype(np.float64), [(0, 0), (0, 0), (pad, pad), (pad, pad)])
    oh = (x.shape[2] - kernel[0]) // stride + 1
    ow = (x.shape[3] - kernel[1]) // stride + 1
    cols = np.zeros((x.shape[1], *kernel, x.shape[0], oh, ow))
    for a, b in itertools.product(range(kernel[0]), range(kernel[1])):
        for i, j in itertools.product(range(oh), range(ow)):
            cols[:, a, b, :, i, j] = x[:, :, i * stride + a, j * stride + b].T
    return cols


# ---------------------------------------------------------------------------------------------
# Hessian


@pytest.mark.parametrize("case", ["matmul_right", "matmul_left", "gemm_transA", "lstm"])
def test_hessian_equals_brute_force(case):
    proto, _, x_shape, axis = {"matmul_right": _matmul_right, "matmul_left": _matmul_left,
                               "gemm_transA": lambda: _gemm(trans_a=1), "lstm": _lstm}[case]()
    x = (_rng(1).standard_normal(x_shape) + 0.3).astype(np.float32)
    h = _hessian(_entry(proto), x)
    X = _features_last(x, axis)
    (got,) = h.matrices
    assert h.count == X.shape[0]
    np.testing.assert_allclose(got.numpy(), X.T @ X / X.shape[0], rtol=1e-5, atol=1e-6)


def test_conv_hessian_equals_an_explicit_im2col_per_group():
    proto, w, x_shape = _conv(**CONV2)
    x = (_rng(2).standard_normal(x_shape) + 0.5).astype(np.float32)
    cols = _im2col(x, (3, 3), 2, 1)  # [C, 3, 3, N, oh, ow]
    y = ort_run(proto, {"x": x})[0]  # the reference im2col is ONNX's convolution
    ref = np.stack([np.tensordot(w[o].astype(np.float64), cols[(o // 3) * 2:(o // 3 + 1) * 2],
                                 axes=3) for o in range(6)], axis=1)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
    h = _hessian(_entry(proto), x)
    assert len(h.matrices) == 2 and h.count == 3 * 4 * 4
    for g, got in enumerate(h.matrices):
        X = cols[2 * g:2 * g + 2].reshape(18, -1)  # channel-major, then kernel position
        np.testing.assert_allclose(got.numpy(), X @ X.T / X.shape[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["matmul", "conv"])
def test_streaming_over_uneven_batches_equals_one_shot(kind):
    proto, _, x_shape = _conv(**CONV2) if kind == "conv" else _matmul_right()[:3]
    x = (_rng(3).standard_normal((6, *x_shape[1:])) * 2 + 1).astype(np.float32)
    entry = _entry(proto)
    one = _hessian(entry, x)
    parts = _hessian(entry, x[:1], x[1:4], x[4:4], x[4:])
    assert parts.count == one.count
    for a, b in zip(one.matrices, parts.matrices):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def test_depthwise_conv_keeps_one_small_matrix_per_group():
    channels = 32
    proto, _, x_shape = _conv((2, channels, 6, 6), (channels, 1, 3, 3), group=channels,
                              pads=[1, 1, 1, 1])
    x = _rng(4).standard_normal(x_shape).astype(np.float32)
    h = _hessian(_entry(proto), x)
    mats = h.matrices
    assert len(mats) == channels and all(m.shape == (9, 9) for m in mats)
    assert h._h.numel() == channels * 81  # never the full (32 * 9)^2 matrix
    cols = _im2col(x, (3, 3), 1, 1)
    for c in (0, 17, 31):
        X = cols[c].reshape(9, -1)
        np.testing.assert_allclose(mats[c].numpy(), X @ X.T / X.shape[1], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Weight matrices


ROUND_TRIP = {
    "matmul_right": (LayerInput("W", "x", "MatMul", 0, 1, -1), (8, 16), 16),
    "matmul_left": (LayerInput("W", "x", "MatMul", 1, 0, -2), (16, 8), 16),
    "gemm": (LayerInput("W", "x", "Gemm", 0, 1, 1), (8, 16), 16),
    "gemm_transB": (LayerInput("W", "x", "Gemm", 1, 0, 1), (16, 8), 16),
    "conv": (LayerInput("W", "x", "Conv", None, 0, 1, kernel=(3, 3)), (6, 4, 3, 3), 6),
    "conv_groups2": (LayerInput("W", "x", "Conv", None, 0, 1, kernel=(3, 2), groups=2),
                     (6, 2, 3, 2), 3),
    "conv1d_groups2": (LayerInput("W", "x", "Conv", None, 0, 1, kernel=(3,), groups=2),
                       (6, 2, 3), 3),
    "depthwise": (LayerInput("W", "x", "Conv", None, 0, 1, kernel=(3, 3), groups=4),
                  (8, 1, 3, 3), 2),
    "lstm_bidirectional": (LayerInput("W", "x", "LSTM", 2, 1, -1), (2, 16, 8), 16),
    "gru": (LayerInput("W", "x", "GRU", 2, 1, -1), (1, 12, 8), 12),
}


@pytest.mark.parametrize("name", list(ROUND_TRIP))
def test_matrices_round_trip_exactly(name):
    entry, shape, rows = ROUND_TRIP[name]
    w = _rng(5).standard_normal(shape).astype(np.float32)
    mats = to_matrices(w, entry)
    assert all(m.shape[0] == rows for m in mats)
    assert sum(m.size for m in mats) == w.size
    assert supports(entry, shape)
    back = from_matrices(mats, entry, shape)
    assert back.shape == w.shape and back.dtype == w.dtype
    np.testing.assert_array_equal(back, w)
    back = from_matrices([torch.from_numpy(m) for m in mats], entry, shape)  # torch too
    np.testing.assert_array_equal(back, w)


@pytest.mark.parametrize("case", ["matmul_right", "matmul_left", "gemm_transB", "conv_groups2"])
def test_matrices_times_columns_reproduce_the_layer_output(case):
    if case == "conv_groups2":
        proto, w, x_shape = _conv(**CONV2)
    else:
        proto, w, x_shape, _ = {"matmul_right": _matmul_right, "matmul_left": _matmul_left,
                                "gemm_transB": _gemm}[case]()
    x = _rng(6).standard_normal(x_shape).astype(np.float32)
    entry = _entry(proto)
    y = ort_run(proto, {"x": x})[0]
    cols = Hessian(entry).columns(x).numpy().astype(np.float64)  # [groups, d, samples]
    mats = to_matrices(w, entry)
    got = np.concatenate([m.astype(np.float64) @ c for m, c in zip(mats, cols)], axis=0)
    if case == "conv_groups2":  # [N, O, oh, ow] -> [O, N * oh * ow]
        expected = np.moveaxis(y, 1, 0).reshape(y.shape[1], -1)
    else:  # output features along the same axis as the input features
        expected = _features_last(y, -2 if case == "matmul_left" else -1).T
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_unsupported_layouts_raise():
    w = _rng().standard_normal((4, 6, 3, 3)).astype(np.float32)
    proto = make_model([helper.make_node("ConvTranspose", ["x", "W"], ["y"])],
                       [vi("x", F, ["N", 4, 5, 5])], [_y()], {"W": w})
    entry = _entry(proto)
    assert not supports(entry, w.shape)
    with pytest.raises(ValueError, match="ConvTranspose"):
        to_matrices(w, entry)
    with pytest.raises(ValueError, match="ConvTranspose"):
        Hessian(entry)
    w3 = _rng().standard_normal((2, 8, 16)).astype(np.float32)
    proto = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])],
                       [vi("x", F, [2, "N", 8])], [_y()], {"W": w3})
    entry = _entry(proto)
    assert not supports(entry, w3.shape)
    with pytest.raises(ValueError, match="rank > 2"):
        to_matrices(w3, entry)
    with pytest.raises(ValueError, match="rank > 2"):
        Hessian(entry)
    entry = ROUND_TRIP["conv_groups2"][0]
    with pytest.raises(ValueError, match="groups"):
        to_matrices(np.zeros((5, 2, 3, 2), np.float32), entry)


# ---------------------------------------------------------------------------------------------
# reconstruct


def _correlated(n: int, d: int, rank: int = 4, noise: float = 0.1, seed: int = 0):
    """Inputs with a strong low-rank component, and their H = X^T X / n."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, rank, generator=g) @ torch.randn(rank, d, generator=g)
    X = X + noise * torch.randn(n, d, generator=g)
    return X, X.T @ X / n


def _iid(n: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    return X, X.T @ X / n


def _weights(rows: int, d: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, d, generator=torch.Generator().manual_seed(seed))


def _grid(W: torch.Tensor, step: float, levels: int) -> torch.Tensor:
    s = torch.tensor(step, dtype=torch.float32)
    return torch.round(W / s).clamp(-levels, levels) * s


@pytest.mark.parametrize("data", ["iid", "correlated"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fixed_mask_never_increases_the_layer_error(data, seed):
    _, H = (_iid if data == "iid" else _correlated)(256, 48, seed=seed)
    W = _weights(24, 48, seed)
    keep = torch.rand(24, 48, generator=torch.Generator().manual_seed(seed + 10)) > 0.5
    R = reconstruct(W, H, keep=keep, blocksize=16)
    assert R.dtype == torch.float32 and R.shape == W.shape
    assert torch.all(R[~keep] == 0)
    plain = layer_error(W, W * keep, H)
    new = layer_error(W, R, H)
    assert new <= plain * (1 + 1e-12)
    if data == "correlated":
        assert new < 0.5 * plain


def test_a_row_whose_sweep_is_worse_falls_back_to_the_plain_mask():
    """x3 = x1 + x2: pruning x1 moves its weight onto x3 and -x1's share onto x2; pruning x3
    then loses the first half, and the row ends worse (error 2) than not updating (error 1)."""
    H = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 2.0001]])
    W = torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, 0.0]])
    keep = torch.tensor([[False, True, False], [True, True, False]])
    pruned = ~keep
    swept = obs._sweep(W, H, pruned.clone(), None, None, None, None, 128, 1e-6)
    assert obs._row_errors(W, swept, H)[0] > 1.9 * obs._row_errors(W, W * keep, H)[0]
    R = reconstruct(W, H, keep=keep, percdamp=1e-6)
    assert torch.equal(R[0], W[0] * keep[0])  # the plain mask
    assert torch.equal(R[1], swept[1])  # the other row keeps its update
    assert layer_error(W, R, H) <= layer_error(W, W * keep, H)


# ---------------------------------------------------------------------------------------------
# aimed at the original output: inputs changed by compressed earlier layers (sequential mode)


def _paired(X_original: torch.Tensor, X: torch.Tensor) -> Hessian:
    """Hessian of the pairs fed as a [samples, d] MatMul input (Target from add_pair)."""
    proto = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])],
                       [vi("x", F, ["N", X.shape[1]])], [_y()],
                       {"W": np.zeros((X.shape[1], 3), np.float32)})
    h = Hessian(_entry(proto))
    h.add_pair(X_original[:100].numpy(), X[:100].numpy())
    h.add_pair(X_original[100:].numpy(), X[100:].numpy())
    return h


def test_paired_hessian_and_target_error_equal_brute_force():
    X0, _ = _correlated(256, 12, seed=5)
    X = X0 + 0.3 * torch.randn(256, 12, generator=torch.Generator().manual_seed(6))
    h = _paired(X0, X)
    (H,), (target,) = h.matrices, h.targets
    X0d, Xd = X0.double(), X.double()
    np.testing.assert_allclose(H.double(), Xd.T @ Xd / 256, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(target.cross.double(), X0d.T @ Xd / 256, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(target.original.double(), X0d.T @ X0d / 256, rtol=1e-4,
                               atol=1e-5)
    W, W_new = _weights(5, 12, seed=7), _weights(5, 12, seed=8)
    brute = float(((X0d @ W.double().T - Xd @ W_new.double().T) ** 2).sum(1).mean())
    assert layer_error(W, W_new, H, target) == pytest.approx(brute, rel=1e-4)
    with pytest.raises(ValueError, match="input pairs"):
        h.add_batch(X.numpy())


def test_aimed_reconstruction_undoes_an_invertible_change_of_the_input():
    """x = A x_original with A invertible: W' = W A^-1 reproduces the original output exactly,
    which plain reconstruction (aimed at W x) never attempts."""
    X0, _ = _iid(400, 10, seed=9)
    A = torch.eye(10) + 0.4 * torch.randn(10, 10, generator=torch.Generator().manual_seed(10))
    X = X0 @ A.T
    h = _paired(X0, X)
    (H,), (target,) = h.matrices, h.targets
    W = _weights(6, 10, seed=11)
    keep = torch.ones(6, 10, dtype=torch.bool)
    aimed = reconstruct(W, H, keep=keep, percdamp=1e-9, target=target)
    assert layer_error(W, aimed, H, target) < 1e-6 * layer_error(W, W, H, target)
    np.testing.assert_allclose(aimed, W @ torch.linalg.inv(A), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aimed_reconstruction_never_worse_than_the_plain_mask(seed):
    X0, _ = _correlated(300, 32, seed=seed)
    X = torch.where(torch.rand(300, 32, generator=torch.Generator().manual_seed(seed)) < 0.3,
                    0.0, X0)  # an earlier layer's pruning zeroed some inputs
    h = _paired(X0, X)
    (H,), (target,) = h.matrices, h.targets
    W = _weights(16, 32, seed)
    keep = torch.rand(16, 32, generator=torch.Generator().manual_seed(seed + 20)) > 0.5
    for step in (None, 0.2):
        R = reconstruct(W, H, keep=keep, blocksize=8, step=step, levels=7 if step else None,
                        target=target)
        assert torch.all(R[~keep] == 0)
        plain = torch.where(keep, W if step is None else _grid(W, step, 7), torch.zeros(()))
        aimed_error, plain_error = (layer_error(W, M, H, target) for M in (R, plain))
        assert aimed_error <= plain_error * (1 + 1e-9)
        # it also beats updating as if the inputs were unchanged (the SparseGPT target W x)
        assert aimed_error < layer_error(W, reconstruct(W, H, keep=keep, blocksize=8, step=step,
                                                        levels=7 if step else None), H, target)


def test_unchanged_inputs_aim_where_plain_reconstruction_does():
    X0, _ = _correlated(300, 24, seed=4)
    h = _paired(X0, X0)
    (H,), (target,) = h.matrices, h.targets
    W = _weights(8, 24, seed=4)
    keep = torch.rand(8, 24, generator=torch.Generator().manual_seed(5)) > 0.5
    aimed = reconstruct(W, H, keep=keep, percdamp=1e-7, target=target)
    plain = reconstruct(W, H, keep=keep, percdamp=1e-7)
    np.testing.assert_allclose(aimed, plain, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("blocksize", [4, 128])
def test_a_pruned_copy_of_a_kept_input_costs_nothing(blocksize):
    X, _ = _iid(200, 16, seed=3)
    X = X.double()
    X[:, 11] = X[:, 2]  # input 2 is a copy of input 11, which comes later in the sweep
    X[:, 14] = X[:, 0]
    X[:, 13] = 2 * X[:, 5] - X[:, 14]  # and input 5 = (x13 + x14) / 2, both later
    H = (X.T @ X / X.shape[0]).float()
    W = _weights(8, 16, seed=4)
    keep = torch.ones(8, 16, dtype=torch.bool)
    keep[:, [2, 5]] = False
    R = reconstruct(W, H, keep=keep, blocksize=blocksize, percdamp=1e-8)
    assert torch.all(R[:, [2, 5]] == 0)
    assert layer_error(W, R, H) < 1e-6 * layer_error(W, W * keep, H)


@pytest.mark.parametrize("n_m", [(2, 4), (4, 8)])
def test_n_m_keeps_n_of_every_m_consecutive_inputs(n_m):
    n, m = n_m
    _, H = _correlated(256, 32, seed=5)
    W = _weights(16, 32, seed=6)
    R = reconstruct(W, H, n_m=n_m, blocksize=12)  # rounded down to a multiple of M
    kept = (R != 0).reshape(16, -1, m).sum(-1)
    assert torch.all(kept == n)
    # with a given N:M mask, the mask is respected exactly
    keep = R != 0
    R2 = reconstruct(W, H, keep=keep, n_m=n_m)
    assert torch.equal(R2 != 0, keep)
    with pytest.raises(ValueError, match=f"more than {n} of {m}"):
        reconstruct(W, H, keep=torch.ones(16, 32, dtype=torch.bool), n_m=n_m)


def test_n_m_last_partial_group_keeps_at_most_n():
    _, H = _iid(128, 10, seed=7)
    W = _weights(6, 10, seed=8)
    R = reconstruct(W, H, n_m=(2, 4))
    nz = R != 0
    assert torch.all(nz[:, :8].reshape(6, 2, 4).sum(-1) == 2)
    assert torch.all(nz[:, 8:].sum(-1) == 2)  # the last group has only 2 inputs


def test_obs_sparsity_prunes_the_fraction_and_beats_magnitude():
    rows, d, blocksize, s = 32, 64, 16, 0.6
    _, H = _correlated(512, d, seed=9)
    W = _weights(rows, d, seed=10)
    R = reconstruct(W, H, sparsity=s, blocksize=blocksize)
    pruned = int((R == 0).sum())
    nblocks = d // blocksize
    assert pruned == nblocks * round(s * rows * blocksize)  # exact per column block
    assert abs(pruned - s * rows * d) <= rows * nblocks
    magnitude = torch.from_numpy(prune(W.numpy(), rows * d - pruned))
    assert int((magnitude == 0).sum()) == pruned
    assert layer_error(W, R, H) < 0.5 * layer_error(W, magnitude, H)


@pytest.mark.parametrize("with_mask", [False, True])
def test_gptq_rounds_survivors_to_the_grid_and_beats_plain_rounding(with_mask):
    levels = 7  # 4 bits
    _, H = _correlated(512, 64, seed=11)
    W = _weights(32, 64, seed=12)
    step = float(np.float32(W.abs().max() / levels))
    keep = (torch.rand(32, 64, generator=torch.Generator().manual_seed(13)) > 0.3
            if with_mask else None)
    R = reconstruct(W, H, keep=keep, step=step, levels=levels, blocksize=16)
    q = torch.round(R / step)
    assert torch.equal(q * torch.tensor(step, dtype=torch.float32), R)  # exact multiples
    assert q.abs().max() <= levels
    plain = _grid(W, step, levels)
    if keep is not None:
        assert torch.all(R[~keep] == 0)
        plain = plain * keep
    assert layer_error(W, R, H) < 0.5 * layer_error(W, plain, H)


def test_dead_inputs_neither_break_nor_change_kept_weights():
    X, _ = _correlated(128, 12, seed=14)
    X[:, [3, 7]] = 0
    H = X.T @ X / X.shape[0]
    W = _weights(5, 12, seed=15)
    keep = torch.ones(5, 12, dtype=torch.bool)
    keep[:, 0] = False
    R = reconstruct(W, H, keep=keep)
    assert torch.isfinite(R).all()
    assert torch.equal(R[:, [3, 7]], W[:, [3, 7]])  # no update flows into or out of them
    assert layer_error(W, R, H) < layer_error(W, W * keep, H)
    S = reconstruct(W, H, sparsity=2 / 12)  # dead inputs score 0: pruned first
    assert torch.all(S[:, [3, 7]] == 0) and int((S == 0).sum()) == 10


def test_invalid_arguments_raise():
    _, H = _iid(64, 8)
    W = _weights(4, 8)
    keep = torch.ones(4, 8, dtype=torch.bool)
    for kwargs in (dict(keep=keep, sparsity=0.5), dict(sparsity=1.5), dict(n_m=(5, 4)),
                   dict(step=0.0), dict(levels=7), dict(keep=keep[:, :4])):
        with pytest.raises(ValueError):
            reconstruct(W, H, **kwargs)
    with pytest.raises(ValueError, match="does not match"):
        reconstruct(W, H[:4, :4], sparsity=0.5)
    assert torch.equal(reconstruct(W, H), W)  # nothing to do


# ---------------------------------------------------------------------------------------------
# Whole weights, end to end


def test_reconstruct_weight_lowers_the_measured_conv_output_error():
    proto, w, x_shape = _conv((4, 4, 7, 7), (6, 2, 3, 3), seed=16, **CONV2)
    rng = _rng(17)
    base = rng.standard_normal((4, 1, 7, 7))  # correlated channels
    x = (base + 0.2 * rng.standard_normal(x_shape)).astype(np.float32)
    entry = _entry(proto)
    h = _hessian(entry, x[:3], x[3:])
    keep = np.abs(w) >= np.median(np.abs(w))
    new = reconstruct_weight(w, entry, h, keep=keep)
    assert new.shape == w.shape and new.dtype == w.dtype
    assert np.all(new[~keep] == 0)
    plain = w * keep
    # weight_error is the mean over output positions of the squared output change
    y = ort_run(proto, {"x": x})[0].astype(np.float64)
    for candidate in (new, plain):
        changed = proto.__class__()
        changed.CopyFrom(proto)
        changed.graph.initializer[0].CopyFrom(
            numpy_helper.from_array(candidate.astype(np.float32), "W"))
        diff = y - ort_run(changed, {"x": x})[0]
        measured = np.sum(diff ** 2) / (diff.size / diff.shape[1])
        np.testing.assert_allclose(weight_error(w, candidate, entry, h), measured, rtol=1e-3)
    assert weight_error(w, new, entry, h) < 0.8 * weight_error(w, plain, entry, h)


def test_reconstruct_weight_shares_one_hessian_across_lstm_directions():
    proto, w, x_shape, _ = _lstm()
    entry = _entry(proto)
    x = _rng(18).standard_normal(x_shape).astype(np.float32)
    h = _hessian(entry, x)
    new = reconstruct_weight(w, entry, h, n_m=(2, 4))
    assert new.shape == w.shape
    assert np.all((new != 0).reshape(2, 16, 2, 4).sum(-1) == 2)


def _fasterprune(W, H, prunen, prunem, blocksize, percdamp, step, levels):
    """IST-DASLab/sparsegpt `SparseGPT.fasterprune`, transcribed (symmetric quantizer)."""
    W = W.clone().float()
    H = H.clone().double()
    columns = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True).float()
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        mask1 = torch.zeros_like(W1) == 1
        for i in range(i2 - i1):
            w = W1[:, i]
            d = Hinv1[i, i]
            if i % prunem == 0:
                tmp = W1[:, i:i + prunem] ** 2 / (torch.diag(Hinv1)[i:i + prunem]
                                                  .reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            q = _grid(q, step, levels)
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


def test_the_sweep_is_sparsegpt_fasterprune():
    _, H = _correlated(256, 40, seed=19)
    W = _weights(12, 40, seed=20)
    step, levels = float(np.float32(W.abs().max() / 7)), 7
    ref = _fasterprune(W, H, 2, 4, 16, 0.01, step, levels)  # 2:4 is symmetric in N and M - N
    got = obs._sweep(W, H, torch.zeros(12, 40, dtype=torch.bool), None, (2, 4), step, levels,
                     16, 0.01)
    np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=1e-5 * step)


def test_reconstruction_device_follows_what_torch_can_use(monkeypatch):
    import torch

    from rdonnx.algo.obs import torch_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert torch_device("cuda") == "cpu" and torch_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert torch_device("cuda") == "cuda"


def test_relative_error_weighs_each_output_channel_by_its_own_energy():
    """Sum over output channels of the channel's squared output change / its output energy,
    both measured in ONNX Runtime: a channel 100x smaller counts as much as the others."""
    proto, w, x_shape = _conv((4, 4, 7, 7), (6, 2, 3, 3), seed=18, **CONV2)
    w = w * np.array([100, 1, 1, 1, 1, 0.01], np.float32)[:, None, None, None]
    proto.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "W"))
    x = _rng(19).standard_normal(x_shape).astype(np.float32)
    entry = _entry(proto)
    h = _hessian(entry, x)
    new = (w * (1 + 0.1 * _rng(20).standard_normal(w.shape))).astype(np.float32)
    y = ort_run(proto, {"x": x})[0].astype(np.float64)
    changed = proto.__class__()
    changed.CopyFrom(proto)
    changed.graph.initializer[0].CopyFrom(numpy_helper.from_array(new, "W"))
    diff = y - ort_run(changed, {"x": x})[0]
    per_channel = (diff ** 2).sum(axis=(0, 2, 3)) / (y ** 2).sum(axis=(0, 2, 3))
    np.testing.assert_allclose(relative_error(w, new, entry, h), per_channel.sum(), rtol=1e-3)
    # the absolute error is the large channel's; the relative one counts all six alike
    assert weight_error(w, new, entry, h) > 1e3 * relative_error(w, new, entry, h)


def test_a_mask_that_keeps_everything_returns_the_weight_unswept(monkeypatch):
    """Rate 1 without rounding: nothing to update, so no sweep runs (four dampenings were
    swept per weight for nothing) and the weight comes back as it was."""
    rng = _rng(21)
    w = torch.from_numpy(rng.standard_normal((6, 10)).astype(np.float32))
    x = torch.from_numpy(rng.standard_normal((10, 40)))
    h = x @ x.T / 40
    monkeypatch.setattr(obs, "_sweep", lambda *a, **k: pytest.fail("swept"))
    out = reconstruct(w, h, keep=torch.ones(6, 10, dtype=torch.bool))
    assert torch.equal(out, w)


def test_inverse_factors_kept_across_calls_give_the_same_result(monkeypatch):
    """GPTQ's grid search reconstructs one weight at several grids: with a shared `factors`
    dict the Hessian's inverse factor is computed once, and every result is as without it."""
    rng = _rng(22)
    w = torch.from_numpy(rng.standard_normal((6, 10)).astype(np.float32))
    x = torch.from_numpy(rng.standard_normal((10, 40)))
    h = x @ x.T / 40
    keep = torch.from_numpy(rng.random((6, 10)) > 0.3)
    alone = [reconstruct(w, h, keep=keep, step=s, levels=7) for s in (0.1, 0.2, 0.3)]
    calls = []
    real = obs._inverse_factor
    monkeypatch.setattr(obs, "_inverse_factor", lambda *a: calls.append(1) or real(*a))
    factors: dict = {}
    shared = [reconstruct(w, h, keep=keep, step=s, levels=7, factors=factors)
              for s in (0.1, 0.2, 0.3)]
    assert len(calls) == 1
    for a, b in zip(alone, shared):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", ["keep+step", "sparsity", "n_m+step", "pattern",
                                  "target+step", "singular"])
def test_a_batch_of_matrices_gets_what_each_matrix_gets_alone(case):
    """A grouped convolution's groups are reconstructed in one batched sweep: each matrix of
    the batch gets what `reconstruct` gives it alone (own act-order, dampening, mask
    selection, per-row steps and fallback rows)."""
    g = torch.Generator().manual_seed(3)
    b, rows, d = 5, 3, 12
    X = torch.randn(b, d, 64, generator=g)
    X[:, 1] = X[:, 0] * 2  # collinear inputs
    if case == "singular":
        X[1, 4:] = 0  # dead inputs in one matrix only
        X[2] = 0  # a matrix that sees nothing
    H = X @ X.mT / 64
    W = torch.randn(b, rows, d, generator=g)
    step = torch.rand(b, rows, generator=g) * 0.2 + 0.05
    options: dict = {"percdamp": 0.0 if case == "singular" else 0.01}
    if case in ("keep+step", "singular"):
        options.update(keep=torch.rand(b, rows, d, generator=g) > 0.4, step=step, levels=7)
    elif case == "sparsity":
        options.update(sparsity=0.5, blocksize=5)
    elif case == "n_m+step":
        options.update(n_m=(2, 4), step=step, levels=7)
    elif case == "pattern":  # a given 2:4 mask, only checked
        top = torch.rand(b, rows, d // 4, 4, generator=g).argsort(-1) < 2
        options.update(keep=top.reshape(b, rows, d), n_m=(2, 4), step=step, levels=7)
    else:
        Xo = X + 0.3 * torch.randn(b, d, 64, generator=g)
        options.update(step=step, levels=7,
                       target=obs.Target(Xo @ X.mT / 64, Xo @ Xo.mT / 64))
    batched = reconstruct(W, H, **options)
    for i in range(b):
        alone = {k: (v[i] if isinstance(v, torch.Tensor) else
                     obs.Target(v.cross[i], v.original[i]) if isinstance(v, obs.Target)
                     else v) for k, v in options.items()}
        assert torch.allclose(batched[i], reconstruct(W[i], H[i], **alone), rtol=1e-6,
                              atol=1e-7), i
