"""Helpers for tests: tiny, offline, random-weight models that load like real ones."""
