"""Entropy coder (rdonnx.codec.entropy): round trips, sizes, determinism, robustness."""

from __future__ import annotations

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
    assert cs.model == "iid"
    assert cs.bits <= 1.01 * cs.iid_entropy_bits + cs.side_bits
    v = np.round(rng.laplace(size=400_000) * 25).astype(np.int64)
    v = v[v != 0]
    cs = roundtrip_values(v)
    assert cs.bits <= 1.01 * cs.iid_entropy_bits + cs.side_bits
    assert cs.bits >= cs.iid_entropy_bits  # sanity: cannot beat the empirical entropy


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
    for model in E.POSITION_MODELS:
        cs = E.encode_positions(m, models=(model,))
        assert cs.model == model
        out.append(("positions", cs.payload, m.shape))
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
    for model in E.POSITION_MODELS:
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
    iid = bytes([E.POSITIONS_TAG, 0]) + E._varint(big) + E._varint(big // 2) + b"\x01\0\0\0"
    with pytest.raises(CodecError, match="shorter"):
        E.decode_positions(iid, (big,))
    rows = (bytes([E.POSITIONS_TAG, 1]) + E._varint(big) + E._varint(2) + E._varint(big // 2)
            + E._varint(big // 2) + E._varint(0) + E._varint(big // 2) + b"\x01\0\0\0")
    with pytest.raises(CodecError):
        E.decode_positions(rows, (big // 1000, 1000))  # class rows must add up to shape[0]
    vals = (bytes([E.VALUES_TAG, 23]) + E._varint(big) + E._varint(big // 2) + E._varint(2)
            + E._varint(big // 2) + E._varint(big // 2) + b"\x01\0\0\0")
    with pytest.raises(CodecError, match="shorter"):
        E.decode_values(vals, big)
    huge_alphabet = (bytes([E.VALUES_TAG, 23]) + E._varint(4) + E._varint(4)
                     + E._varint(1 << 22))
    with pytest.raises(CodecError, match="alphabet"):
        E.decode_values(huge_alphabet, 4)


def test_values_encoder_rejects_overflowing_integers():
    with pytest.raises(ValueError):
        E.encode_values(np.array([np.iinfo(np.int64).min, 1], dtype=np.int64))
    with pytest.raises(ValueError):
        E.encode_values(np.array([2**63 + 5], dtype=np.uint64))
    assert roundtrip_values(np.array([3, 2**24 - 1], dtype=np.uint32)).bits > 0
