"""`python -m serve_app` (make run): what it says about Ray's token authentication, and the token's mode."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from serve_app import __main__ as main


def test_the_hint_says_how_to_reach_a_cluster_with_token_auth(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # what ray.init() sets for a new local cluster
    hint = main.ray_tools_hint("127.0.0.1:8265")
    assert "http://127.0.0.1:8265" in hint and "export RAY_AUTH_MODE=token" in hint and "serve status" in hint


def test_the_hint_says_when_token_auth_is_off(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert "OFF" in main.ray_tools_hint("127.0.0.1:8265")


def test_the_token_ray_wrote_becomes_readable_by_its_owner_alone(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    token = tmp_path / ".ray" / "auth_token"
    token.parent.mkdir()
    token.write_text("a-token")
    token.chmod(0o644)  # as Ray writes it
    main.protect_token()
    assert token.stat().st_mode & 0o777 == 0o600
    main.protect_token()  # no token, or already private: nothing to do
    assert token.read_text() == "a-token"


def test_an_empty_ray_auth_mode_does_not_turn_token_auth_off(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", " ")
    main.keep_token_auth_default()
    assert "RAY_AUTH_MODE" not in main.os.environ  # Ray's default for a new local cluster: token auth on
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # an explicit choice stays
    main.keep_token_auth_default()
    assert main.os.environ["RAY_AUTH_MODE"] == "disabled"


def test_a_pid_file_holding_our_own_pid_is_stale(monkeypatch, tmp_path):
    # A container restarted after a crash: the new process may get the pid the killed one wrote.
    monkeypatch.setattr(main, "PID_FILE", tmp_path / "serve_app.pid")
    main.PID_FILE.write_text(str(main.os.getpid()))
    assert main.running_pid() is None


def test_a_pid_reused_by_a_later_process_is_stale(monkeypatch, tmp_path):
    import subprocess
    import sys

    monkeypatch.setattr(main, "PID_FILE", tmp_path / "serve_app.pid")
    # A live process whose command line names serve_app, as a later `make run` would, with another start time.
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "serve_app"])
    try:
        # Until the child has exec'd, its /proc cmdline is still ours (pytest's): wait for its own.
        cmdline = Path(f"/proc/{other.pid}/cmdline")
        deadline = time.monotonic() + 10
        while b"serve_app" not in cmdline.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.01)
        namespace, start = main.process_identity(other.pid).split(" ")
        main.PID_FILE.write_text(f"{other.pid} {namespace} {int(start) - 1}")
        assert main.running_pid() is None
        main.PID_FILE.write_text(f"{other.pid} {namespace} {start}")  # the very process that wrote it: running
        assert main.running_pid() == other.pid
    finally:
        other.kill()
        other.wait()


def test_bad_settings_refuse_to_start_with_a_message(monkeypatch, capsys):
    monkeypatch.setenv("RERANK_API_KEY", "")
    assert main.main() == 2
    out = capsys.readouterr().out
    assert "not starting" in out and "api_key" in out and "unset the variable" in out


@pytest.mark.parametrize("value", ["", "not json", "[{"])
def test_a_setting_that_is_not_json_refuses_to_start_with_a_message(monkeypatch, capsys, value):
    monkeypatch.setenv("RERANK_MODELS", value)
    assert main.main() == 2
    out = capsys.readouterr().out
    assert "not starting" in out and "models" in out and "JSON" in out
