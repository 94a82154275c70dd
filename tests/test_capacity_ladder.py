"""The capacity ladder's sizing: rungs and wait budgets from the sizing model, the controller's decisions, and
spot-only against the ladder over synthetic capacity traces."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from spot_training.config import capacity, ladder
from spot_training.config.sizing import Workload, simulate
from tests.conftest import ROOT

W = Workload(on_demand_price_per_instance_hour=37.688)
TYPES = ["ml.p4d.24xlarge", "ml.p5.48xlarge"]


@pytest.fixture(scope="module")
def rungs():
    return ladder.ladder(W, instance_type=TYPES[0], allowed_instance_types=TYPES, max_run_seconds=43200)


def test_the_rungs_climb_from_spot_on_each_allowed_type_to_on_demand_within_the_deadline(rungs):
    assert [r.name for r in rungs] == ["spot:ml.p4d.24xlarge", "spot:ml.p5.48xlarge", "on-demand:ml.p4d.24xlarge"]
    spot_p90 = simulate(W, trials=2000).p90_hours
    spot = [r for r in rungs if r.capacity == ladder.SPOT]
    # A spot rung that never gets capacity ends at its MaxWait (there is no separate wait limit): each MaxWait is
    # the p90 completion plus an equal share of the slack, and when every spot rung ran to its MaxWait the
    # on-demand rung still fits before the deadline.
    assert all(r.max_wait_seconds / 3600 == pytest.approx(spot_p90 + r.wait_hours, abs=1e-3) for r in spot)
    assert sum(r.hours for r in spot) + ladder.on_demand_hours(W) == pytest.approx(W.slo_hours, abs=1e-3)
    assert sum(r.hours for r in spot) + ladder.on_demand_hours(W) <= W.slo_hours
    # MaxRuntime never exceeds a spot rung's MaxWait (SageMaker refuses MaxWait < MaxRuntime); on demand keeps it.
    assert all(r.max_run_seconds == r.max_wait_seconds < 43200 for r in spot)
    assert (rungs[2].max_wait_seconds, rungs[2].max_run_seconds) == (0, 43200)


def test_no_room_to_wait_goes_straight_to_on_demand():
    tight = dataclasses.replace(W, slo_hours=6.6)
    rungs = ladder.ladder(tight, instance_type=TYPES[0], allowed_instance_types=TYPES, max_run_seconds=43200)
    # Only the default spot type stays, with no slack: its MaxWait is its p90 completion.
    assert [r.name for r in rungs] == ["spot:ml.p4d.24xlarge", "on-demand:ml.p4d.24xlarge"]
    assert [r.wait_hours for r in rungs] == [0.0, 0.0]
    assert rungs[0].max_wait_seconds == int(simulate(tight, trials=2000).p90_hours * 3600)


def test_a_wider_deadline_keeps_every_allowed_type_and_shares_the_slack():
    wide = dataclasses.replace(W, slo_hours=48.0)
    rungs = ladder.ladder(wide, instance_type=TYPES[0], allowed_instance_types=[*TYPES, "ml.p5e.48xlarge"],
                          max_run_seconds=43200)
    assert [r.capacity for r in rungs] == [ladder.SPOT] * 3 + [ladder.ON_DEMAND]
    assert len({r.wait_hours for r in rungs[:3]}) == 1 and rungs[0].wait_hours > 2


def test_the_controller_climbs_on_capacity_failures_only_and_only_while_the_deadline_holds(rungs):
    climb = capacity.decide(rungs, rungs[0].name, "MaxWaitTimeExceeded: waited 8 h", hours_since_start=8.0, slo_hours=W.slo_hours)
    assert climb.action == "climb" and climb.rung == rungs[1]
    assert climb.reason.startswith("MaxWaitTimeExceeded on spot:ml.p4d.24xlarge after 8.0 h; spot:ml.p5.48xlarge")
    # Too late for another spot rung at p90, still early enough for on-demand: it skips to on-demand.
    spot_p90 = simulate(W, trials=2000).p90_hours
    late = W.slo_hours - (spot_p90 + ladder.on_demand_hours(W)) / 2
    assert capacity.decide(rungs, rungs[0].name, "CapacityError: none", hours_since_start=late,
                           slo_hours=W.slo_hours).rung == rungs[2]
    # Time enough for the next spot rung's p90 but not for its whole MaxWait and on-demand after it: on-demand.
    tight = W.slo_hours - (rungs[1].hours + ladder.on_demand_hours(W)) + 0.5
    assert W.slo_hours - tight > spot_p90
    assert capacity.decide(rungs, rungs[0].name, "MaxWaitTimeExceeded", hours_since_start=tight,
                           slo_hours=W.slo_hours).rung == rungs[2]
    assert capacity.decide(rungs, rungs[1].name, "CapacityError: none", hours_since_start=20.0, slo_hours=W.slo_hours).reason == (
        "CapacityError on spot:ml.p5.48xlarge: 4.0 h left before the 24 h deadline, too little for any rung above; "
        "the run stops here")
    top = capacity.decide(rungs, rungs[2].name, "ResourceLimitExceeded: quota", hours_since_start=1.0, slo_hours=W.slo_hours)
    assert (top.action, top.reason) == ("stop", "ResourceLimitExceeded on on-demand:ml.p4d.24xlarge, the ladder's "
                                                "top rung: nothing to climb to")
    assert capacity.decide(rungs, rungs[0].name, "AlgorithmError: out of memory", hours_since_start=1.0,
                         slo_hours=W.slo_hours).action == "ignore"
    busy = capacity.decide(rungs, rungs[0].name, "CapacityError", hours_since_start=1.0, slo_hours=W.slo_hours, running_executions_of_run=1)
    assert (busy.action, busy.rung) == ("stop", None)
    assert "not on this pipeline's ladder" in capacity.decide(rungs, "spot:ml.g5.48xlarge", "CapacityError",
                                                           hours_since_start=1.0, slo_hours=W.slo_hours).reason


def test_the_ladder_meets_the_slo_where_spot_only_misses_it_and_says_what_it_costs(rungs):
    spot_only, climbing = ladder.compare_strategies(W, rungs, ladder.Capacity(spot_wait_hours=1.0, spot_unavailable=0.15))
    assert (spot_only.strategy, climbing.strategy) == ("spot only", "ladder")
    # Spot only misses whenever the default type's capacity never comes (about 15% of traces).
    assert 0.80 < spot_only.probability_within_slo < 0.88
    assert climbing.probability_within_slo > 0.99 and spot_only.on_demand_share == 0
    assert 0 < climbing.on_demand_share < 0.15  # most runs that miss capacity on one type find it on the other
    assert climbing.expected_cost > spot_only.expected_cost  # the SLO is bought with some on-demand hours
    # No spot capacity at all: spot only never finishes; the ladder always does, on demand, at the on-demand price.
    none = ladder.compare_strategies(W, rungs, ladder.Capacity(spot_unavailable=1.0), trials=200)
    assert none[0].probability_within_slo == 0 and none[0].expected_cost == 0
    hours = ladder.on_demand_hours(W) - W.provisioning_minutes / 60
    assert none[1].probability_within_slo == 1 and none[1].on_demand_share == 1
    # ... having waited out both spot rungs' MaxWaits first: it finishes just inside the deadline.
    assert none[1].p90_hours == pytest.approx(sum(r.hours for r in rungs[:2]) + ladder.on_demand_hours(W))
    assert none[1].expected_cost == pytest.approx(hours * W.instance_count * 37.688)
    # Always capacity, quickly: the same runs, the same cost, no on-demand.
    plenty = ladder.compare_strategies(W, rungs, ladder.Capacity(spot_wait_hours=0.1, spot_unavailable=0.0), trials=500)
    assert plenty[0].expected_cost == pytest.approx(plenty[1].expected_cost) and plenty[1].on_demand_share == 0


def test_size_prints_the_ladder_and_both_strategies_and_refuses_bad_traces_in_one_line():
    def size(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "spot_training.cli", "size", "--capacity-ladder", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)

    done = size()
    assert done.returncode == 0, done.stderr
    assert "capacity ladder (deadline 24 h after the run starts):" in done.stdout
    assert "  2. on-demand:ml.p4d.24xlarge: the fallback: 6.5 h uninterrupted" in done.stdout
    assert any(line.strip().startswith("spot only  P(SLO met)") for line in done.stdout.splitlines())
    assert any(line.strip().startswith("ladder     P(SLO met) 100.0%") for line in done.stdout.splitlines())
    bad = size("--spot-unavailable", "1.5")
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "error: --spot-unavailable=1.5, --spot-wait-hours=1: the probability must be from 0 to 1 and the wait above 0")
