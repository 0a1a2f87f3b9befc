"""The ingress' text encoders: per model, the tokenizer its pool hands out (asked of one replica, once), so that
text pairs travel to the pool as token ids, checked and cut into windows here (tokenize_in: ingress). No torch."""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import Executor

from ray.serve.handle import DeploymentHandle

from serve_app.errors import as_request_errors
from serve_app.scoring.text import TextEncoder
from serve_app.scoring.types import Pair, WindowRule

log = logging.getLogger("ray.serve")


class Encoders:
    """Per model: a TextEncoder built from the TokenizerSpec its pool hands out (asked of one replica, once), or
    None where its pairs travel as text (another family, tokenize_in=pool, the shared pool)."""

    SPEC_WAIT_S = 2.0  # a pool that has not answered by then gets this request's pairs as text

    def __init__(self) -> None:
        self.known: dict[str, TextEncoder | None] = {}
        self.asking: dict[str, asyncio.Future] = {}

    def forget(self, name: str) -> None:
        """Drop the model's encoder (its pool's tokenizer changed): the next request asks the pool again."""
        self.known.pop(name, None)
        self.asking.pop(name, None)

    async def get(self, name: str, handle: DeploymentHandle) -> TextEncoder | None:
        if name in self.known:
            return self.known[name]
        task = self.asking.get(name)
        if task is None:
            task = self.asking[name] = asyncio.ensure_future(self._ask(name, handle))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved, never logged as lost
        try:
            return await asyncio.wait_for(asyncio.shield(task), self.SPEC_WAIT_S)
        except Exception as exc:  # noqa: BLE001 - no spec yet: the pairs go as text, the pool says what is wrong
            if task.done():
                self.asking.pop(name, None)  # failed (pool unavailable): ask again next time
            log.info("model %s: no tokenizer from its pool yet (%s); sending text", name, type(exc).__name__)
            return None

    async def _ask(self, name: str, handle: DeploymentHandle) -> TextEncoder | None:
        spec = await handle.tokenizer_spec.remote()
        encoder = None if spec is None else await asyncio.to_thread(TextEncoder, spec)
        self.known[name] = encoder
        log.info("model %s: %s", name, f"tokenizing here ({spec.family})" if encoder else "its pool tokenizes")
        return encoder


async def encode_call(
    encoder: TextEncoder, pairs: list[Pair], truncate: bool, rule: WindowRule | None, threads: Executor | None = None
):
    """A model's pairs as token ids (windows cut, lengths checked), the way its pool would tokenize them: on one
    of `threads`, which stops at its next piece of work when this task is cancelled (the deadline, a client
    gone)."""
    stop = threading.Event()

    def run():
        with as_request_errors():
            return encoder.prepare(pairs, truncate, rule, stop)

    try:
        return await asyncio.get_running_loop().run_in_executor(threads, run)
    except asyncio.CancelledError:
        stop.set()
        raise
