"""rdonnx.runtime.data: input specs, .npz / folder / in-memory / synthetic batches, validation."""

from __future__ import annotations

import numpy as np
import pytest
from _graphs import parse

from rdonnx.errors import UsageError
from rdonnx.graph.model import load_model
from rdonnx.runtime.data import (
    DEFAULT_SYNTHETIC_SAMPLES,
    DataOptions,
    InputSpec,
    check_feed,
    describe_inputs,
    input_specs,
    make_batches,
    open_npz,
    split_labels,
)


def _specs(signature: str, initializers: str = "") -> list[InputSpec]:
    model = parse(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        agraph {signature} {initializers}{{
            y = Identity (x)
        }}""")
    return input_specs(load_model(model))


@pytest.fixture
def float_specs():
    return _specs("(float[N, 3] x) => (float[N, 3] y)")


@pytest.fixture
def two_specs():
    return _specs("(float[N, 3] x, int64[N, 4] tok) => (float[N, 3] y)")


def _rows(batches) -> list[int]:
    return [len(next(iter(b.values()))) for b in batches]


# ---------------------------------------------------------------- input specs


def test_input_specs_read_names_dtypes_and_shapes():
    specs = _specs("(float[batch, 3, 224, 224] x, int64[N, L] tok, bool m) => (float[N] y)")
    assert [(s.name, s.dtype, s.shape) for s in specs] == [
        ("x", np.dtype(np.float32), ("batch", 3, 224, 224)),
        ("tok", np.dtype(np.int64), ("N", "L")),
        ("m", np.dtype(bool), ()),
    ]
    assert describe_inputs(specs) == "x[float32, batchx3x224x224], tok[int64, NxL], m[bool, scalar]"


def test_input_specs_skip_initializers_listed_as_inputs():
    specs = _specs("(float[N, 3] x, float[3] w) => (float[N, 3] y)", "<float[3] w = {1, 2, 3}>")
    assert [s.name for s in specs] == ["x"]


# ---------------------------------------------------------------- validation


def test_npz_with_wrong_key_lists_what_the_model_expects(tmp_path, float_specs):
    path = tmp_path / "d.npz"
    np.savez(path, inputs=np.zeros((4, 3), np.float32))
    with pytest.raises(UsageError) as info:
        make_batches(path, float_specs, DataOptions())
    message = str(info.value)
    assert "missing ['x']" in message and "unknown ['inputs']" in message
    assert "x[float32, Nx3]" in message


def test_float_data_for_int64_input_raises(tmp_path, two_specs):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((4, 3), np.float32), tok=np.zeros((4, 4), np.float32))
    with pytest.raises(UsageError) as info:
        make_batches(path, two_specs, DataOptions())
    message = str(info.value)
    assert "'tok'" in message and "float32" in message
    assert "x[float32, Nx3], tok[int64, Nx4]" in message


def test_wrong_rank_raises(tmp_path, float_specs):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((4, 3, 1), np.float32))
    with pytest.raises(UsageError, match=r"rank 3.*x\[float32, Nx3\]"):
        make_batches(path, float_specs, DataOptions())


def test_wrong_fixed_dimension_raises(tmp_path, float_specs):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((4, 5), np.float32))
    with pytest.raises(UsageError, match=r"shape \(4, 5\).*x\[float32, Nx3\]"):
        make_batches(path, float_specs, DataOptions())


def test_float64_is_cast_to_float32_and_int32_to_int64(tmp_path, two_specs):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 3))  # float64
    tok = rng.integers(0, 100, (6, 4)).astype(np.int32)
    path = tmp_path / "d.npz"
    np.savez(path, x=x, tok=tok)
    batches = make_batches(path, two_specs, DataOptions(batch_size=4))
    got = list(batches)
    assert all(b["x"].dtype == np.float32 and b["tok"].dtype == np.int64 for b in got)
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in got]), x.astype(np.float32))
    np.testing.assert_array_equal(np.concatenate([b["tok"] for b in got]), tok)


def test_check_feed_rejects_int_for_float():
    specs = _specs("(float[N, 3] x) => (float[N, 3] y)")
    with pytest.raises(UsageError, match="int64"):
        check_feed({"x": np.zeros((2, 3), np.int64)}, specs, "feed")


def test_arrays_of_different_length_raise(tmp_path, two_specs):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((4, 3), np.float32), tok=np.zeros((5, 4), np.int64))
    with pytest.raises(UsageError, match="differ in length"):
        make_batches(path, two_specs, DataOptions())


def test_empty_arrays_raise(tmp_path, float_specs):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((0, 3), np.float32))
    with pytest.raises(UsageError, match="no samples"):
        make_batches(path, float_specs, DataOptions())


@pytest.mark.parametrize("options", [DataOptions(batch_size=0), DataOptions(samples=0)])
def test_bad_options_raise(float_specs, options):
    with pytest.raises(UsageError):
        make_batches({"x": np.zeros((4, 3), np.float32)}, float_specs, options)


def test_missing_source_raises(tmp_path, float_specs):
    with pytest.raises(UsageError, match="not found"):
        make_batches(tmp_path / "nothing.npz", float_specs, DataOptions())


def test_not_an_npz_raises(tmp_path, float_specs):
    path = tmp_path / "d.npz"
    path.write_text("not a zip file")
    with pytest.raises(UsageError, match="not a readable .npz"):
        make_batches(path, float_specs, DataOptions())


# ---------------------------------------------------------------- batching


@pytest.mark.parametrize("in_memory", [False, True])
def test_batches_split_along_axis_0_with_partial_last_batch(tmp_path, float_specs, in_memory):
    x = np.arange(30, dtype=np.float32).reshape(10, 3)
    source = {"x": x}
    if not in_memory:
        source = tmp_path / "d.npz"
        np.savez(source, x=x)
    batches = make_batches(source, float_specs, DataOptions(batch_size=4))
    assert len(batches) == 3
    assert _rows(batches) == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), x)
    # re-iterable: the same batches again
    assert [b["x"].tolist() for b in batches] == [b["x"].tolist() for b in batches]


def test_sample_limit(tmp_path, float_specs):
    x = np.arange(30, dtype=np.float32).reshape(10, 3)
    path = tmp_path / "d.npz"
    np.savez(path, x=x)
    batches = make_batches(path, float_specs, DataOptions(batch_size=4, samples=5))
    assert len(batches) == 2 and _rows(batches) == [4, 1]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), x[:5])
    # a limit above the data size reads everything
    assert _rows(make_batches(path, float_specs, DataOptions(batch_size=4, samples=99))) == \
        [4, 4, 2]


def test_fixed_batch_dimension_sets_batch_size():
    specs = _specs("(float[2, 3] x) => (float[2, 3] y)")
    x = np.zeros((6, 3), np.float32)
    batches = make_batches({"x": x}, specs, DataOptions(batch_size=4))
    assert _rows(batches) == [2, 2, 2]


def test_fixed_batch_dimension_never_fails_halfway():
    """With a fixed batch dim, a sample count that is no multiple of it must be rejected up
    front (or the remainder dropped), not fail in the last batch after a long run."""
    specs = _specs("(float[4, 3] x) => (float[4, 3] y)")
    x = np.zeros((10, 3), np.float32)
    try:
        batches = make_batches({"x": x}, specs, DataOptions())
    except UsageError:
        return  # rejected up front: fine
    for batch in batches:
        assert batch["x"].shape == (4, 3)


def test_labels_ride_along_and_split(tmp_path, float_specs):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((5, 3), np.float32), label=np.arange(5))
    batches = make_batches(path, float_specs, DataOptions(batch_size=2), extra_keys=["label"])
    labels = []
    for batch in batches:
        feed, label = split_labels(batch, "label")
        assert set(feed) == {"x"} and "label" in batch
        labels.extend(label.tolist())
    assert labels == [0, 1, 2, 3, 4]
    assert split_labels({"x": 1}, None) == ({"x": 1}, None)
    with pytest.raises(UsageError, match="unknown"):
        make_batches(path, float_specs, DataOptions())  # labels not declared


# ---------------------------------------------------------------- lazy npz reader


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_open_npz_matches_np_load(tmp_path, save):
    rng = np.random.default_rng(3)
    arrays = {"a": rng.standard_normal((7, 3, 2)).astype(np.float32),
              "b": rng.integers(-5, 5, (7, 4)).astype(np.int64),
              "c": rng.standard_normal(7).astype(np.float16),
              "s": np.array(3.5)}
    path = tmp_path / "d.npz"
    save(path, **arrays)
    members = open_npz(path)
    loaded = np.load(path)
    assert set(members) == set(loaded.files) == set(arrays)
    for name in ("a", "b", "c"):
        member = members[name]
        assert member.shape == loaded[name].shape and member.dtype == loaded[name].dtype
        np.testing.assert_array_equal(member[:], loaded[name])
        np.testing.assert_array_equal(member[2:5], loaded[name][2:5])
        np.testing.assert_array_equal(member[5:99], loaded[name][5:])
        np.testing.assert_array_equal(member.read(), loaded[name])
    assert members["s"].read() == loaded["s"] and members["s"].read().shape == ()


def test_open_npz_rejects_object_arrays(tmp_path):
    path = tmp_path / "o.npz"
    np.savez(path, x=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(UsageError, match="objects"):
        open_npz(path)


# ---------------------------------------------------------------- folders of feeds


def test_folder_of_npz_feeds_with_differing_shapes(tmp_path):
    specs = _specs("(float[N, L] x) => (float[N, L] y)")
    shapes = {"b.npz": (2, 5), "a.npz": (1, 3), "c.npz": (3, 4)}
    for name, shape in shapes.items():
        np.savez(tmp_path / name, x=np.full(shape, len(name), np.float64))
    (tmp_path / "notes.txt").write_text("ignored")
    batches = make_batches(tmp_path, specs, DataOptions(batch_size=64))
    assert len(batches) == 3
    got = [b["x"] for b in batches]
    assert [g.shape for g in got] == [(1, 3), (2, 5), (3, 4)]  # sorted by file name
    assert all(g.dtype == np.float32 for g in got)
    limited = make_batches(tmp_path, specs, DataOptions(samples=2))
    assert [b["x"].shape for b in limited] == [(1, 3), (2, 5)]


def test_folder_without_npz_raises(tmp_path, float_specs):
    (tmp_path / "x.npy").write_bytes(b"")
    with pytest.raises(UsageError, match="no .npz"):
        make_batches(tmp_path, float_specs, DataOptions())


def test_folder_feed_problem_names_the_batch(tmp_path):
    specs = _specs("(float[N, L] x) => (float[N, L] y)")
    np.savez(tmp_path / "a.npz", x=np.zeros((1, 3), np.float32))
    np.savez(tmp_path / "b.npz", x=np.zeros((1, 3, 1), np.float32))
    batches = make_batches(tmp_path, specs, DataOptions())  # the first feed is fine
    with pytest.raises(UsageError, match="batch 2"):
        list(batches)


# ---------------------------------------------------------------- synthetic data


def _all(batches) -> dict[str, np.ndarray]:
    feeds = list(batches)
    return {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}


def test_synthetic_is_deterministic_per_seed(float_specs):
    a = _all(make_batches(None, float_specs, DataOptions(batch_size=8, seed=1)))
    b = _all(make_batches(None, float_specs, DataOptions(batch_size=8, seed=1)))
    c = _all(make_batches(None, float_specs, DataOptions(batch_size=8, seed=2)))
    np.testing.assert_array_equal(a["x"], b["x"])
    assert not np.array_equal(a["x"], c["x"])
    assert a["x"].dtype == np.float32
    assert a["x"].shape == (DEFAULT_SYNTHETIC_SAMPLES, 3)
    assert np.unique(a["x"]).size == a["x"].size  # batches differ from each other


def test_synthetic_count_and_batch_shape(float_specs):
    batches = make_batches(None, float_specs, DataOptions(batch_size=4, samples=10))
    assert len(batches) == 3
    assert [b["x"].shape for b in batches] == [(4, 3)] * 3


def test_synthetic_integer_input_without_range_raises(two_specs):
    with pytest.raises(UsageError, match="--input-range tok"):
        make_batches(None, two_specs, DataOptions())


def test_synthetic_ranges_are_respected(two_specs):
    options = DataOptions(batch_size=16, samples=256, ranges={"tok": (3, 5), "x": (-0.5, 0.25)})
    got = _all(make_batches(None, two_specs, options))
    assert got["tok"].dtype == np.int64
    assert set(np.unique(got["tok"]).tolist()) == {3, 4, 5}  # both ends included
    assert got["x"].min() >= -0.5 and got["x"].max() <= 0.25
    assert got["x"].max() - got["x"].min() > 0.5  # really spread over the range


def test_synthetic_dynamic_non_batch_dim_needs_input_shape():
    specs = _specs("(float[N, L] x) => (float[N, L] y)")
    with pytest.raises(UsageError, match="--input-shape x"):
        make_batches(None, specs, DataOptions())
    batches = make_batches(None, specs, DataOptions(shapes={"x": (2, 7)}, samples=6))
    assert len(batches) == 3 and [b["x"].shape for b in batches] == [(2, 7)] * 3


def test_synthetic_input_shape_rank_and_name_are_checked():
    specs = _specs("(float[N, L] x) => (float[N, L] y)")
    with pytest.raises(UsageError, match="rank 3"):
        make_batches(None, specs, DataOptions(shapes={"x": (2, 7, 1)}))
    with pytest.raises(UsageError, match=r"unknown input.*'z'"):
        make_batches(None, specs, DataOptions(shapes={"z": (1, 2)}))
