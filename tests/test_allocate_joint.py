"""Joint density / value-bits allocation under a coded-bits budget."""

import itertools

import numpy as np
import pytest

from rdonnx.algo import grids
from rdonnx.algo.prune import Ranking, magnitude
from rdonnx.algo.quantize import Quantized, quantize
from rdonnx.allocate.joint import (
    ESTIMATE_ENTRIES,
    Option,
    allocate_joint,
    cost_range,
    estimate_bits,
    options_for,
    sample_rows,
)
from rdonnx.codec import entropy
from rdonnx.errors import UsageError


def _brute_force(options, budget):
    best = None
    names = sorted(options)
    for combo in itertools.product(*(options[n] for n in names)):
        cost = sum(o.cost for o in combo)
        if cost <= budget:
            value = sum(o.distortion for o in combo)
            if best is None or value < best[0]:
                best = (value, combo)
    return best


def _random_options(rng, count=5):
    """Convex-ish trade-offs: distortion falls as cost grows, with a random scale."""
    costs = np.sort(rng.uniform(10, 1000, count))
    scale = rng.uniform(0.1, 10)
    return [Option(1.0, 8, float(c), float(scale / c)) for c in costs]


@pytest.mark.parametrize("seed", range(20))
def test_joint_allocation_stays_within_budget_and_is_near_optimal(seed):
    rng = np.random.default_rng(seed)
    options = {f"w{i}": _random_options(rng) for i in range(3)}
    low, high = cost_range(options)
    budget = rng.uniform(low, high)
    chosen = allocate_joint(options, budget)
    total = sum(o.cost for o in chosen.values())
    assert total <= budget + 1e-9
    value = sum(o.distortion for o in chosen.values())
    optimum, _ = _brute_force(options, budget)
    # exact up to the rounding of costs to 1/4096 of the budget
    assert value >= optimum - 1e-12
    relaxed, _ = _brute_force(options, budget * (1 - 3 / 4096))
    assert value <= relaxed + 1e-12


def test_budget_below_the_cheapest_choice_is_a_usage_error():
    options = {"w": [Option(1.0, 8, 100.0, 0.0), Option(0.5, 4, 40.0, 1.0)]}
    with pytest.raises(UsageError, match="budget"):
        allocate_joint(options, 10.0)
    assert allocate_joint(options, 40.0)["w"].cost == 40.0
    assert allocate_joint(options, 1e9)["w"].cost == 100.0


def test_the_budget_goes_where_it_saves_most_distortion():
    cheap_gain = [Option(0.1, 4, 10.0, 5.0), Option(1.0, 8, 20.0, 0.0)]  # 0.5 per bit
    poor_gain = [Option(0.1, 4, 10.0, 1.0), Option(1.0, 8, 20.0, 0.0)]  # 0.1 per bit
    chosen = allocate_joint({"a": cheap_gain, "b": poor_gain}, 30.0)
    assert chosen["a"].cost == 20.0 and chosen["b"].cost == 10.0


@pytest.mark.parametrize("density", [0.05, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("bits", [3, 5, 8])
def test_estimate_is_close_to_the_real_coded_size(density, bits):
    rng = np.random.default_rng(7)
    weight = rng.laplace(0, 0.05, size=(256, 256)).astype(np.float32)
    ranking = Ranking(magnitude(weight))
    mask = ranking.mask(int(round(density * weight.size)))
    estimate = estimate_bits(weight, mask, bits)
    q = quantize(np.where(mask, weight, 0), bits).q
    positions, values = entropy.encode_integers(q)
    coded = positions.bits + values.bits
    assert coded == pytest.approx(estimate, rel=0.05, abs=512)


def test_options_cover_the_grid_and_widths():
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((32, 32)).astype(np.float32)
    grid, curve = (1.0, 0.5, 0.1), (0.0, 0.2, 0.9)
    quantization = {4: 0.05, 8: 0.001}
    options = options_for(weight, Ranking(magnitude(weight)), grid, curve, quantization)
    assert {(o.density, o.bits) for o in options} == {(d, b) for d in grid for b in (4, 8)}
    for o in options:  # predicted distortion: pruning curve plus density-scaled quantization
        assert o.distortion == pytest.approx(curve[grid.index(o.density)] +
                                             o.density * quantization[o.bits])
    cost = {(o.density, o.bits): o.cost for o in options}
    assert cost[(1.0, 8)] > cost[(1.0, 4)] > cost[(0.1, 4)]


@pytest.mark.parametrize("seed", range(20))
def test_the_lowest_budget_gives_the_cheapest_choice(seed):
    """At exactly the smallest total cost (the joint search's first probe), rounding the costs
    to budget steps must not make the cheapest choice look over budget."""
    rng = np.random.default_rng(seed)
    options = {f"w{i}": _random_options(rng, 4) for i in range(40)}
    low, _ = cost_range(options)
    chosen = allocate_joint(options, low)
    assert sum(o.cost for o in chosen.values()) <= low * (1 + 1e-12)


@pytest.mark.parametrize("density", [0.05, 0.3, 1.0])
@pytest.mark.parametrize("bits", [3, 8])
def test_a_large_weight_is_estimated_on_sampled_channels(density, bits):
    """Past ESTIMATE_ENTRIES the quantizer sees evenly spaced output channels only (and is
    told which); the estimate stays within 2% of quantizing the whole weight."""
    rng = np.random.default_rng(5)
    scales = np.exp(rng.normal(0, 1, size=(1024, 1))).astype(np.float32)  # channels differ
    weight = (rng.laplace(0, 0.05, size=(1024, 512)) * scales).astype(np.float32)
    mask = Ranking(magnitude(weight)).mask(int(round(density * weight.size)))
    seen = []

    def per_channel(a, b, rows):
        seen.append(None if rows is None else len(rows))
        grid = grids.choose(a, b, 0)
        return Quantized(grids.round_to(a, grid, b), grid.steps, axis=0)

    whole = estimate_bits(weight, mask, bits, per_channel, None)
    sampled = estimate_bits(weight, mask, bits, per_channel, 0)
    assert seen[0] is None and 0 < seen[1] < 1024
    assert seen[1] * 512 <= ESTIMATE_ENTRIES * 1.01
    assert sampled == pytest.approx(whole, rel=0.02)
    assert sample_rows((512, 256), 0) is None  # small enough to estimate whole
