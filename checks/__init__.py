"""Dagster code location for trueup (see pipelines/definitions.py)."""
