"""Rate limits: token buckets per token and per robot, all or nothing, bounded memory."""

from __future__ import annotations

from api.limits import Limits


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_token_gets_its_burst_then_its_rate() -> None:
    clock = Clock()
    limits = Limits(10, 20, 0, 1, clock=clock)
    assert limits.admit("t", ["a"] * 20) is None  # the whole burst at once
    refused = limits.admit("t", ["a"])
    assert refused is not None and refused.limit == "token" and refused.retry_after_s == 1
    assert "10 reports/s" in refused.detail and "bursts of 20" in refused.detail
    clock.now += 0.5  # 5 back
    assert limits.admit("t", ["a"] * 5) is None
    assert limits.admit("t", ["a"]) is not None
    assert limits.admit("other-token", ["a"] * 20) is None  # each token its own bucket


def test_a_robot_is_limited_whatever_token_posts_it() -> None:
    clock = Clock()
    limits = Limits(0, 1, 1, 3, clock=clock)
    assert limits.admit("t1", ["r1", "r1"]) is None
    refused = limits.admit("t2", ["r1", "r1"])
    assert refused is not None and refused.limit == "robot" and "'r1'" in refused.detail
    assert refused.retry_after_s == 1  # 1 more needed at 1/s
    assert limits.admit("t2", ["r2", "r2", "r2"]) is None


def test_a_refused_post_takes_nothing() -> None:
    clock = Clock()
    limits = Limits(100, 10, 1, 5, clock=clock)
    assert limits.admit("t", ["r1"] * 5) is None
    # r2 fits, r1 does not: nothing of it is taken, the token's bucket included.
    assert limits.admit("t", ["r2"] * 2 + ["r1"]) is not None
    assert limits.admit("t", ["r2"] * 5) is None  # r2 still has its whole burst
    clock.now += 10  # everything refilled
    assert limits.admit("t", ["r3"] * 5 + ["r4"] * 5) is None  # token: 10 of 10


def test_more_than_a_burst_can_never_fit_and_says_so() -> None:
    limits = Limits(5, 10, 0, 1, clock=Clock())
    refused = limits.admit("t", ["r"] * 11)
    assert refused is not None and "can never fit" in refused.detail and refused.retry_after_s == 60


def test_off_when_both_rates_are_zero() -> None:
    limits = Limits(0, 1, 0, 1)
    assert not limits and limits.admit("t", ["r"] * 10_000) is None


def test_robot_buckets_stay_bounded_and_forgetting_an_idle_one_changes_nothing() -> None:
    clock = Clock()
    limits = Limits(0, 1, 1, 2, max_robots=100, clock=clock)
    for i in range(100):
        assert limits.admit("t", [f"idle-{i}"]) is None
    clock.now += 10  # all refilled: forgetting them is exact
    for i in range(500):
        assert limits.admit("t", [f"new-{i}"] * 2) is None
    assert limits.robots is not None and len(limits.robots) <= 100
    # A robot still tracked and drained is refused; capacity was kept for it.
    assert limits.admit("t", ["new-499"]) is not None
