"""Scorers: (query, document) pairs -> raw scores -> calibrated 0..1. No Ray in here."""

from serve_app.scoring.base import (
    Content,
    LoadOptions,
    ModelLoadError,
    Pair,
    PairTooLong,
    Scorer,
    ScorerInfo,
    ScoringError,
    UnsupportedPair,
    load_scorer,
)

__all__ = [
    "Content",
    "LoadOptions",
    "ModelLoadError",
    "Pair",
    "PairTooLong",
    "Scorer",
    "ScorerInfo",
    "ScoringError",
    "UnsupportedPair",
    "load_scorer",
]
