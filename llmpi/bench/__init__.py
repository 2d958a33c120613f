"""Benchmarks: `python -m llmpi.bench NAME [--json] [...]`.

Every benchmark module exposes `main(argv)`; with `--json` its last printed line is
one JSON object with the headline figures (`ratio` = llmpi speed / reference speed).
"""
