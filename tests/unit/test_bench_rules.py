"""The alert-rules benchmark's two books do what its tables say of them."""

from __future__ import annotations

import msgspec

from bench.rules import rule_book
from bench.rules_step import batches, run
from bench.workload import Shape
from dataflows.incidents import compiled
from dataflows.rules import Rules
from dataflows.shard import ShardLogic
from fleetpulse.settings import Settings

SHAPE = Shape(robots=200, reports=6000, hot=0.0, sampled=0.0)


def test_the_books_hold_the_same_rules_a_robot_in_the_scope_of_about_thirty() -> None:
    quiet, storm = rule_book(100, quiet=True), rule_book(100)
    assert [(r.name, r.scope, r.severity, r.for_s) for r in quiet.rules] == [
        (r.name, r.scope, r.severity, r.for_s) for r in storm.rules
    ]
    in_scope = [
        len(compiled(storm).scoped(f"amr-{i:06d}", f"site-{i % 4}").rules) for i in range(200)
    ]
    assert 25 <= sum(in_scope) / len(in_scope) <= 45


def test_the_quiet_book_fires_nothing_on_the_workload_and_the_storm_often() -> None:
    work, count = batches(SHAPE)
    base = Rules.from_settings(Settings())
    made = {}
    for name, book in (("quiet", rule_book(100, quiet=True)), ("storm", rule_book(100))):
        rules = msgspec.structs.replace(base, book=book)
        _, made[name] = run(ShardLogic(rules, None, "test", None), work)
    assert made["quiet"] == 0
    assert made["storm"] > count / 10  # about one report in four on the bench's workload
