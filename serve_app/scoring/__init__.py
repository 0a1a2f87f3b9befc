"""Scorers: (query, document) pairs -> raw scores -> calibrated 0..1. No Ray in here.

Importing the package loads no torch: the plain types live in `types`; `loading.load_scorer` loads a model.
"""
