"""[[attach]] rules (sockmap.conflicts.attach) and their parsing (sockmap.config), pure:
table tests and hypothesis; nsid.mount_of's reading of mountinfo."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sockmap import config
from sockmap.conflicts import attach as A
from sockmap.errors import SockmapError
from sockmap.nat import nsid
from sockmap.nat.plan import check_name

DOCKER = "/system.slice/docker-3f2a9c1b.scope"
PODMAN = "/machine.slice/libpod-77aa.scope/container"


def cand(process: str = "nginx", cgroup: str = DOCKER, pid: int = 42) -> A.Candidate:
    return A.Candidate(pid=pid, process=process, cgroup=cgroup)


@pytest.mark.parametrize(("rule", "c", "want"), [
    (A.AttachRule(cgroup="/system.slice/docker-*.scope"), cand(), True),
    (A.AttachRule(cgroup="/system.slice/docker-*.scope"), cand(cgroup=PODMAN), False),
    (A.AttachRule(cgroup="/machine.slice/libpod-*"), cand(cgroup=PODMAN), True),
    (A.AttachRule(cgroup="/machine.slice/libpod-*"), cand(cgroup=""), False),  # unknown
    (A.AttachRule(process="ngin?"), cand(), True),
    (A.AttachRule(process="ngin?"), cand(process="nginx-worker"), False),
    (A.AttachRule(cgroup="/system.slice/docker-*", process="redis*"), cand(), False),
    (A.AttachRule(cgroup="/system.slice/docker-*", process="ng*"), cand(), True),
    (A.AttachRule(), cand(), False),  # never a catch-all
    (A.AttachRule(process="NGINX"), cand(), False),  # case matters
])
def test_matches(rule: A.AttachRule, c: A.Candidate, want: bool) -> None:
    assert A.matches(rule, c) is want


def test_first_match_wins() -> None:
    a, b = A.AttachRule(process="x*", origin="f:1"), A.AttachRule(process="*", origin="f:4")
    assert A.first_match([a, b], cand(process="xy")) is a
    assert A.first_match([a, b], cand(process="nginx")) is b
    assert A.first_match([a], cand(process="nginx")) is None


@pytest.mark.parametrize(("text", "want"), [
    ("0::/system.slice/docker-1.scope\n", "/system.slice/docker-1.scope"),
    ("12:pids:/x\n1:name=systemd:/y\n0::/z\n", "/z"),
    ("12:pids:/x\n", ""),
    ("", ""),
])
def test_cgroup_path(text: str, want: str) -> None:
    assert A.cgroup_path(text) == want


@pytest.mark.parametrize(("template", "c", "want"), [
    ("{cgroup_basename}", cand(), "docker-3f2a9c1b.scope"),
    ("{process}-{pid}", cand(), "nginx-42"),
    ("{cgroup_basename}", cand(cgroup=PODMAN), "container"),
    ("{process}", cand(process="my app/1"), "my-app-1"),
    ("{process}", cand(process="..x"), "x"),
    ("{cgroup_basename}", cand(cgroup=""), "found-42"),
    ("c-{cgroup_basename}", cand(cgroup="/" + "a" * 100), "c-" + "a" * 61),
])
def test_render(template: str, c: A.Candidate, want: str) -> None:
    assert A.render(template, c) == want


@given(template=st.sampled_from(["{cgroup_basename}", "{process}-{pid}", "x{process}", "{pid}"]),
       process=st.text(max_size=80), cgroup=st.text(max_size=200),
       pid=st.integers(1, 1 << 22))
def test_render_is_always_a_valid_name(template: str, process: str, cgroup: str,
                                       pid: int) -> None:
    name = A.render(template, A.Candidate(pid=pid, process=process, cgroup=cgroup))
    assert check_name(name) == name
    assert check_name(A.numbered(name, 17)).endswith("-17")


@pytest.mark.parametrize(("template", "problem"), [
    ("{cgroup_basename}", None), ("{process}-{pid}", None), ("web", None),
    ("{foo}", "unknown field {foo}"), ("{pid!r}", "takes no format"), ("{pid:5}", "no format"),
    ("{", "not a template"), ("  ", "empty name"),
])
def test_template_problem(template: str, problem: str | None) -> None:
    got = A.template_problem(template)
    assert (got is None) if problem is None else (got is not None and problem in got)


@given(st.text(max_size=40))
def test_template_problem_never_raises(template: str) -> None:
    if A.template_problem(template) is None:
        A.render(template, cand())  # what passes the check renders


def test_refuse_own_names_the_rule() -> None:
    me = A.Candidate(pid=1, process="python3", cgroup="/")
    A.refuse_own([A.AttachRule(cgroup="/system.slice/docker-*.scope")], me)
    with pytest.raises(SockmapError, match=r"f\.toml:7: \[\[attach\]\] matches the sockmap "
                                           r"daemon itself"):
        A.refuse_own([A.AttachRule(cgroup="/*", origin="f.toml:7")], me)


def test_config_parses_attach() -> None:
    fc = config.parse('[[rule]]\nport = 80\n\n[[attach]]\ncgroup = "/system.slice/docker-*'
                      '.scope"\nname = "{cgroup_basename}"\n\n[[attach]]\nprocess = "redis*"\n',
                      "f.toml")
    assert fc.attach == (
        A.AttachRule(cgroup="/system.slice/docker-*.scope", name="{cgroup_basename}",
                     origin="f.toml:4"),
        A.AttachRule(process="redis*", origin="f.toml:8"))
    assert config.parse("").attach == ()


@pytest.mark.parametrize(("text", "where"), [
    ('[[attach]]\nname = "x"\n', "f.toml:1: [[attach]] #1: matches every process"),
    ('[[attach]]\nprocess = "a"\nname = "{x}"\n', "f.toml:3: [[attach]] #1 key 'name'"),
    ('[[attach]]\ncgroup = "docker"\n', "f.toml:2: [[attach]] #1 key 'cgroup'"),
    ('[[attach]]\nprocess = 3\n', "f.toml:2: [[attach]] #1 key 'process': must be a string"),
    ('[[attach]]\nprocess = "a"\n[[attach]]\nproces = "b"\n',
     "f.toml:4: [[attach]] #2 key 'proces': unknown key"),
    ('attach = 1\n', "f.toml:1: top level key 'attach': must be an array of tables"),
])
def test_config_attach_errors(text: str, where: str) -> None:
    with pytest.raises(SockmapError) as e:
        config.parse(text, "f.toml")
    assert str(e.value).startswith(where), str(e.value)
    assert e.value.hint


MOUNTINFO = """\
24 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
601 25 0:4 net:[4026532999] /run/netns/other rw shared:5 - nsfs nsfs rw
602 25 0:4 net:[4026533001] /run/netns/my\\040box rw shared:5 - nsfs nsfs rw
603 25 0:4 mnt:[4026533001] /run/x rw - nsfs nsfs rw
"""


def test_mount_of_reads_nsfs_mounts() -> None:
    ns = nsid.NsId(dev=4, ino=4026533001)
    assert nsid.mount_of(ns, MOUNTINFO) == "/run/netns/my box"
    assert nsid.mount_of(nsid.NsId(dev=4, ino=1), MOUNTINFO) is None
