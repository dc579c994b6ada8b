"""SuRP: the permutation, the embedded stream (prefix = encoder state), the artifact and CLI."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from _graphs import tiny_mlp
from conftest import assert_usage_error

from rdonnx.artifact.format import read_artifact
from rdonnx.artifact.io import decompress, inspect_artifact, load, open_session
from rdonnx.artifact.parallel import decode_all
from rdonnx.codec import surp as codec
from rdonnx.errors import UsageError
from rdonnx.flow.config import CompressConfig
from rdonnx.flow.methods.surp import truncate_artifact
from rdonnx.flow.pipeline import compress


def _encoder(n: int = 6000, seed: int = 1) -> tuple[codec.Encoder, np.ndarray]:
    w = np.random.default_rng(0).laplace(size=n)
    return codec.Encoder(np.abs(w), w < 0, seed=seed), w


def test_permutation_is_a_bijection_and_inverts():
    d = codec._Domain.of(1000)
    keys = codec.step_keys(7, np.array([3]))[0]
    p = codec.permute(np.arange(1000), keys, d)
    assert sorted(p.tolist()) == list(range(1000))
    assert np.array_equal(codec.permute(p, keys, d, inverse=True), np.arange(1000))
    other = codec.permute(np.arange(1000), codec.step_keys(7, np.array([4]))[0], d)
    assert not np.array_equal(p, other)


def test_batched_picks_equal_the_step_by_step_rule():
    """The encoder's batched picks are exactly: E = {i: R[i] > thr}, k = min over E of
    pi_t^-1 (both the inverse and the forward-scan paths, and the recomputed steps)."""
    enc, _ = _encoder(4000)
    enc.run(nnz=1500)
    assert enc.fallbacks > 0 and enc.steps > 1500
    sched, res, d = codec.Schedule(enc.side), enc.u.copy(), codec._Domain.of(enc.u.size)
    for t in range(enc.steps):
        refreshes = 0
        while not (res > sched.thr).any():
            sched.refresh()
            refreshes += 1
        e = np.flatnonzero(res > sched.thr)
        inv = codec.permute(e, codec.step_keys(enc.seed, np.array([t]))[0], d, inverse=True)
        j = int(np.argmin(inv))
        assert (enc.k[t], enc.r[t]) == (inv[j], refreshes), t
        res[e[j]] -= sched.advance()
    assert np.array_equal(res, enc.res)


def test_prefix_decodes_to_the_encoder_state_and_bits_grow():
    enc, w = _encoder()
    snaps = []
    for nnz in (1, 50, 300, 700, 1200):
        enc.run(nnz=nnz)
        snaps.append(enc.snapshot())
    stream = enc.stream(chunk_steps=97)
    full = codec.decode(stream)
    assert np.array_equal(full.uhat, enc.uhat)
    nz = enc.uhat != 0
    assert np.array_equal(full.negative[nz], (w < 0)[nz])
    for snap in snaps:
        cut = codec.truncate(stream, snap.steps)
        assert cut.steps == snap.steps
        d = codec.decode(cut)
        assert np.array_equal(d.uhat, snap.uhat)  # bit-exact, every float
        assert d.nnz == snap.nnz
        assert (d.schedule.mu, d.schedule.alpha, d.schedule.refreshes) == \
            (snap.mu, snap.alpha, snap.refreshes)
    bits = [codec.truncate(stream, t).bits for t in range(0, stream.steps + 1, 13)]
    assert all(a <= b for a, b in zip(bits, bits[1:]))
    assert bits[-1] < stream.steps * np.log2(enc.u.size) + enc.nnz  # < raw indices + signs


def test_truncation_keeps_whole_chunks_and_is_deterministic():
    enc, _ = _encoder()
    enc.run(nnz=800)
    stream = enc.stream(chunk_steps=100)
    cut = codec.truncate(stream, 250)
    assert cut.chunks[:2] == stream.chunks[:2]
    again, _ = _encoder()
    again.run(nnz=800)
    assert again.stream(chunk_steps=100).payload() == stream.payload()


def test_damaged_chunk_is_a_codec_error():
    enc, _ = _encoder(2000)
    enc.run(nnz=200)
    stream = enc.stream(chunk_steps=50)
    bad = bytearray(stream.chunks[0])
    bad[0] ^= 0x7F
    stream.chunks[0] = bytes(bad)
    with pytest.raises(codec.CodecError):
        codec.decode(stream)


@pytest.fixture(scope="module")
def mlp_path(tmp_path_factory):
    model, _ = tiny_mlp(hidden=64, d_in=32, d_out=16)
    folder = tmp_path_factory.mktemp("surp")
    path = folder / "m.onnx"
    onnx.save(model, str(path))
    calib = folder / "c.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32))
    return path, calib


def test_compress_surp_artifact_decodes_what_was_measured(mlp_path, tmp_path):
    path, calib = mlp_path
    result = compress(path, CompressConfig.of(rate=0.3, method="surp"), calib=calib)
    assert abs(result.report.rate - 0.3) < 1e-3
    out = tmp_path / "a.rdonnx"
    result.save(out)
    artifact = read_artifact(out)
    assert artifact.manifest["format_version"] == 2
    decoded = decode_all(artifact)
    for name, value in result.weights.items():
        assert np.array_equal(decoded[name], value), name
    x = np.random.default_rng(1).standard_normal((4, 32)).astype(np.float32)
    session = open_session(out)
    import onnxruntime as ort

    dense = tmp_path / "d.onnx"
    decompress(out, dense)
    ref = ort.InferenceSession(str(dense), providers=["CPUExecutionProvider"])
    assert np.array_equal(session.run(None, {"x": x})[0], ref.run(None, {"x": x})[0])
    assert load(out).graph.initializer
    assert "surp" in inspect_artifact(out).render()
    result.save(tmp_path / "b.rdonnx")
    assert (tmp_path / "b.rdonnx").read_bytes() == out.read_bytes()


def test_compress_surp_bits_target_and_refusals(mlp_path):
    path, calib = mlp_path
    result = compress(path, CompressConfig.of(bits_per_weight=1.5, method="surp"), calib=calib)
    assert result.surp.stream.bits <= 1.5 * 3072
    assert result.surp.stream.bits > 1.2 * 3072  # the longest prefix within the budget
    for bad in (CompressConfig.of(rate=0.3, method="surp", value_bits=4),
                CompressConfig.of(rate=0.3, method="surp", reconstruct=True)):
        with pytest.raises(UsageError):
            bad.check()


def test_distortion_bound_beyond_half_density_extends_the_stream(mlp_path):
    """A bound that rate 0.5 misses is met by a denser prefix (the next cap), measured."""
    path, calib = mlp_path
    half = compress(path, CompressConfig.of(rate=0.5, method="surp"), calib=calib)
    bound = 0.5 * half.report.calibration.nmse
    result = compress(path, CompressConfig.of(max_distortion=bound, method="surp"), calib=calib)
    assert result.report.calibration.nmse <= bound
    assert result.report.rate > 0.5
    with pytest.raises(UsageError, match="longest prefix"):
        compress(path, CompressConfig.of(max_distortion=0.0, method="surp"), calib=calib)


def test_cli_compress_truncate(cli, mlp_path, tmp_path):
    path, calib = mlp_path
    art = tmp_path / "a.rdonnx"
    run = cli("compress", path, "--method", "surp", "--rate", "0.4", "--calib", calib, "-o",
              art)
    assert run.code == 0, run.err
    assert "values        SuRP threshold staircase" in run.err  # not "exact"
    assert "one shared stream" in cli("inspect", art).out
    small = tmp_path / "b.rdonnx"
    assert cli("truncate", art, "--rate", "0.2", "-o", small).code == 0
    a, b = read_artifact(art), read_artifact(small)
    assert b.manifest["surp"]["nnz"] == round(0.2 * 3072)
    assert len(small.read_bytes()) < len(art.read_bytes())
    full = decode_all(a)
    assert all(np.count_nonzero(v) <= np.count_nonzero(full[n])
               for n, v in decode_all(b).items())
    bound = tmp_path / "c.rdonnx"
    run = cli("truncate", art, "--max-distortion", "0.9", "--calib", calib, "-o", bound)
    assert run.code == 0, run.err
    assert read_artifact(bound).manifest["metrics"]["distortion"] <= 0.9
    before = art.read_bytes()
    assert_usage_error(cli("truncate", art, "--rate", "0.1", "-o", art), "input")
    assert art.read_bytes() == before
    assert_usage_error(cli("truncate", art, "--rate", "0.9", "-o", tmp_path / "e.rdonnx"),
                       "holds only")
    assert_usage_error(cli("compress", path, "--method", "surp", "--rate", "0.4",
                           "--values", "exact", "-o", tmp_path / "x.rdonnx"), "surp")
    other = tmp_path / "rd.rdonnx"
    assert cli("compress", path, "--rate", "0.4", "--values", "exact", "-o", other,
               "-q").code == 0
    assert_usage_error(cli("truncate", other, "--rate", "0.2", "-o", tmp_path / "f.rdonnx"),
                       "no SuRP")


def _with_settings(path, settings: dict) -> None:
    """Rewrite the artifact's manifest with other `settings` (sections are addressed from the
    end of the manifest, so they stay valid)."""
    import zlib

    import zstandard

    from rdonnx.artifact.format import HEADER

    blob = path.read_bytes()
    magic, version, flags, length, _ = HEADER.unpack_from(blob)
    manifest = json.loads(zstandard.ZstdDecompressor().decompress(
        blob[HEADER.size:HEADER.size + length]))
    manifest["settings"] = settings
    raw = zstandard.ZstdCompressor().compress(json.dumps(manifest).encode())
    path.write_bytes(HEADER.pack(magic, version, flags, len(raw), zlib.crc32(raw)) + raw +
                     blob[HEADER.size + length:])


def test_truncate_reads_the_settings_of_version_1_artifacts(mlp_path, tmp_path):
    """An artifact written before the settings were grouped (version 1: one flat object) is
    cut by the metric and weights it records."""
    path, calib = mlp_path
    config = CompressConfig.of(rate=0.5, method="surp", metric="cosine", min_params=16,
                               holdout=0.0)  # measured on all of calib, as truncate cuts
    art = tmp_path / "a.rdonnx"
    result = compress(path, config, calib=calib)
    result.save(art)
    bound = 1.01 * result.report.calibration.distortion  # cosine at rate 0.5
    flat = {"version": 1, "method": "surp", "data": config.as_dict()["data"]}
    for group in ("target", "selection", "measure", "prune", "coding"):
        flat.update(config.as_dict()[group])
    _with_settings(art, flat)
    out = tmp_path / "b.rdonnx"
    cut = truncate_artifact(art, out, max_distortion=bound, calib=calib)
    metrics = read_artifact(out).manifest["metrics"]
    assert metrics["metric"] == "cosine" and cut.distortion == metrics["distortion"] <= bound
    assert read_artifact(out).manifest["settings"] == json.loads(json.dumps(flat))  # as recorded
