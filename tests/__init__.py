"""Tests for mtasts_twisted, run with ``python -m twisted.trial tests``."""
