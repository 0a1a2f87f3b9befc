"""Repeated pairs never scored twice: the ingress' bounded cache of each text pair's score (its best window's),
least recently used out (setting `score_cache_entries`; 0 turns it off).

A key is a digest of everything that decides a score: the model's name and its scoring settings (model, family,
dtype, quantization, calibration, the score map's path and the digest of its content), the tokenizer fingerprint
where the ingress tokenizes for the model, and the pair as the model reads it (instruction, query, document,
`max_tokens_per_doc`, whether long documents are cut or windowed). The cache lives in the ingress replica: a
settings change redeploys the ingress (its arguments are the settings), so a new model or map starts empty; a
pool whose tokenizer changed under the same settings (StaleTokenizer) has its entries forgotten. Pairs with an
image are not cached (their bytes would have to be hashed on every request)."""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from pathlib import Path

from serve_app.catalog import Served
from serve_app.scoring.types import Pair, Score
from serve_app.settings import score_map_path

# What of a model's settings changes its scores (bulk.SCORING_SETTINGS says the same for resumed jobs).
SCORING_FIELDS = {"model", "family", "answer_tokens", "dtype", "quantize", "calibration", "score_map"}


def model_version(served: Served, tokenizer: str | None) -> bytes:
    """A digest of what decides this model's scores, as the ingress knows it."""
    path = Path(served.settings.score_map or score_map_path(served.name))
    score_map = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    settings = served.settings.model_dump(mode="json", include=SCORING_FIELDS)
    described = json.dumps([served.name, settings, score_map, tokenizer], sort_keys=True, default=str)
    return hashlib.blake2b(described.encode(), digest_size=16).digest()


class ScoreCache:
    """Pair key -> Score, at most `entries` of them; counts hits and misses."""

    def __init__(self, entries: int) -> None:
        self.entries = entries
        self.scores: OrderedDict[bytes, Score] = OrderedDict()
        self.versions: dict[str, bytes] = {}  # model name -> its version, computed once
        self.hits = self.misses = 0

    @property
    def on(self) -> bool:
        return self.entries > 0

    def version(self, served: Served, tokenizer: str | None) -> bytes:
        if served.name not in self.versions:
            self.versions[served.name] = model_version(served, tokenizer)
        return self.versions[served.name]

    def forget(self, model: str) -> None:
        """A model whose tokenizer changed under the same name: its version is computed again, so none of its
        entries is found any more (they age out)."""
        self.versions.pop(model, None)

    @staticmethod
    def key(version: bytes, pair: Pair, how: tuple[bool, bool]) -> bytes | None:
        """The pair's key under `how` it is scored (truncate, split_long_documents), or None for a pair with an
        image (not cached)."""
        if pair.needs_image_model:
            return None
        text = json.dumps([pair.query_text(), pair.document.text, pair.max_tokens_per_doc, *how])
        return hashlib.blake2b(text.encode(), digest_size=16, key=version).digest()

    def lookup(
        self,
        pairs: list[Pair],
        by_model: dict[str, list[int]],
        models: dict[str, Served],
        tokenizers: dict[str, str | None],
        how: tuple[bool, bool],
    ) -> tuple[list[bytes | None], list[Score | None]]:
        """A request's pairs (indices per model name): each one's key (None: not cached, or the cache is off)
        and its cached score (None: not held). `tokenizers`: each model's tokenizer fingerprint where the ingress
        tokenizes for it; `how`: (truncate, split_long_documents)."""
        keys: list[bytes | None] = [None] * len(pairs)
        if not self.on:
            return keys, [None] * len(pairs)
        for name, indices in by_model.items():
            version = self.version(models[name], tokenizers.get(name))
            for i in indices:
                keys[i] = self.key(version, pairs[i], how)
        return keys, self.get(keys)

    def get(self, keys: list[bytes | None]) -> list[Score | None]:
        found: list[Score | None] = []
        for key in keys:
            score = self.scores.get(key) if key is not None else None
            if score is not None:
                self.scores.move_to_end(key)
                self.hits += 1
            elif key is not None:
                self.misses += 1
            found.append(score)
        return found

    def put(self, keys: list[bytes | None], scores: list[Score | None]) -> None:
        for key, score in zip(keys, scores):
            if key is None or score is None:
                continue
            self.scores[key] = score
            self.scores.move_to_end(key)
        while len(self.scores) > self.entries:
            self.scores.popitem(last=False)

    def stats(self) -> dict:
        looked = self.hits + self.misses
        return {
            "entries": len(self.scores),
            "max_entries": self.entries,
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": round(self.hits / looked, 4) if looked else None,
        }
