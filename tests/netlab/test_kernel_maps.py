"""The kernel path's loader against the real kernel: every program through the verifier, its
log in the error, the map's bookkeeping (full map, an update refused half-way) and the links
gone on close. The hooks go on a cgroup this test made and that holds no process."""

from __future__ import annotations

from pathlib import Path

import pytest

from sockmap.errors import SockmapError
from sockmap.proxy import bpfasm as a
from sockmap.proxy import bpfprog, bpfsys
from sockmap.proxy.bpfprog import FwdEntry, KernelStats
from sockmap.proxy.kernel import KernelPath
from sockmap.proxy.spec import MappingKey, Proto
from tests.netlab.kernel_fixtures import attached, cgroup

pytestmark = pytest.mark.netlab
__all__ = ["cgroup"]  # the fixture


def entries(port: int, *hosts: str) -> tuple[FwdEntry, ...]:
    guest = {"127.0.0.1": "10.9.0.2", "::1": "fd00:9::2"}
    return tuple(FwdEntry(proto="tcp", host_addr=h, host_port=port, guest_addr=guest[h],
                          guest_port=port + 1, slot=0) for h in hosts)


def key(port: int) -> MappingKey:
    return MappingKey(guest="g", proto=Proto.TCP, port=port)


def test_load_attach_fill_and_close(cgroup: Path) -> None:
    kp = KernelPath.start(cgroup=cgroup, max_entries=3)
    try:
        assert all(len(ids) == 1 for ids in attached(cgroup).values()), attached(cgroup)
        assert kp.fwd is not None
        assert kp.set(key(80), entries(80, "127.0.0.1", "::1")) is None
        raw = kp.fwd.lookup(bpfprog.fwd_key("tcp", "::1", 80))
        assert raw is not None and raw[:16] == bytes.fromhex("fd000009" + "0" * 23 + "2")
        assert raw[16:18] == (81).to_bytes(2, "big")
        assert kp.counts(key(80)) == KernelStats() and kp.entries == 2
        # one free entry, a mapping of two: the first is taken back, the others stay
        why = kp.set(key(90), entries(90, "127.0.0.1", "::1"))
        assert why == "the kernel map is full", why
        assert kp.fwd.lookup(bpfprog.fwd_key("tcp", "127.0.0.1", 90)) is None
        assert kp.fwd.lookup(bpfprog.fwd_key("tcp", "127.0.0.1", 80)) is not None
        assert not kp.has(key(90)) and kp.entries == 2
        assert kp.set(key(90), entries(90, "127.0.0.1")) is None  # one fits
        # a host endpoint another mapping has: refused, nothing of the new one stays
        why = kp.set(key(91), entries(80, "127.0.0.1"))
        assert why is not None and "refused an update" in why, why
        assert not kp.has(key(91)) and kp.fwd.lookup(bpfprog.fwd_key("tcp", "127.0.0.1", 80))
        kp.remove(key(80))
        assert kp.fwd.lookup(bpfprog.fwd_key("tcp", "::1", 80)) is None and kp.entries == 1
        assert kp.set(key(80), entries(80, "::1")) is None  # the slot came back
    finally:
        kp.close()
    assert not any(attached(cgroup).values())


def test_a_reused_slot_starts_from_zero_a_fresh_one_is_not_written(cgroup: Path) -> None:
    kp = KernelPath.start(cgroup=cgroup, max_entries=1)
    try:
        assert kp.stats is not None
        assert kp.set(key(80), entries(80, "127.0.0.1")) is None
        assert kp.counts(key(80)) == KernelStats()  # the map was created zeroed
        busy = bytes([7]) * bpfprog.STATS_VALUE_SIZE  # what the hooks counted meanwhile
        kp.stats.update((0).to_bytes(4, "little"), busy)
        assert kp.counts(key(80)) != KernelStats()
        kp.remove(key(80))
        assert kp.set(key(81), entries(81, "127.0.0.1")) is None  # the one slot, reused
        assert kp.counts(key(81)) == KernelStats()
    finally:
        kp.close()


def test_verifier_log_in_the_error() -> None:
    code = a.assemble([a.mov(a.R0, 1)])  # no exit
    with pytest.raises(SockmapError, match="verifier log") as ei:
        bpfsys.Program(code, hook="connect4", name="smk_bad")
    assert "exit" in str(ei.value)


def test_a_missing_cgroup_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SockmapError, match="cannot open cgroup") as ei:
        KernelPath.start(cgroup=tmp_path / "nope")
    assert ei.value.hint and "--cgroup" in ei.value.hint
