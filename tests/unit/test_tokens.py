"""`sockmap token create`: the file (mode, dir mode, contents), the refusals, the printed
command; through the module and through the real CLI; and the VM agent's systemd unit."""

from __future__ import annotations

import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from sockmap.agent.link import read_token
from sockmap.cli import main as cli
from sockmap.cli import tokens
from sockmap.errors import SockmapError

ROOT = Path(__file__).resolve().parents[2]


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_create_writes_a_private_random_token(tmp_path: Path) -> None:
    run = tmp_path / "run"
    c = tokens.create(run, "vm1")
    assert c.path == run / "tokens" / "vm1.token" and not c.replaced
    assert _mode(c.path) == 0o600 and _mode(run / "tokens") == 0o700
    assert c.path.read_text() == c.token + "\n" and len(c.token) == 64
    assert read_token(c.path) == c.token  # what the agent reads is what was written
    assert [p.name for p in (run / "tokens").iterdir()] == ["vm1.token"]  # no temp left
    assert tokens.create(run, "vm2").token != c.token


def test_create_tightens_an_existing_loose_tokens_dir(tmp_path: Path) -> None:
    (tmp_path / "tokens").mkdir(mode=0o755)
    (tmp_path / "tokens").chmod(0o755)
    tokens.create(tmp_path, "vm1")
    assert _mode(tmp_path / "tokens") == 0o700


def test_existing_token_needs_force(tmp_path: Path) -> None:
    old = tokens.create(tmp_path, "vm1")
    with pytest.raises(SockmapError, match=r"has a token already.*--force"):
        tokens.create(tmp_path, "vm1")
    assert old.path.read_text().strip() == old.token  # untouched
    new = tokens.create(tmp_path, "vm1", force=True)
    assert new.replaced and new.token != old.token and _mode(new.path) == 0o600


@pytest.mark.parametrize("force", [False, True])
def test_a_netns_guests_name_is_refused(tmp_path: Path, force: bool) -> None:
    (tmp_path / "guests").mkdir()
    (tmp_path / "guests" / "dev1.json").write_text("{}")
    with pytest.raises(SockmapError, match="netns guest"):
        tokens.create(tmp_path, "dev1", force=force)
    assert not (tmp_path / "tokens" / "dev1.token").exists()


@pytest.mark.parametrize("name", ["", "-x", "a/b", "../etc", "x" * 64, "vm 1"])
def test_bad_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(SockmapError, match="not valid"):
        tokens.create(tmp_path, name)
    assert not (tmp_path / "tokens").exists()


def test_unwritable_run_dir_says_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(SockmapError, match=r"cannot write.*--run-dir"):
        tokens.create(tmp_path / "f" / "run", "vm1")


@pytest.mark.parametrize(
    ("connect", "want"),
    [
        ("192.168.122.1:7070", "tcp:192.168.122.1:7070"),
        ("tcp:10.0.0.1:7070", "tcp:10.0.0.1:7070"),
        ("[fd00::1]:7070", "tcp:[fd00::1]:7070"),
        ("vsock:2:7070", "vsock:2:7070"),
        (None, "tcp:HOST_ADDR_ON_THE_VM_BRIDGE:7070"),
    ],
)
def test_agent_command_parses_as_the_agent_cli(connect: str | None, want: str) -> None:
    argv = shlex.split(tokens.agent_command("vm1", connect))
    assert argv[:2] == ["sockmap", "agent"]
    args = cli.build_parser().parse_args(argv[1:])
    assert (args.connect, args.name, str(args.token_file)) == (
        want, "vm1", "/etc/sockmap/vm1.token")


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sockmap.cli", *argv], capture_output=True,
                          text=True, timeout=60)


def test_cli_token_create(tmp_path: Path) -> None:
    r = _cli("token", "create", "vm1", "--run-dir", str(tmp_path), "--connect", "10.9.0.1:7070")
    assert r.returncode == 0, r.stderr
    path = tmp_path / "tokens" / "vm1.token"
    assert f"wrote {path} (mode 0600)" in r.stdout
    cmd = [ln.strip() for ln in r.stdout.splitlines() if ln.strip().startswith("sockmap agent")]
    assert cmd == ["sockmap agent --connect tcp:10.9.0.1:7070 --name vm1 "
                   "--token-file /etc/sockmap/vm1.token"]
    token = path.read_text()
    again = _cli("token", "create", "vm1", "--run-dir", str(tmp_path))
    assert again.returncode == 2 and again.stdout == ""
    assert again.stderr.startswith("sockmap: error: vm1 has a token already") and "--force" in \
        again.stderr
    assert path.read_text() == token
    forced = _cli("token", "create", "vm1", "--run-dir", str(tmp_path), "--force")
    assert forced.returncode == 0 and f"replaced {path}" in forced.stdout
    assert path.read_text() != token


def test_agent_unit_verifies(tmp_path: Path) -> None:
    unit = (ROOT / "packaging" / "sockmap-agent.service").read_text()
    lines = [ln for ln in unit.splitlines() if "=" in ln and not ln.startswith("#")]
    kv = dict(ln.split("=", 1) for ln in lines)
    assert kv["Type"] == "simple" and kv["Restart"] == "always"
    exec_argv = shlex.split(kv["ExecStart"])
    args = cli.build_parser().parse_args(exec_argv[1:])  # the unit's command is a valid one
    assert args.connect.startswith("tcp:") and args.token_file == Path("/etc/sockmap/vm1.token")
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed; the key check above ran")
    exe = shutil.which("sockmap") or str(Path(sys.executable).parent / "sockmap")
    local = tmp_path / "sockmap-agent.service"
    local.write_text(unit.replace("/usr/local/bin/sockmap", exe))
    r = subprocess.run([tool, "verify", str(local)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
