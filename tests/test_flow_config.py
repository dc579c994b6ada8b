"""The settings as types: option keywords routed to their groups, the method's own options, the
recorded layout (version 2) and the flat layout of version 1 read back."""

from __future__ import annotations

import json
from dataclasses import MISSING, fields

import pytest

from rdonnx.choices import DataOptions, PQIOptions
from rdonnx.cli import compress_cmd
from rdonnx.errors import UsageError
from rdonnx.flow.config import (
    CONFIG_VERSION,
    GROUPS,
    KEYS,
    Coding,
    CompressConfig,
    Measurement,
    Pruning,
    Selection,
    Target,
)
from rdonnx.flow.methods.options import METHOD_OPTIONS, GlobalOptions, HSICOptions, RDOptions
from rdonnx.flow.methods.registry import METHODS

# the settings of `compress --rate 0.5` as rdonnx 0.1 wrote them (version 1: one flat object;
# the grid shortened)
V1_DEFAULT = {
    "bits_per_weight": None, "budget": "params", "channel_axis": 1, "criterion": "magnitude",
    "damp": 0.01, "data": {"batch_size": 16, "ranges": {}, "samples": None, "seed": 0,
                           "shapes": {}},
    "device": "auto", "exclude": [], "format": "rdonnx", "granularity": "layer",
    "grid": [1.0, 0.721, 0.52], "hsic_beta": None, "hsic_samples": 64, "include": [],
    "layer_distortion": True, "lossless_unpruned": False, "max_distortion": None,
    "method": "rd", "metric": "nmse", "min_agreement": None, "min_params": 256,
    "normalize": False, "pattern": None, "pqi_eta": 0.0, "pqi_gamma": 1.0, "pqi_mode": "fixed",
    "pqi_p": 0.5, "pqi_q": 1.0, "quantizer": "uniform", "rate": 0.5, "rdoq": False,
    "reconstruct": False, "replay_mb": 512, "sequential": False, "simplify": True,
    "solver": "lagrange", "value_bits": None, "value_budget": 0.02, "values": "auto",
    "version": 1}


def roundtrip(config: CompressConfig) -> CompressConfig:
    return CompressConfig.from_dict(json.loads(json.dumps(config.as_dict())))


def test_keywords_go_to_their_groups():
    config = CompressConfig.of(rate=0.5, metric="kl", criterion="activation", value_bits=4,
                               min_params=16, samples=8, method="pqi", pqi_p=0.3,
                               granularity="neuron")
    assert config.target == Target(rate=0.5)
    assert config.measure == Measurement(metric="kl")
    assert config.prune == Pruning(criterion="activation")
    assert config.coding == Coding(value_bits=4)
    assert config.selection == Selection(min_params=16)
    assert config.data == DataOptions(samples=8)
    assert config.method_options == PQIOptions(p=0.3, granularity="neuron")
    assert (config.target.kind, config.target.value) == ("rate", 0.5)
    config.check()
    with pytest.raises(TypeError, match="no_such"):
        CompressConfig.of(no_such=1)


def test_each_method_holds_its_own_options_only():
    for name in METHODS:
        config = CompressConfig.of(rate=0.5, method=name)
        expected = METHOD_OPTIONS.get(name)
        assert type(config.method_options) is (expected or type(None)), name
        assert METHODS[name].options is expected, name
    assert CompressConfig.of(method="hsic", hsic_samples=8).method_options == \
        HSICOptions(samples=8)
    # another method's options: refused when changed, ignored at their defaults (the CLI
    # passes every option)
    for kw, flag in ((dict(method="rd", pqi_p=0.3), "--pqi-p applies to --method pqi"),
                     (dict(method="pqi", hsic_samples=8), "--hsic-samples applies"),
                     (dict(method="uniform", solver="dp"), "--solver applies to --method rd"),
                     (dict(method="rd", normalize=True), "--normalize applies")):
        with pytest.raises(UsageError, match=flag):
            CompressConfig.of(rate=0.5, **kw)
    assert CompressConfig.of(method="rd", pqi_p=PQIOptions().p).method_options == RDOptions()
    # a mismatched options object is refused by check
    with pytest.raises(UsageError, match="--method pqi takes PQIOptions"):
        CompressConfig(Target(rate=0.5), "pqi", RDOptions()).check()


def test_updated_changes_options_and_a_new_method_starts_from_its_defaults():
    config = CompressConfig.of(rate=0.5, method="global", normalize=True, metric="cosine")
    changed = config.updated(max_distortion=0.1, rate=None, criterion="activation")
    assert changed.target == Target(max_distortion=0.1)
    assert changed.method_options == GlobalOptions(normalize=True)
    assert (changed.measure.metric, changed.prune.criterion) == ("cosine", "activation")
    assert config.updated(method="rd").method_options == RDOptions()
    assert config.updated(target=Target(rate=0.2)).target.rate == 0.2


@pytest.mark.parametrize("kw", [dict(rate=0.3), dict(method="pqi", pqi_q=2.0, rate=0.1),
                                dict(method="hsic", budget="flops", hsic_beta=2.0, rate=0.4),
                                dict(method="global", normalize=True, rate=0.2),
                                dict(method="surp", bits_per_weight=1.5),
                                dict(pattern="2:4", reconstruct=True, include=("a*",),
                                     grid=(1.0, 0.5), shapes={"x": (1, 3)}, seed=3)])
def test_version_2_settings_read_back_unchanged(kw):
    config = CompressConfig.of(**kw)
    recorded = config.as_dict()
    assert recorded["version"] == CONFIG_VERSION == 2
    assert set(recorded) == {"version", "method", "method_options", *GROUPS}
    assert roundtrip(config) == config


def test_version_1_settings_read_as_the_same_config():
    assert CompressConfig.from_dict(V1_DEFAULT) == CompressConfig.of(rate=0.5,
                                                                     grid=(1.0, 0.721, 0.52))
    pqi = {**V1_DEFAULT, "method": "pqi", "pqi_p": 0.3, "granularity": "neuron",
           "data": {**V1_DEFAULT["data"], "shapes": {"x": [1, 3]}, "samples": 8}}
    assert CompressConfig.from_dict(pqi) == CompressConfig.of(
        rate=0.5, grid=(1.0, 0.721, 0.52), method="pqi", pqi_p=0.3, granularity="neuron",
        shapes={"x": (1, 3)}, samples=8)
    # a method's options that version 1 recorded for every method count for that method only
    hsic = {**V1_DEFAULT, "method": "hsic", "hsic_samples": 8, "pqi_p": 0.25}
    assert CompressConfig.from_dict(hsic).method_options == HSICOptions(samples=8)


def test_every_option_keyword_is_one_field_and_one_flag():
    assert len(KEYS) == sum(1 for cls in (*GROUPS.values(), *METHOD_OPTIONS.values())
                            for f in fields(cls) if "option" in f.metadata)
    params = {p.name: p for p in compress_cmd.params}
    for key, (owner, name) in KEYS.items():
        assert key in params, key  # compress takes every option
        cls = GROUPS[owner] if owner in GROUPS else METHOD_OPTIONS[owner]
        found = next(f for f in fields(cls) if f.name == name)
        param = params[key]
        # grid and confidence are given as text ("1,0.5", "none") the CLI parses
        if not param.multiple and key not in ("grid", "confidence") and \
                found.default is not MISSING:
            assert param.default == found.default, key  # the field's own default
