"""The quiet local Ray of `make run`: the variables it sets exist in the installed Ray, and an operator's win."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray

from serve_app.local_ray import QUIET_RAY_ENV, quiet_ray_env


@pytest.mark.parametrize("name", sorted(QUIET_RAY_ENV))
def test_each_variable_is_one_the_installed_ray_reads(name):
    # RAY_<lower_case> are Ray's C++ config entries (compiled into _raylet.so without the prefix); the others
    # are read by Ray's Python (Serve's constants, the log monitor) under their full name.
    key = name.removeprefix("RAY_") if name[4:5].islower() else name
    root = Path(ray.__file__).parent
    where = ["_raylet.so"] if key != name else ["serve/_private/constants.py", "_private/log_monitor.py"]
    assert any(key.encode() in (root / w).read_bytes() for w in where), f"Ray {ray.__version__} no longer reads {name}"


def test_unset_variables_are_set_and_the_operators_are_kept():
    environ = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.1"}
    applied = quiet_ray_env(environ)
    assert environ["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] == "0.1"  # the operator's value wins
    assert "RAY_SERVE_CONTROL_LOOP_INTERVAL_S" not in applied
    assert applied == {k: v for k, v in QUIET_RAY_ENV.items() if k != "RAY_SERVE_CONTROL_LOOP_INTERVAL_S"}
    assert all(environ[k] == v for k, v in applied.items())


def test_main_quiets_only_when_the_setting_is_on(monkeypatch):
    from serve_app import __main__ as main

    calls = []
    monkeypatch.setattr(main, "quiet_ray_env", lambda: calls.append(1))

    class Stop(Exception):
        pass

    def refuse(*_, **__):
        raise Stop

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(main, "keep_token_auth_default", lambda: None)
    for quiet, expected in ((True, [1]), (False, [])):
        calls.clear()
        with pytest.raises(Stop):
            main.serve_until_interrupted(main.Settings(quiet_ray=quiet), "http://127.0.0.1:0")
        assert calls == expected
