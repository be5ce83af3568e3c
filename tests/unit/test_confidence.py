"""The gate's statistics (dpo_trainer.gate.confidence): intervals, and verdicts that know n."""

from __future__ import annotations

import numpy as np
import pytest
from dpo_trainer.gate.confidence import Estimate, bootstrap, judge, mean, wilson


def test_wilson_matches_the_textbook_interval() -> None:
    # 24 of 40 at 95%: the Wilson score interval is [0.446, 0.737].
    estimate = wilson(24, 40, 0.95)
    assert estimate.value == 0.6
    assert estimate.low == pytest.approx(0.4457, abs=1e-3)
    assert estimate.high == pytest.approx(0.7371, abs=1e-3)
    perfect = wilson(40, 40, 0.95)
    assert perfect.high <= 1.0, "never above 1, even when every pair is right"
    assert perfect.low == pytest.approx(0.9124, abs=1e-3)


def test_a_threshold_passed_on_too_few_pairs_is_inconclusive_with_the_pairs_needed() -> None:
    # The trap the gate used to fall into: 0.61 "passes" 0.6 on a point estimate.
    outcome, needed = judge(wilson(61, 100, 0.95), ">=", 0.6)
    assert outcome == "inconclusive"
    assert needed is not None
    assert needed > 5000, "a 1-point edge needs thousands of pairs"
    # On about that many pairs, the same share clears the threshold.
    assert judge(wilson(round(0.61 * needed), needed, 0.95), ">=", 0.6)[0] == "pass"
    assert judge(wilson(900, 1000, 0.95), ">=", 0.6) == ("pass", None)
    assert judge(wilson(55, 100, 0.95), ">=", 0.6) == ("fail", None)


def test_an_upper_bound_criterion_looks_at_the_top_of_its_interval() -> None:
    drift = Estimate(0.1, 0.05, 0.25, 64, "bootstrap", 0.95)
    assert judge(drift, "<=", 0.3) == ("pass", None)
    # The top is 0.15 above the estimate, which is 0.1 under the threshold: (0.15/0.1)^2 x 64.
    assert judge(drift, "<=", 0.2) == ("inconclusive", 144)
    assert judge(drift, "<=", 0.05)[0] == "fail"


def test_the_same_adapter_against_itself_never_beats_it() -> None:
    rng = np.random.default_rng(3)
    correct = (rng.random(500) < 0.7).astype(np.float64)
    delta = bootstrap((correct - correct,), mean, 0.95, method="paired-bootstrap")
    assert (delta.value, delta.low, delta.high) == (0.0, 0.0, 0.0)
    for beat_margin in (0.0, 0.01):
        assert judge(delta, ">", beat_margin)[0] == "fail"


def test_a_paired_improvement_is_seen_where_unpaired_noise_would_hide_it() -> None:
    rng = np.random.default_rng(4)
    champion = (rng.random(400) < 0.7).astype(np.float64)
    challenger = champion.copy()
    challenger[np.flatnonzero(champion == 0)[:20]] = 1.0  # 20 more pairs right, none worse
    delta = bootstrap((challenger - champion,), mean, 0.95, method="paired-bootstrap")
    assert delta.value == pytest.approx(0.05)
    assert delta.low > 0.0
    assert judge(delta, ">", 0.0) == ("pass", None)


def test_a_bootstrap_is_the_same_every_time() -> None:
    values = np.linspace(-1, 3, 77)
    first = bootstrap((values,), mean, 0.95)
    assert first == bootstrap((values,), mean, 0.95)
    assert first.low < first.value < first.high
    assert first.value == pytest.approx(values.mean())
