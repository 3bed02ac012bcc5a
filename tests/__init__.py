"""sockmap's tests, in three tiers, with no kernel mocks.

- ``unit``: table tests of the pure code (the conflicts engine, codec, parsers, BPF
  assembly, plan memo), the import rules of the pure modules, README's address table
  against ``plan()``.
- ``fuzz``: hypothesis on every parser, the codec, the address checks and the rules file:
  any input gives a result or the module's one error type.
- ``netlab``: real namespaces, veths, sockets, processes, nftables and BPF (the verifier is
  part of the test), built by ``netlab`` as ``smk-<pid>-...`` and removed even on failure;
  run as root. ``vm``: a booted qemu VM (marker ``vm``).

The suite assumes nothing of where the checkout is: ``netlab/test_checkout_anywhere.py``
clones HEAD into a 0700 directory with spaces in its path and runs the ``as_other_user``
tests there with a minimal environment. The session hook in ``conftest`` fails the run if
any process of the session still holds a BPF link. Speed is measured in ``bench/``, not
asserted here.
"""
