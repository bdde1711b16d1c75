"""Phi-accrual failure detector: suspicion grows with silence, regular arrivals keep it low."""

from __future__ import annotations

import math

import pytest

from pico.gossip import FailureDetector


@pytest.mark.parametrize("distribution", ["normal", "exponential"])
def test_phi_grows_monotonically_with_silence(distribution: str) -> None:
    fd = FailureDetector(0.2, distribution=distribution)  # type: ignore[arg-type]
    for i in range(20):
        fd.report("a", i * 0.1)
    last = 1.9
    phis = [fd.phi("a", last + dt) for dt in (0.0, 0.1, 0.3, 1.0, 3.0, 10.0)]
    assert phis == sorted(phis)
    assert phis[0] < 1.0
    assert phis[-1] > 8.0


@pytest.mark.parametrize("distribution", ["normal", "exponential"])
def test_regular_arrivals_keep_phi_low(distribution: str) -> None:
    fd = FailureDetector(0.2, distribution=distribution)  # type: ignore[arg-type]
    for i in range(200):
        now = i * 0.1
        fd.report("a", now)
        assert fd.phi("a", now + 0.1) < 1.0


def test_exponential_phi_is_silence_over_mean_interval_in_decades() -> None:
    fd = FailureDetector(1.0, min_interval=0.01)
    for i in range(1, 51):  # fill the window with 1 s intervals, pushing the bootstrap out
        fd.report("a", float(i))
    assert fd.phi("a", 50.0 + math.log(10)) == pytest.approx(1.0)
    assert fd.phi("a", 50.0 + 8 * math.log(10)) == pytest.approx(8.0)


def test_normal_phi_matches_the_normal_tail() -> None:
    fd = FailureDetector(1.0, distribution="normal", min_std_deviation=0.1)
    for i in range(1, 60):
        fd.report("a", float(i))
    # mean 1 s, std clamped to 0.1 s: 1 s of silence is the median -> phi = -log10(0.5)
    assert fd.phi("a", 60.0) == pytest.approx(-math.log10(0.5))
    assert fd.phi("a", 59.0 + 2.0) > 20


def test_unknown_node_is_tracked_from_its_first_query() -> None:
    fd = FailureDetector(0.2)
    assert fd.phi("ghost", 100.0) == 0.0
    assert fd.phi("ghost", 100.2) > 0.0
    assert fd.tracked() == 1
    fd.remove("ghost")
    assert fd.tracked() == 0


def test_burst_of_packets_counts_as_one_arrival() -> None:
    fd = FailureDetector(0.2)
    for i in range(50):
        fd.report("a", float(i))
        fd.report("a", i + 0.001)  # the digest that follows a delta in the same round
    # The mean stays ~1 s instead of halving, so 3 s of silence is not alarming.
    assert fd.phi("a", 52.0) < 2.0


def test_window_forgets_old_intervals() -> None:
    fd = FailureDetector(0.2, window_size=5)
    for i in range(10):
        fd.report("a", i * 10.0)  # slow at first
    start = 90.0
    for i in range(1, 6):
        fd.report("a", start + i * 0.5)  # then fast: only these are remembered
    assert fd.phi("a", start + 2.5 + 5.0) > 4.0


def test_invalid_parameters_are_rejected() -> None:
    with pytest.raises(ValueError):
        FailureDetector(0.0)
    with pytest.raises(ValueError):
        FailureDetector(1.0, window_size=0)
