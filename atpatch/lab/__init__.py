"""Reproducible misbehaving models for tests and benchmarks, built from data that packages ship."""
