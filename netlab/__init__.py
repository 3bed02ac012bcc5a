"""Hermetic network topologies for sockmap's tests, benchmarks and demo.

Everything netlab makes lives in network namespaces named ``smk-<pid>-...``: a "host"
namespace (where a daemon would run), guest namespaces, and an "outside" namespace standing
for the internet. The root namespace is never changed. A Lab tears all of it down on exit;
``sweep()`` removes what a dead process (one whose pid is gone) left behind.
"""

from netlab.lab import PREFIX, Guest, Lab, Netns, sweep, wait_for_line

__all__ = ["PREFIX", "Guest", "Lab", "Netns", "sweep", "wait_for_line"]
