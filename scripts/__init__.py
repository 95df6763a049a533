"""Benchmark and check scripts, run from the repository root as ``python -m scripts.<name>`` (see BENCHMARKS.md).

A package so the scripts import each other as ``scripts.*`` and import-linter checks them as the top layer.
"""
