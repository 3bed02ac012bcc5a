"""Benchmarks and the soak: measured figures land in docs/ (never timed asserts in tests).

``make bench`` (``python -m bench.run``) runs the real daemon in a netlab lab against its
peers (direct, pasta, socat, a naive asyncio relay) and writes docs/benchmarks.md, keeping
its hand-recorded sections; each other module answers one question (``python -m
bench.NAME``; its figures are recorded in docs/bench-*.md or docs/benchmarks.md). Targets
are interleaved within rounds and ratios taken within a round, since the 2 shared cores are
noisy. ``make soak`` (``bench.soak``) runs traffic, bad input and restarts and checks that
nothing leaks or is lost (docs/reliability.md).
"""
