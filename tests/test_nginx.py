"""deploy/nginx.conf through a real nginx, in front of a tiny HTTP server standing in for a node's Serve proxy.

The test renders a copy of the shipped config (upstream -> 127.0.0.1:<port>, listen -> 127.0.0.1:<port>,
pid/logs/temp files in a tmp dir) and runs nginx in the foreground. nginx must be installed: `make test`
installs Debian's nginx where it is missing, so a missing binary fails here rather than skipping.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml

from serve_app.ports import free_port
from serve_app.settings import DEPLOY_DIR, Settings

NGINX_CONF = DEPLOY_DIR / "nginx.conf"
GPU_SERVE_CONFIG = DEPLOY_DIR / "serve_config.gpu.yaml"
SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def nginx_binary() -> str:
    # /usr/sbin is not on a non-root user's PATH on Debian, and that is where apt puts nginx.
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    if found is None:
        pytest.fail(
            "nginx is not installed, so deploy/nginx.conf cannot be tested. `make test` installs it "
            "(the Makefile's `nginx` step: apt-get install nginx-light); or install it yourself "
            "(Debian/Ubuntu: apt-get install nginx-light, or nginx).",
            pytrace=False,
        )
    return found


def directive(text: str, name: str) -> str:
    """The value of a directive's first occurrence (a location may override it further down)."""
    values = re.findall(rf"^\s*{name}\s+([^;]+);", text, flags=re.M)
    assert values, f"{NGINX_CONF.name} has no {name}"
    return values[0].strip()


def size_bytes(value: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([kmgKMG]?)", value).groups()
    return int(number) * SIZE_UNITS[unit.lower()]


def seconds(value: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(ms|s|m)?", value).groups()
    return int(number) * {"ms": 0.001, "s": 1, "m": 60, None: 1}[unit]


def sub_once(pattern: str, replacement: str, text: str) -> str:
    new, count = re.subn(pattern, replacement, text, flags=re.M)
    assert count == 1, f"{NGINX_CONF.name}: expected one match of {pattern!r}, found {count} (the test renders it)"
    return new


def render(upstream_port: int, listen_port: int, workdir: Path, client_max_body_size: str | None = None) -> str:
    """The shipped config, pointed at local ports and writing only under workdir."""
    text = NGINX_CONF.read_text()
    # As root, workers would switch to www-data and could not read the tmp dir: keep them root. Not root,
    # nginx ignores `user`, so it is dropped.
    text = sub_once(r"^user\s+[^;]+;\n", "user root;\n" if os.geteuid() == 0 else "", text)
    text = sub_once(r"^pid\s+[^;]+;", f"pid {workdir}/nginx.pid;", text)
    text = sub_once(r"^error_log\s+\S+", f"error_log {workdir}/error.log", text)
    text = sub_once(r"^(\s*)access_log\s+/[^;]+;", rf"\g<1>access_log {workdir}/access.log;", text)
    text = sub_once(r"^(\s*)listen\s+[^;]+;", rf"\g<1>listen 127.0.0.1:{listen_port};", text)
    # The first upstream server becomes the local one (its max_fails/fail_timeout kept), the others go.
    servers = re.findall(r"^\s*server\s+[^\s;{]+:\d+[^;]*;\n", text, flags=re.M)
    assert servers, f"{NGINX_CONF.name}: no `server host:port ...;` lines in the upstream"
    text = text.replace(servers[0], re.sub(r"server\s+\S+:\d+", f"server 127.0.0.1:{upstream_port}", servers[0]))
    for line in servers[1:]:
        text = text.replace(line, "")
    if client_max_body_size is not None:
        text = sub_once(
            r"^(\s*)client_max_body_size\s+[^;]+;", rf"\g<1>client_max_body_size {client_max_body_size};", text
        )
    temp_paths = "".join(
        f"    {kind}_temp_path {workdir}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return sub_once(r"^http \{\n", "http {\n" + temp_paths, text)


class Upstream:
    """A stand-in for a node's Serve proxy: /health answers 200, POST /v2/rerank echoes what it got."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                upstream.requests.append({"method": "GET", "path": self.path, "headers": dict(self.headers)})
                if self.path == "/health":
                    self.reply(200, {"status": "ok", "pools": {}})
                else:
                    self.reply(404, {"error": {"type": "not_found"}})

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                upstream.requests.append({"method": "POST", "path": self.path, "headers": dict(self.headers)})
                if self.path == "/v2/rerank":
                    self.reply(200, {"path": self.path, "received_bytes": len(body), "echo": json.loads(body)})
                else:
                    self.reply(404, {"error": {"type": "not_found"}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.running = True

    def stop(self) -> None:
        if self.running:
            self.running = False
            self.server.shutdown()
            self.server.server_close()
            self.thread.join(5)


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    server = Upstream()
    yield server
    server.stop()


@contextmanager
def nginx(upstream_port: int, workdir: Path, client_max_body_size: str | None = None) -> Iterator[httpx.Client]:
    """nginx in the foreground on a rendered copy of deploy/nginx.conf; yields a client for it; stops it."""
    binary = nginx_binary()
    listen = free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(render(upstream_port, listen, workdir, client_max_body_size))
    error_log = workdir / "error.log"
    process = subprocess.Popen(
        [binary, "-p", str(workdir), "-c", str(conf), "-e", str(error_log), "-g", "daemon off;"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{listen}", timeout=10, trust_env=False) as client:
            deadline = time.monotonic() + 15
            while True:
                if process.poll() is not None:
                    log = error_log.read_text() if error_log.exists() else ""
                    pytest.fail(f"nginx exited with {process.returncode}: {process.stdout.read().decode()}\n{log}")
                try:
                    client.get("/health")
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline:
                        pytest.fail(f"nginx did not answer on 127.0.0.1:{listen} within 15 s")
                    time.sleep(0.1)
            yield client
    finally:
        process.send_signal(signal.SIGTERM)  # fast shutdown
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_config_matches_the_service_limits_and_deadline():
    """client_max_body_size = max_request_bytes; nginx outwaits Serve's deadline; closes idle links first."""
    text = NGINX_CONF.read_text()
    config = yaml.safe_load(GPU_SERVE_CONFIG.read_text())
    settings = Settings(**config["applications"][0]["args"])
    assert size_bytes(directive(text, "client_max_body_size")) == settings.max_request_bytes
    assert size_bytes(directive(text, "client_max_body_size")) == Settings().max_request_bytes  # the default too
    backstop = config["http_options"]["request_timeout_s"]
    assert settings.request_timeout_s < backstop  # the ingress answers 504 before the proxy cuts in
    assert backstop < seconds(directive(text, "proxy_read_timeout")) <= backstop + 10
    assert seconds(directive(text, "keepalive_timeout")) < config["http_options"]["keep_alive_timeout_s"]
    assert "http_503" in directive(text, "proxy_next_upstream").split()  # the server-level one
    servers = re.findall(r"^\s*server\s+\S+:\d+([^;]*);", text, flags=re.M)
    assert servers and all("max_fails=" in s and "fail_timeout=" in s for s in servers)
    assert re.search(r"location\s+=?\s*/health\s*\{[^}]*proxy_pass\s+http://serve_proxies;", text)


def test_health_and_rerank_pass_through(upstream, tmp_path):
    with nginx(upstream.port, tmp_path) as client:
        health = client.get("/health")
        assert health.status_code == 200
        assert health.json()["status"] == "ok"

        body = {"query": "capital of France", "documents": ["Paris", "Bananas"]}
        answer = client.post("/v2/rerank", json=body)
        assert answer.status_code == 200
        assert answer.json()["echo"] == body
        assert answer.json()["received_bytes"] == len(answer.request.content)

    seen = upstream.requests[-1]
    assert seen["method"] == "POST" and seen["path"] == "/v2/rerank"
    assert seen["headers"]["X-Forwarded-For"] == "127.0.0.1"
    assert seen["headers"]["X-Real-IP"] == "127.0.0.1"


def test_body_over_client_max_body_size_gets_413_from_nginx(upstream, tmp_path):
    with nginx(upstream.port, tmp_path, client_max_body_size="1k") as client:
        before = len(upstream.requests)
        small = client.post("/v2/rerank", json={"query": "q", "documents": ["x" * 500]})
        assert small.status_code == 200
        large = client.post("/v2/rerank", json={"query": "q", "documents": ["x" * 2048]})
        assert large.status_code == 413
        assert "nginx" in large.text  # nginx's own page: the body never reached the node
    assert len(upstream.requests) == before + 1


def test_upstream_down_gives_a_quick_502(upstream, tmp_path):
    with nginx(upstream.port, tmp_path) as client:
        assert client.get("/health").status_code == 200
        upstream.stop()
        for send in (lambda: client.get("/health"), lambda: client.post("/v2/rerank", json={"query": "q"})):
            started = time.monotonic()
            answer = send()
            assert answer.status_code == 502
            assert time.monotonic() - started < 3  # connection refused: no waiting for the 35 s read timeout
