"""Hermetic network topologies for sockmap's tests, benchmarks and demo.

Everything netlab makes lives in network namespaces named ``smk-<pid>-...``: a "host"
namespace (where a daemon would run), guest namespaces, and an "outside" namespace standing
for the internet. The root namespace is never changed. A Lab tears all of it down on exit;
``sweep()`` removes what a dead process (one whose pid is gone) left behind (pytest runs
it at session start, so parallel runs are safe); ready signals are lines read from a
process (``wait_for_line``), never sleeps.

- ``lab``: the topology (see its docstring for the addresses); processes are started with
  ``nsenter --net``, not ``ip netns exec``, whose private mount namespace would hide a
  namespace the command makes (``sockmap guest create`` does).
- ``vm``, ``vmimage``: qemu VMs inside the lab's host namespace (``Lab.add_vm()``, tests
  marked ``vm``) booting Debian's kernel with the host's ``/`` read-only over 9p, so a VM
  runs this checkout's sockmap; the image is built once under ``.cache/vm/``.
- ``otheruser``: an interpreter and a staged copy of sockmap that uid 65534 can run, for
  tests of another user's servers and of the "needs root" errors.
- ``demo``: ``make demo``.
"""

from netlab.lab import PREFIX, Guest, Lab, Netns, sweep, wait_for_line

__all__ = ["PREFIX", "Guest", "Lab", "Netns", "sweep", "wait_for_line"]
