"""bench/compare.py's driver: a request that fails (a 504 past the deadline) is counted in its phase's row and
never ends the run."""

from __future__ import annotations

import asyncio

import httpx

from bench.compare import drive, load_row


def test_a_failed_request_is_counted_in_its_row_and_the_phase_goes_on():
    requests = [{"query": "q", "documents": ["a", "b"]} for _ in range(5)]
    sent = []

    async def call(request: dict) -> None:
        sent.append(request)
        if len(sent) == 3:  # the third request passes the deadline
            response = httpx.Response(504, request=httpx.Request("POST", "http://127.0.0.1/v2/rerank"))
            response.raise_for_status()
        await asyncio.sleep(0.001)

    driven = asyncio.run(drive(call, requests, concurrency=2))
    assert len(sent) == 5 and len(driven.latencies) == 4
    assert list(driven.failed.values()) == ["HTTPStatusError 504"]
    row = load_row("cross_encoder", "http", 2, requests, driven)
    assert row.errors == 1 and row.pairs == 8 and "1 of 5 requests failed" in row.note
    assert row.pairs_per_s == round(8 / driven.seconds, 2)
