"""A load spike scales the text pool up and, after it, back down; no request is lost on the way."""

from __future__ import annotations

from pathlib import Path

from bench.spike import run_spike


def test_a_spike_scales_the_text_pool_up_and_back_down_without_losing_requests(serve_url, tmp_path):
    # At most 2 replicas (the benchmark's 4): one rise and fall proves the scaling, and each replica more is
    # seconds of a core importing torch while the load runs.
    result = run_spike(
        clients=16, load_s=8, app_name="spike_test", out_dir=tmp_path, serve_url=serve_url, max_replicas=2
    )
    summary, timeline = result["summary"], result["timeline"]
    # The autoscaler adds replicas while the load is on (a new replica takes seconds to load its model, so on a
    # busy machine it may only reach RUNNING once the load has stopped).
    assert summary["max_target_replicas_during_load"] > 1, timeline
    assert timeline[-1]["replica_states"] == {"RUNNING": 1}, timeline
    assert summary["final_replicas"] == 1
    assert summary["lost"] == 0, summary
    assert set(summary["totals"]) <= {"200", "503"}, summary
    assert summary["503_without_retry_after"] == 0, summary
    assert summary["totals"].get("200"), summary
    assert Path(result["json"]).is_file()
    assert Path(result["png"]).is_file()
