"""Synthetic underpass data and demo classifiers (clean vs shortcut)."""
