"""The forward cost a text replica measured at start-up (beside other replicas loading) is measured again once
the replica is idle, and the median of the measurements is what cuts its batches; calls interrupt a
measurement, and a replica they keep interrupting gives up."""

from __future__ import annotations

import asyncio
import statistics
import time

import httpx
import pytest

from serve_app.replica import REFINE_AFTER_S
from tests.conftest import REMEASURE_BEFORE_FIRST_CALL


def test_the_forward_cost_is_measured_again_when_idle_and_the_median_kept(apps):
    # The session's `remeasure` application: a replica of its own, whose first call `apps` made at start-up.
    (before,) = REMEASURE_BEFORE_FIRST_CALL
    assert before["forward_cost_samples"] == [before["forward_cost_tokens"]]  # start-up's only, before a call
    assert not before["forward_cost_settled"]
    with httpx.Client(base_url=apps["remeasure"], timeout=60) as client:
        deadline = time.monotonic() + 90
        while True:
            (replica,) = client.get("/v1/models").json()["pools"]["text"]["replicas"]
            samples = replica["forward_cost_samples"]
            if replica["forward_cost_settled"]:
                break
            assert time.monotonic() < deadline, replica
            time.sleep(0.5)
        assert replica["pid"] == before["pid"]  # the same replica, measured again
        assert len(samples) == 1 + len(REFINE_AFTER_S)
        assert samples[0] == before["forward_cost_samples"][0]
        assert all(isinstance(s, int) and s >= 0 for s in samples)
        assert replica["forward_cost_tokens"] == round(statistics.median(samples))
        # The replica still answers, with the cost it now uses.
        assert client.post("/v2/rerank", json={"query": "capital?", "documents": ["paris"]}).status_code == 200


@pytest.fixture
def no_waiting(monkeypatch):
    from serve_app import replica

    monkeypatch.setattr(replica, "REFINE_AFTER_S", (0.0, 0.0, 0.0))
    monkeypatch.setattr(replica, "REFINE_IDLE_S", 0.0)


def test_interrupted_measurements_are_made_again_and_each_new_median_applied(no_waiting):
    from serve_app.replica import remeasure_when_quiet

    results = iter([None, 10, None, None, 40, 20])
    busy_answers = iter([True, True] + [False] * 20)
    samples, applied = [30], []

    async def measure():
        return next(results)

    asyncio.run(remeasure_when_quiet(measure, lambda: next(busy_answers), samples, applied.append))
    assert samples == [30, 10, 40, 20]
    assert applied == [20, 30, 25]  # round(median) after each new sample


def test_a_replica_that_calls_keep_interrupting_gives_up(no_waiting):
    from serve_app.replica import REFINE_MAX_INTERRUPTED, remeasure_when_quiet

    tries, samples, applied = [], [30], []

    async def measure():
        tries.append(1)
        return None

    asyncio.run(remeasure_when_quiet(measure, lambda: False, samples, applied.append))
    assert len(tries) == REFINE_MAX_INTERRUPTED
    assert samples == [30] and applied == []


def test_a_measurement_stops_at_the_next_forward_when_work_arrives(model_dirs):
    from serve_app.pools import measure_forward_cost_tokens
    from serve_app.scoring.loading import load_scorer

    scorer = load_scorer(str(model_dirs["cross_encoder"]))
    before = scorer.options.forward_cost_tokens
    asked = []

    seen = []

    def after_three() -> bool:
        asked.append(1)
        seen.append(scorer.options.forward_cost_tokens)  # what admission reads while the measurement runs
        return len(asked) > 3

    assert measure_forward_cost_tokens(scorer, 4, interrupted=after_three) is None
    assert len(asked) == 4  # asked before each forward, stopped at the fourth
    # The probe's own options (one forward, no cuts) are never the scorer's: admission counted calls that arrived
    # during a re-measurement at its 1<<30-token forward cost and refused them (413).
    assert set(seen) == {before} and scorer.options.forward_cost_tokens == before
    cost = measure_forward_cost_tokens(scorer, 4, interrupted=lambda: False)
    assert isinstance(cost, int) and cost >= 0
