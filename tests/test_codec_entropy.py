"""Entropy coder (rdonnx.codec.entropy): round trips, sizes, determinism, robustness."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rdonnx.codec import entropy as E
from rdonnx.codec.entropy import CodecError


def structured_mask(rows: int, cols: int, density: float, seed: int = 0) -> np.ndarray:
    """Magnitude pruning of diag(r) @ G @ diag(c) with log-normal row/column scales."""
    rng = np.random.default_rng(seed)
    w = rng.laplace(size=(rows, cols))
    w *= rng.lognormal(0.0, 0.8, size=(rows, 1)) * rng.lognormal(0.0, 0.8, size=(1, cols))
    a = np.abs(w)
    keep = max(1, int(round(density * a.size)))
    thr = np.partition(a.ravel(), a.size - keep)[a.size - keep]
    return a >= thr


CLASS_MODELS = ("iid", "rows", "columns", "rows+columns")  # the models every mask can use


def nm_mask(shape: tuple[int, ...], k: int, m: int, seed: int = 0) -> np.ndarray:
    """Uniformly random k:m mask: every consecutive C-order group of m keeps k elements."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    keys = rng.random((n // m, m))
    return (keys <= np.sort(keys, axis=1)[:, k - 1:k]).reshape(shape)


def roundtrip_positions(mask: np.ndarray, **kw) -> E.CodedStream:
    cs = E.encode_positions(mask, **kw)
    out = E.decode_positions(cs.payload, mask.shape)
    assert out.dtype == np.bool_ and out.shape == mask.shape
    assert np.array_equal(out, mask)
    assert cs.bits == 8 * len(cs.payload) and 0 < cs.side_bits <= cs.bits
    return cs


def roundtrip_values(values: np.ndarray) -> E.CodedStream:
    cs = E.encode_values(values)
    out = E.decode_values(cs.payload, len(values))
    assert out.dtype == np.int32 and out.shape == (len(values),)
    assert np.array_equal(out, values)
    assert cs.bits == 8 * len(cs.payload) and 0 < cs.side_bits <= cs.bits
    return cs


# ----------------------------------------------------------------------------- round trips

SHAPES = [(), (1,), (0,), (7,), (1, 1), (0, 5), (5, 0), (3, 4), (1, 64), (64, 1), (33, 47),
          (4, 5, 6), (2, 3, 4, 5), (16, 3, 3, 3), (200, 150)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_positions_roundtrip_shapes_and_densities(shape):
    rng = np.random.default_rng(len(shape) * 1000 + sum(shape))
    for density in (0.0, 1.0, 0.5, 0.03, float(rng.random())):
        roundtrip_positions(rng.random(shape) < density)
    if int(np.prod(shape)) > 1:  # exactly one kept / one pruned element
        m = np.zeros(shape, dtype=bool)
        m.flat[int(rng.integers(m.size))] = True
        roundtrip_positions(m)
        roundtrip_positions(~m)


def test_positions_roundtrip_random_fuzz():
    rng = np.random.default_rng(1)
    for _ in range(150):
        rank = int(rng.integers(0, 5))
        shape = tuple(int(d) for d in rng.integers(1, 9 if rank > 2 else 40, size=rank))
        kind = rng.integers(3)
        if kind == 0:
            m = rng.random(shape) < rng.random()
        elif kind == 1 and rank >= 2:  # row / column structure
            p = rng.random((shape[0],) + (1,) * (rank - 1)) * rng.random((1,) + shape[1:])
            m = rng.random(shape) < p
        else:
            m = rng.random(shape) < rng.choice([0.0, 1.0, 0.001, 0.999])
        roundtrip_positions(m)


@pytest.mark.parametrize("model", ["rows", "columns", "rows+columns"])
def test_each_context_model_roundtrips(model):
    m = structured_mask(120, 90, 0.15, seed=3)
    cs = roundtrip_positions(m, models=(model,))
    assert cs.model == model
    m4 = structured_mask(40, 4 * 3 * 3, 0.2, seed=4).reshape(40, 4, 3, 3)
    cs = roundtrip_positions(m4, models=(model,))
    assert cs.model == model


def test_positions_rank_below_two_is_iid_and_nonbool_input():
    m = np.random.default_rng(0).random(10_000) < 0.2
    assert roundtrip_positions(m).model == "iid"
    cs = E.encode_positions(m.astype(np.int8) * 3)
    assert cs.payload == E.encode_positions(m).payload
    with pytest.raises(ValueError):
        E.encode_positions(m, models=("diagonal",))


def test_values_roundtrip_cases():
    rng = np.random.default_rng(2)
    cases = [
        np.zeros(0, dtype=np.int32),
        np.array([5], dtype=np.int32),
        np.array([-1], dtype=np.int64),
        np.full(100, -7, dtype=np.int32),  # negative only, one magnitude
        -rng.integers(1, 300, 5000),  # negative only
        rng.integers(1, 50, 5000),  # positive only
        np.array([(1 << 24) - 1, -((1 << 24) - 1), 1, -1], dtype=np.int64),
        rng.integers(1, 1 << 24, 3000) * rng.choice([-1, 1], 3000),  # very wide alphabet
        rng.integers(1, 70_000, 20_000) * rng.choice([-1, 1], 20_000),
        np.round(rng.laplace(size=20_000) * 1000).astype(np.int64),  # wide Laplacian
    ]
    for v in cases:
        v = v[v != 0]
        roundtrip_values(v.astype(v.dtype))
        roundtrip_values(v.astype(np.int32))
    for _ in range(100):
        n = int(rng.integers(1, 300))
        scale = float(10 ** rng.uniform(0, 6.5))
        v = np.clip(np.round(rng.laplace(size=n) * scale), -(2**24 - 1), 2**24 - 1)
        v = v[v != 0].astype(np.int64)
        roundtrip_values(v)


def test_values_escape_and_table_modes_are_exercised():
    rng = np.random.default_rng(5)
    wide = rng.integers(1, 1 << 24, 2000)
    assert roundtrip_values(wide).model == "categorical+escape"
    small = rng.integers(-20, 21, 50_000)
    assert roundtrip_values(small[small != 0]).model == "categorical"
    sparse_hist = rng.choice(np.arange(1, 3000, 37), 20_000)  # gaps -> zstd-friendly table
    cs = roundtrip_values(sparse_hist)
    assert cs.payload[1] & 0x20, "expected a zstd-compressed token table"


def test_values_encoder_rejects_bad_input():
    with pytest.raises(ValueError):
        E.encode_values(np.array([1, 0, 2]))
    with pytest.raises(ValueError):
        E.encode_values(np.array([1 << 24]))
    with pytest.raises(ValueError):
        E.encode_values(np.ones((2, 2), dtype=np.int32))
    with pytest.raises(ValueError):
        E.encode_values(np.array([1.0, 2.0]))


def test_integers_roundtrip():
    rng = np.random.default_rng(6)
    for shape in [(), (5,), (0, 3), (30, 20), (8, 4, 3, 3)]:
        for density in (0.0, 0.3, 1.0):
            q = np.round(rng.laplace(size=shape) * 20).astype(np.int32)
            q = np.where(rng.random(shape) < density, q, 0).astype(np.int32)
            pos, val = E.encode_integers(q)
            out = E.decode_integers(pos.payload, val.payload, q.shape)
            assert out.dtype == np.int32 and out.shape == q.shape
            assert np.array_equal(out, q)


# ----------------------------------------------------------------------------- determinism


def test_deterministic_payloads():
    m = structured_mask(300, 200, 0.1, seed=7)
    a = E.encode_positions(m)
    b = E.encode_positions(np.asfortranarray(m.copy()))
    assert a == b
    q = np.where(m, np.round(np.random.default_rng(8).laplace(size=m.shape) * 30), 0)
    q = q.astype(np.int64)
    q[m & (q == 0)] = 1
    assert E.encode_integers(q) == E.encode_integers(q.astype(np.int32).copy())


# ----------------------------------------------------------------------------- sizes


def test_iid_sizes_within_one_percent_of_entropy():
    rng = np.random.default_rng(9)
    m = rng.random(2_000_000) < 0.1
    cs = roundtrip_positions(m)
    assert cs.model == "gaps"  # within 0.1% of "iid" and faster to decode
    assert cs.bits <= 1.001 * E.encode_positions(m, models=("iid",)).bits + 8 * 128
    assert cs.bits <= 1.01 * cs.iid_entropy_bits + cs.side_bits
    v = np.round(rng.laplace(size=400_000) * 25).astype(np.int64)
    v = v[v != 0]
    cs = roundtrip_values(v)
    assert cs.bits <= 1.01 * cs.iid_entropy_bits + cs.side_bits
    assert cs.bits >= cs.iid_entropy_bits  # sanity: cannot beat the empirical entropy


def test_gaps_model_decodes_to_the_kept_indices():
    rng = np.random.default_rng(19)
    for density in (0.002, 0.05, 0.2):
        m = rng.random((1000, 2000)) < density
        m[0, 0] = m[-1, -1] = True  # kept entries at both ends too
        cs = E.encode_positions(m)
        assert cs.model == "gaps"
        assert np.array_equal(E.decode_positions(cs.payload, m.shape), m)
        kept = E.decode_kept(cs.payload, m.shape)
        assert kept.dtype == np.int64 and np.array_equal(kept, np.flatnonzero(m))
        assert E.kept_count(kept) == m.sum()
    for density, as_mask in ((0.4, False), (0.9, True)):  # above the gaps density limit
        dense = rng.random((300, 400)) < density
        assert E.encode_positions(dense).model == "iid"
        kept = E.decode_kept(E.encode_positions(dense).payload, dense.shape)
        assert E.kept_as_indices(dense.size, int(dense.sum())) is not as_mask
        if as_mask:  # over 3/4 kept: the flat bool mask
            assert kept.dtype == np.bool_ and np.array_equal(kept, dense.reshape(-1))
        else:
            assert kept.dtype == np.int64
        assert np.array_equal(E.kept_indices(kept), np.flatnonzero(dense))
        assert E.kept_count(kept) == dense.sum()
    many = np.zeros(100_000, dtype=bool)  # a gaps payload keeping over 3/4: a mask again
    many[:80_000] = True
    gaps = bytes([0x11, 5]) + E.varint(many.size) + E.varint(80_000) + \
        E.encode_values(np.ones(80_000, dtype=np.int64)).payload
    kept = E.decode_kept(gaps, many.shape)
    assert kept.dtype == np.bool_ and np.array_equal(kept, many)


def test_gaps_payload_that_overruns_the_tensor_is_rejected():
    m = np.zeros(100_000, dtype=bool)
    m[::7] = True
    payload = E.encode_positions(m).payload
    with pytest.raises(E.CodecError):
        E.decode_positions(payload, (90_000,))  # element count differs
    head = bytes([0x11, 5]) + E.varint(100_000) + E.varint(2)
    over = head + E.encode_values(np.array([60_000, 60_000])).payload
    with pytest.raises(E.CodecError, match="gaps"):
        E.decode_kept(over, (100_000,))


def test_context_model_beats_iid_on_structured_masks():
    for density in (0.05, 0.2, 0.5):
        m = structured_mask(400, 300, density, seed=10)
        cs = roundtrip_positions(m)
        assert cs.model != "iid"
        assert cs.bits < 0.9 * cs.iid_entropy_bits
        assert cs.bits < E.encode_positions(m, models=("iid",)).bits
    # a 4-D conv weight with per-output-channel structure
    m4 = structured_mask(64, 32 * 9, 0.1, seed=11).reshape(64, 32, 3, 3)
    cs = roundtrip_positions(m4)
    assert cs.bits < 0.9 * cs.iid_entropy_bits


def test_small_or_unstructured_tensors_fall_back_to_iid():
    rng = np.random.default_rng(12)
    assert roundtrip_positions(rng.random((6, 5)) < 0.3).model == "iid"
    assert roundtrip_positions(rng.random((500, 400)) < 0.3).model == "iid"


# ----------------------------------------------------------------------------- robustness


def _payloads():
    rng = np.random.default_rng(13)
    out = []
    m = structured_mask(24, 30, 0.2, seed=14)
    for model in CLASS_MODELS:
        cs = E.encode_positions(m, models=(model,))
        assert cs.model == model
        out.append(("positions", cs.payload, m.shape))
    for mask, mode in _nm_masks():
        cs = E.encode_positions(mask)
        assert cs.model == "n:m" and _nm_header(cs.payload)[2] == mode
        out.append(("positions", cs.payload, mask.shape))
    out.append(("positions", E.encode_positions(np.ones((3, 4), dtype=bool)).payload, (3, 4)))
    lap = np.round(rng.laplace(size=300) * 6).astype(np.int64)
    out.append(("values", E.encode_values(lap[lap != 0]).payload, int(np.count_nonzero(lap))))
    wide = rng.integers(1, 1 << 20, 60) * rng.choice([-1, 1], 60)
    out.append(("values", E.encode_values(wide).payload, 60))
    gappy = rng.choice(np.arange(1, 800, 13), 400)
    cs = E.encode_values(gappy)
    assert cs.payload[1] & 0x20
    out.append(("values", cs.payload, 400))
    return out


def _decode_ok_or_codec_error(kind: str, payload: bytes, arg) -> bool:
    """Decode; only CodecError or a well-formed result are acceptable. True if it raised."""
    try:
        if kind == "positions":
            out = E.decode_positions(payload, arg)
            assert out.dtype == np.bool_ and out.shape == arg
        else:
            out = E.decode_values(payload, arg)
            assert out.dtype == np.int32 and out.shape == (arg,)
            assert np.all(out != 0) and np.all(np.abs(out.astype(np.int64)) < 1 << 24)
    except CodecError:
        return True
    return False


def test_truncations_raise_codec_error():
    for kind, payload, arg in _payloads():
        for cut in range(len(payload)):
            with pytest.raises(CodecError):
                (E.decode_positions if kind == "positions" else E.decode_values)(
                    payload[:cut], arg)
        # and one extra byte / word
        assert _decode_ok_or_codec_error(kind, payload + b"\x01", arg)
        assert _decode_ok_or_codec_error(kind, payload + b"\x01\x00\x00\x00", arg)


def test_random_mutations_never_escape_as_other_errors():
    rng = np.random.default_rng(15)
    raised = total = 0
    for kind, payload, arg in _payloads():
        for _ in range(450):
            b = bytearray(payload)
            op = rng.integers(4)
            if op == 0:  # flip 1-3 bytes anywhere
                for _ in range(int(rng.integers(1, 4))):
                    b[int(rng.integers(len(b)))] ^= int(rng.integers(1, 256))
            elif op == 1:  # flip a byte in the header region
                i = int(rng.integers(min(len(b), 12)))
                b[i] ^= int(rng.integers(1, 256))
            elif op == 2:  # delete or insert a byte
                i = int(rng.integers(len(b)))
                if rng.random() < 0.5:
                    del b[i]
                else:
                    b.insert(i, int(rng.integers(256)))
            else:  # random garbage of a similar length
                b = bytearray(rng.integers(0, 256, len(b), dtype=np.uint8).tobytes())
                b[0] = payload[0]
            raised += _decode_ok_or_codec_error(kind, bytes(b), arg)
            total += 1
    assert total >= 3000
    assert raised > 0.5 * total  # the consistency checks catch most damage


def test_wrong_shape_or_count_raises():
    m = structured_mask(24, 30, 0.2, seed=16)
    for model in CLASS_MODELS:
        p = E.encode_positions(m, models=(model,)).payload
        for shape in [(24, 31), (25, 30), (720,) if model != "iid" else (721,), (12, 60)
                      if model != "iid" else (0,), (-24, -30), ("a",)]:
            with pytest.raises(CodecError):
                E.decode_positions(p, shape)
    v = np.array([3, -1, 4, 1, -5, 9], dtype=np.int32)
    p = E.encode_values(v).payload
    for count in (0, 5, 7, -1):
        with pytest.raises(CodecError):
            E.decode_values(p, count)
    with pytest.raises(CodecError):  # streams swapped
        E.decode_values(E.encode_positions(m).payload, int(m.sum()))
    with pytest.raises(CodecError):
        E.decode_positions(p, (6,))
    q = np.where(m, 2, 0)
    pos, val = E.encode_integers(q)
    with pytest.raises(CodecError):
        E.decode_integers(pos.payload, E.encode_values(v).payload, q.shape)
    assert np.array_equal(E.decode_integers(bytearray(pos.payload), memoryview(val.payload),
                                            q.shape), q)


def test_crafted_headers_are_rejected_before_allocating():
    # a tiny payload claiming 10**9 positions / values must fail fast, not decode for minutes
    big = 10**9
    iid = bytes([E.POSITIONS_TAG, 0]) + E.varint(big) + E.varint(big // 2) + b"\x01\0\0\0"
    with pytest.raises(CodecError, match="shorter"):
        E.decode_positions(iid, (big,))
    rows = (bytes([E.POSITIONS_TAG, 1]) + E.varint(big) + E.varint(2) + E.varint(big // 2)
            + E.varint(big // 2) + E.varint(0) + E.varint(big // 2) + b"\x01\0\0\0")
    with pytest.raises(CodecError):
        E.decode_positions(rows, (big // 1000, 1000))  # class rows must add up to shape[0]
    vals = (bytes([E.VALUES_TAG, 23]) + E.varint(big) + E.varint(big // 2) + E.varint(2)
            + E.varint(big // 2) + E.varint(big // 2) + b"\x01\0\0\0")
    with pytest.raises(CodecError, match="shorter"):
        E.decode_values(vals, big)
    huge_alphabet = (bytes([E.VALUES_TAG, 23]) + E.varint(4) + E.varint(4)
                     + E.varint(1 << 22))
    with pytest.raises(CodecError, match="alphabet"):
        E.decode_values(huge_alphabet, 4)


def test_values_encoder_rejects_overflowing_integers():
    with pytest.raises(ValueError):
        E.encode_values(np.array([np.iinfo(np.int64).min, 1], dtype=np.int64))
    with pytest.raises(ValueError):
        E.encode_values(np.array([2**63 + 5], dtype=np.uint64))
    assert roundtrip_values(np.array([3, 2**24 - 1], dtype=np.uint32)).bits > 0


def test_trailing_free_symbols_decode():
    """Symbols the ANS encoder pushes first cost nothing while they are symbol 0 (state 0):
    masks ending in many pruned entries, values ending in negatives, constant escaped
    magnitudes. The decoders' length checks must accept these payloads."""
    rng = np.random.default_rng(17)
    m = rng.random((64, 3, 3, 3)) < 0.3
    m[-10:] = False  # last output channels pruned
    for model in CLASS_MODELS:
        roundtrip_positions(m, models=(model,))
    tail = rng.random(4000) < 0.5
    tail[-1000:] = False
    assert roundtrip_positions(tail).model == "iid"
    v = rng.integers(1, 20, 3000) * rng.choice([-1, 1], 3000)
    v[-300:] = -np.abs(v[-300:])
    roundtrip_values(v)
    for v in (np.full(10, 1 << 20), np.full(1000, 3 << 18), np.full(5, -(1 << 23))):
        assert roundtrip_values(v).model == "categorical+escape"


# ----------------------------------------------------------------------------- n:m


def _nm_header(payload: bytes) -> tuple[int, int, int]:
    """(M, N, table mode) of a model-4 positions payload."""
    rd = E.Reader(payload)
    assert rd.byte("tag") == E.POSITIONS_TAG and rd.byte("model") == 4
    rd.varint(1 << 62, "n")
    m = rd.varint(32, "M")
    return m, rd.varint(31, "N"), rd.byte("mode")


def _nm_payload(n: int, m: int, k: int, mode: int, table: bytes = b"", words=()) -> bytes:
    w = np.asarray(words, dtype="<u4").tobytes()
    return (bytes([E.POSITIONS_TAG, 4]) + E.varint(n) + E.varint(m) + E.varint(k)
            + bytes([mode]) + table + w)


def _skewed_nm(groups: int, patterns: np.ndarray, probs, seed: int) -> np.ndarray:
    """Groups drawn from a few fixed patterns (rows of `patterns`) with these probabilities."""
    rng = np.random.default_rng(seed)
    return patterns[rng.choice(len(patterns), size=groups, p=probs)].reshape(-1)


def _nm_masks() -> list[tuple[np.ndarray, int]]:
    """Small n:m masks and the table mode each is coded with: uniform, raw table (skewed
    2:4), zstd table (8:16 from 4 patterns), one pattern only (no ANS words)."""
    two_four = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 1, 1], [0, 1, 0, 1]], dtype=bool)
    few = nm_mask((4, 16), 8, 16, seed=20)
    first_two = np.zeros((8, 32), dtype=bool)
    first_two[:, 0::4] = first_two[:, 1::4] = True
    return [
        (nm_mask((8, 32), 2, 4, seed=18), 0),
        (nm_mask((8, 32), 1, 4, seed=35), 0),  # C(4, 1) = 4: raw 2-bit symbols
        (_skewed_nm(64, two_four, [0.8, 0.1, 0.05, 0.05], 19).reshape(8, 32), 1),
        (few[np.random.default_rng(21).integers(0, 4, 64)].reshape(16, 64), 2),
        (first_two, 1),
    ]


NM_CASES = [(2, 4), (1, 4), (4, 8), (2, 8), (8, 16)]
NM_SHAPES = [(256, 128), (32, 16, 3, 3), (8192,), (16,), (3, 16)]


@pytest.mark.parametrize("k,m", NM_CASES, ids=lambda v: str(v))
def test_nm_random_masks_roundtrip_near_log2_binomial(k, m):
    for i, shape in enumerate(NM_SHAPES):
        x = nm_mask(shape, k, m, seed=100 * m + 10 * k + i)
        cs = roundtrip_positions(x)
        n = x.size
        if n < 4096:
            continue
        assert cs.model == "n:m"
        assert _nm_header(cs.payload)[:2] == (m, k)
        ideal = n / m * np.log2(float(math.comb(m, k)))
        assert cs.side_bits <= 8 * 8  # header only: uniform patterns need no table
        assert 0.99 * ideal <= cs.bits - cs.side_bits <= ideal + 64
        assert cs.bits < E.encode_positions(x, models=("iid",)).bits
        assert cs.bits < min(E.encode_positions(x, models=(c,)).bits for c in CLASS_MODELS)


def test_nm_two_four_costs_log2_6_over_4_bits_per_element():
    x = nm_mask((512, 512), 2, 4, seed=22)
    cs = roundtrip_positions(x)
    assert cs.model == "n:m" and _nm_header(cs.payload) == (4, 2, 0)
    assert abs(cs.bits / x.size - np.log2(6) / 4) < 0.001  # 0.646 bits per element
    assert cs.bits < 0.65 * E.encode_positions(x, models=("iid",)).bits  # iid: ~1 bit


def test_nm_requires_every_group_to_match():
    x = nm_mask((256, 128), 2, 4, seed=23)
    for flat_i in (4 * 1000 + 2, 0, x.size - 1):  # one group broken (middle, first, last)
        y = x.copy().reshape(-1)
        y[flat_i] = ~y[flat_i]
        cs = roundtrip_positions(y.reshape(-1))  # rank 1: no row / column models
        assert cs.model != "n:m"
    # n not a multiple of any tried M; all kept / none kept
    y = np.concatenate([x.reshape(-1), [True, False]]).reshape(2, -1)
    assert roundtrip_positions(y).model != "n:m"
    assert roundtrip_positions(np.ones((64, 16), dtype=bool)).model == "iid"
    assert roundtrip_positions(np.zeros((64, 16), dtype=bool)).model == "iid"
    # asking only for "n:m" falls back to iid when there is no N:M structure
    r = np.random.default_rng(24).random((64, 16)) < 0.5
    assert roundtrip_positions(r, models=("n:m",)).model == "iid"
    assert roundtrip_positions(x, models=("n:m",)).model == "n:m"


def test_nm_structured_patterns_cost_far_less_than_uniform():
    uniform = E.encode_positions(nm_mask((512, 256), 2, 4, seed=25))
    first_two = np.zeros((512, 256), dtype=bool)
    first_two[:, 0::4] = first_two[:, 1::4] = True  # always the first two of four
    cs = roundtrip_positions(first_two)
    assert cs.model == "n:m" and _nm_header(cs.payload) == (4, 2, 1)
    assert cs.bits == cs.side_bits and cs.bits <= 8 * 16  # table only, no ANS words
    assert cs.bits < 0.002 * uniform.bits
    # 90 % one pattern, the rest uniform: about the empirical pattern entropy
    two_four = np.array(sorted({tuple(r) for r in nm_mask((600, 4), 2, 4).tolist()}))
    assert len(two_four) == 6
    probs = [0.9] + [0.02] * 5
    skew = _skewed_nm(32768, two_four.astype(bool), probs, 26).reshape(512, 256)
    cs = roundtrip_positions(skew)
    assert cs.model == "n:m" and _nm_header(cs.payload)[2] == 1
    counts = np.unique(skew.reshape(-1, 4), axis=0, return_counts=True)[1]
    assert cs.bits - cs.side_bits <= E._hist_bits(counts) + 64
    assert cs.bits < 0.4 * uniform.bits
    # 8:16 from a handful of patterns: the 12870-entry count table is zstd-compressed
    few = nm_mask((5, 16), 8, 16, seed=27)
    x = few[np.random.default_rng(28).integers(0, 5, 8192)].reshape(512, 256)
    cs = roundtrip_positions(x)
    assert cs.model == "n:m" and _nm_header(cs.payload) == (16, 8, 2)
    assert cs.bits < 0.2 * E.encode_positions(x, models=("iid",)).bits
    assert cs.bits < 0.25 * 8192 * np.log2(float(math.comb(16, 8)))


def test_nm_pattern_index_is_lexicographic_rank():
    by_index, index_of = E._nm_lut(4, 2)
    # {0,1} {0,2} {0,3} {1,2} {1,3} {2,3} with offset 0 the most significant bit
    assert by_index.tolist() == [0b1100, 0b1010, 0b1001, 0b0110, 0b0101, 0b0011]
    for m in (4, 8, 16):
        for k in range(1, m):
            by_index, index_of = E._nm_lut(m, k)
            assert by_index.size == math.comb(m, k)
            assert np.array_equal(index_of[by_index], np.arange(by_index.size))
            assert np.array_equal(E._nm_rank(by_index, m, k), np.arange(by_index.size))
            assert np.array_equal(E._nm_unrank(np.arange(by_index.size), m, k), by_index)
    rng = np.random.default_rng(29)
    for m in (2, 4, 8, 12, 16, 20, 24, 32):  # bit packing, odd group counts included
        groups = rng.random((37, m)) < 0.5
        codes = E._nm_codes(groups, m)
        weights = 1 << np.arange(m - 1, -1, -1, dtype=np.int64)
        assert np.array_equal(codes, groups.astype(np.int64) @ weights)
        assert np.array_equal(E._nm_groups(codes, m), groups)
    for m, k in [(32, 16), (32, 1), (32, 31), (20, 7)]:
        idx = rng.integers(0, math.comb(m, k), 2000)
        codes = E._nm_unrank(idx, m, k)
        groups = E._nm_groups(codes, m)
        assert np.all(groups.sum(axis=1) == k)
        assert np.array_equal(E._nm_codes(groups, m), codes)
        assert np.array_equal(E._nm_rank(codes, m, k), idx)
        order = np.argsort(-codes)  # descending codes = ascending index
        assert np.all(np.diff(idx[order]) >= 0)


@pytest.mark.parametrize("k,m", [(16, 32), (9, 32), (3, 32), (12, 24), (1, 32)],
                         ids=lambda v: str(v))
def test_nm_large_groups_roundtrip(monkeypatch, k, m):
    monkeypatch.setattr(E, "_NM_GROUPS", (m,))
    x = nm_mask((64, 96), k, m, seed=30 + k + m)
    cs = roundtrip_positions(x)
    assert cs.model == "n:m" and _nm_header(cs.payload)[:2] == (m, k)
    ideal = x.size / m * np.log2(float(math.comb(m, k)))
    assert cs.bits - cs.side_bits <= ideal + 64 + (x.size / m) * 0.01
    x[-1, -m:] = np.arange(m) < k  # last group pattern 0
    cs = roundtrip_positions(x)
    for cut in range(0, len(cs.payload), 3):
        with pytest.raises(CodecError):
            E.decode_positions(cs.payload[:cut], x.shape)
    if math.comb(m, k) <= E.NM_MAX_TABLE:  # a few patterns: histogram, index by arithmetic
        pats = nm_mask((3, m), k, m, seed=36)
        y = pats[np.random.default_rng(37).choice(3, x.size // m, p=[0.8, 0.15, 0.05])]
        cs = roundtrip_positions(y.reshape(-1))  # rank 1: no row / column models
        assert cs.model == "n:m" and _nm_header(cs.payload)[2] in (1, 2)


def test_nm_uniform_terminator_makes_every_pattern_cost_its_bits():
    """Uniform mode ends in a terminator (pushed first), so trailing pattern-0 groups are not
    free and truncations are caught even when C(M, N) is a power of two (raw bits)."""
    x = nm_mask((64, 64), 2, 4, seed=31).reshape(-1, 4)
    x[-700:] = [True, True, False, False]  # pattern 0 would cost nothing at the end
    x = x.reshape(64, 64)
    plan = [p for p in E._nm_plans(x.reshape(-1), x.size, int(x.sum())) if not p.nm[2]][0]
    assert plan.nm == (2, 4, False)
    payload, head = E._encode_nm(x.size, plan)
    assert 8 * (len(payload) - head) >= 1024 * np.log2(6.0)
    assert np.array_equal(E.decode_positions(payload, x.shape), x)
    assert _nm_header(roundtrip_positions(x).payload)[2] == 1  # the histogram is cheaper
    lone = np.zeros((1, 8), dtype=bool)
    lone[0, [0, 1, 4, 5]] = True  # only pattern 0
    assert roundtrip_positions(lone, models=("n:m",)).model == "n:m"
    for k, m in [(1, 4), (3, 4), (1, 8), (1, 16), (2, 4)]:  # C(M, N) = 4, 4, 8, 16, 6
        y = nm_mask((32, 32), k, m, seed=34 + m + k)
        payload = E.encode_positions(y).payload
        assert _nm_header(payload) == (m, k, 0)
        for cut in range(len(payload)):
            with pytest.raises(CodecError):
                E.decode_positions(payload[:cut], y.shape)


def test_nm_flips_raise_codec_error():
    """Single-byte flips: header and tables nearly always raise; ANS words raise in table
    modes (decoded histogram check). Uniform words with C(M, N) a power of two are raw bits
    without redundancy (a flip there yields another valid mask; the container's CRC-32
    catches it), so they are only required not to escape as other errors."""
    head_raised = head_total = 0
    for mask, mode in _nm_masks():
        cs = E.encode_positions(mask)
        side = cs.side_bits // 8
        raised = total = 0
        for i in range(len(cs.payload)):
            for x in (0x01, 0x10, 0x80, 0xFF):
                b = bytearray(cs.payload)
                b[i] ^= x
                hit = _decode_ok_or_codec_error("positions", bytes(b), mask.shape)
                if i < side:
                    head_raised, head_total = head_raised + hit, head_total + 1
                else:
                    raised, total = raised + hit, total + 1
        if mode:
            assert raised == total
    assert head_raised >= 0.97 * head_total


def test_nm_wrong_shape_raises():
    x = nm_mask((16, 32), 2, 4, seed=32)
    p = E.encode_positions(x).payload
    assert _nm_header(p)[:2] == (4, 2)
    for shape in [(16, 33), (513,), (508,), (0,), (-16, -32), ("a",)]:
        with pytest.raises(CodecError):
            E.decode_positions(p, shape)
    # the model codes the C-order flattening, so any shape with 512 elements decodes
    assert np.array_equal(E.decode_positions(p, (8, 64)), x.reshape(8, 64))


def test_nm_crafted_headers_raise_codec_error():
    n = 128
    good = E.encode_positions(nm_mask((8, 16), 2, 4, seed=33)).payload
    assert _nm_header(good) == (4, 2, 0)
    words = np.frombuffer(good[7:], dtype="<u4")
    assert np.array_equal(E.decode_positions(_nm_payload(n, 4, 2, 0, words=words), (n,)),
                          E.decode_positions(good, (8, 16)).reshape(-1))
    one = E.decode_positions(_nm_payload(n, 4, 2, 1, E._varints(np.array([32, 0, 0, 0, 0, 0]))),
                             (n,))  # a single pattern: no ANS words
    assert np.array_equal(one, np.tile([True, True, False, False], 32))
    bad = [
        _nm_payload(n, 33, 2, 0, words=words),  # M > 32
        _nm_payload(n, 64, 2, 0, words=words),
        _nm_payload(n, 1, 0, 0, words=words),  # M < 2
        _nm_payload(n, 0, 0, 0, words=words),
        _nm_payload(n, 4, 4, 0, words=words),  # N >= M
        _nm_payload(n, 4, 5, 0, words=words),
        _nm_payload(n, 4, 0, 0, words=words),  # N < 1
        _nm_payload(n, 3, 1, 0, words=words),  # M does not divide n
        _nm_payload(n, 4, 2, 3, words=words),  # unknown table mode
        _nm_payload(n, 4, 2, 0),  # no ANS words
        _nm_payload(n, 4, 1, 0, words=words),  # other N: different symbol count
        _nm_payload(n, 4, 2, 1, E._varints(np.array([32, 1, 0, 0, 0, 0]))),  # sum != 32
        _nm_payload(n, 4, 2, 1, E._varints(np.array([31, 0, 0, 0, 0, 0]))),
        _nm_payload(n, 4, 2, 1, E._varints(np.array([32, 0, 0, 0, 0]))),  # 5 of 6 counts
        _nm_payload(n, 4, 2, 1, E._varints(np.array([32, 0, 0, 0, 0, 0, 0]))),  # 7 counts
        _nm_payload(n, 4, 2, 1, E._varints(np.array([31, 0, 0, 0, 0, 0])), words),
        _nm_payload(n, 4, 2, 1, E._varints(np.array([32, 0, 0, 0, 0, 0])), [1]),  # trailing
        _nm_payload(n, 4, 2, 2, b"\x05" + b"\x28\xb5\x2f\xfd\x00"),  # broken zstd frame
        _nm_payload(n, 4, 2, 1, E._varints(np.array([16, 16, 0, 0, 0, 0])), words),
        _nm_payload(n, 4, 2, 1, E._varints(np.array([8, 8, 8, 8, 0, 0])), words),
        _nm_payload(n, 4, 2, 1, E._varints(np.array([6, 6, 5, 5, 5, 5])), words),
        bytes([E.POSITIONS_TAG, 5]) + good[2:],  # unknown model
    ]
    for payload in bad:
        with pytest.raises(CodecError):
            E.decode_positions(payload, (n,))
    with pytest.raises(CodecError, match="without elements"):
        E.decode_positions(_nm_payload(0, 4, 2, 0, words=words), (0,))
    # a pattern table for C(32, 16) patterns is refused before reading it
    with pytest.raises(CodecError, match="exceeds"):
        E.decode_positions(_nm_payload(1024, 32, 16, 1, b"\x00" * 64), (1024,))
    # uniform high/low parts (C(32, 16) > 2**24) beyond the last pattern
    p = math.comb(32, 16)
    coder = E._AnsCoder()
    coder.encode_reverse(np.full(32, 0xFFFF, dtype=np.int32), E._models.Uniform(1 << 16))
    coder.encode_reverse(np.full(32, (p - 1) >> 16, dtype=np.int32),
                         E._models.Uniform(((p - 1) >> 16) + 1))
    with pytest.raises(CodecError, match="out of range"):
        E.decode_positions(_nm_payload(1024, 32, 16, 0, words=coder.get_compressed()),
                           (1024,))
    # a tiny payload claiming 10**9 uniform 2:4 groups fails before decoding
    with pytest.raises(CodecError, match="shorter"):
        E.decode_positions(_nm_payload(4 * 10**9, 4, 2, 0, words=[1]), (4 * 10**9,))


def test_balanced_signs_go_as_raw_bits_and_skewed_signs_as_ans(monkeypatch):
    rng = np.random.default_rng(23)
    mag = rng.integers(1, 20, size=100_001)
    balanced = np.where(rng.random(mag.size) < 0.5, mag, -mag)
    cs = roundtrip_values(balanced)
    assert cs.payload[1] & 0x40  # raw sign bits
    with monkeypatch.context() as m:
        m.setattr(E, "_RAW_SIGN_SLACK", -1.0)  # never raw: the same values, ANS-coded signs
        coded = E.encode_values(balanced)
    assert not coded.payload[1] & 0x40
    assert cs.bits <= coded.bits + 64 + 32  # raw costs at most 64 bits (+ one ANS word)
    skewed = np.where(rng.random(mag.size) < 0.9, mag, -mag)
    assert not roundtrip_values(skewed).payload[1] & 0x40
    # a damaged raw sign byte changes the positive count: refused
    body = bytearray(cs.payload)
    at = body.index(np.packbits(balanced > 0).tobytes()[:8])
    body[at] ^= 0x01
    with pytest.raises(E.CodecError, match="sign count"):
        E.decode_values(bytes(body), balanced.size)
    with pytest.raises(E.CodecError):
        E.decode_values(cs.payload[:at + 10], balanced.size)  # truncated in the sign bits


def test_long_streams_checked_by_their_token_sum_stay_robust(monkeypatch):
    """Above `_HISTOGRAM_CHECK` tokens the decoder checks their sum, not their histogram:
    damaged payloads still give a CodecError or values in range, and the same outcome as the
    full histogram check."""
    rng = np.random.default_rng(29)
    n = E._HISTOGRAM_CHECK + 3000
    mag = np.exp2(rng.uniform(0, 20, n)).astype(np.int64) + 1  # escapes of many widths
    v = mag * rng.choice([-1, 1], n)
    cs = roundtrip_values(v)
    assert cs.model == "categorical+escape"
    s = cs.payload[1] & 0x1F
    assert len(np.unique(np.frexp(mag[mag >= 2 << s])[1])) > 3  # several low-bit widths
    damaged = []
    for _ in range(40):
        b = bytearray(cs.payload)
        for _ in range(int(rng.integers(1, 4))):
            b[int(rng.integers(len(b)))] ^= int(rng.integers(1, 256))
        damaged.append(bytes(b))
    by_sum = [_decode_ok_or_codec_error("values", b, n) for b in damaged]
    monkeypatch.setattr(E, "_HISTOGRAM_CHECK", 2 * n)
    assert [_decode_ok_or_codec_error("values", b, n) for b in damaged] == by_sum
    assert sum(by_sum) > 20
