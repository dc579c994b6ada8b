"""Meeting a target by measuring: the joint search over bits budgets."""

import pytest

from rdonnx.flow.config import Target
from rdonnx.flow.target import Check, Realized, meet_budget
from rdonnx.runtime.distortion import Distortion


@pytest.mark.parametrize("low", [1234564.4, 987654.321, 5.0000049])
def test_the_joint_search_never_realizes_a_budget_below_the_lowest(low):
    """Budgets are keyed to 6 significant digits; the lowest one, rounded down, would be
    below the cheapest choice (which the allocation then refuses)."""
    asked = []

    def realize(budget: float) -> Realized:
        asked.append(budget)
        assert budget >= low
        nmse = 1.0 / budget
        return Realized(1.0, {}, {}, {}, {}, {}, Distortion(nmse, None, None, None, None, 8),
                        coded_bits=budget)

    bound = 1.0 / (3 * low)
    chosen, points = meet_budget(Target(max_distortion=bound), Check("nmse"), realize,
                                 (low, 10 * low), 100)
    assert min(asked) == low
    assert chosen.distortion.nmse <= bound
    assert chosen.coded_bits < 3.1 * low  # bisected down to near the threshold
    assert len(points) == len(asked)  # each budget realized once
