"""The control socket: protocol, permissions, stale sockets, and ``deidfs status`` on a daemon."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import Daemon, sample_file, wait_for
from deidfs.errors import DeidfsError
from deidfs.ops.control import ControlServer
from deidfs.ops.control_client import ControlDenied, ControlUnavailable, call
from deidfs.ops.control_protocol import MAX_LINE_BYTES, ErrorCode, ExportRequest, Reply, Request


def _deidfs(*argv: str, as_nobody: bool = False) -> subprocess.CompletedProcess[str]:
    prefix: list[str] = []
    if as_nobody:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("setpriv (util-linux) is needed to run a client as another user")
        prefix = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    return subprocess.run(
        [*prefix, sys.executable, "-m", "deidfs", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short, world-traversable directory (sun_path is limited to 108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="deidfs-ctl-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d)


@pytest.fixture
def server(sock_dir: Path) -> Iterator[tuple[ControlServer, list[tuple[str, str]]]]:
    seen: list[tuple[str, str]] = []

    def status(req: Request) -> Reply:
        return Reply.success({"echo": dict(req.args), "pid_seen": req.peer.pid if req.peer else 0})

    def broken(req: Request) -> Reply:
        raise RuntimeError("a bug")

    srv = ControlServer(
        sock_dir / "run" / "control.sock",
        {"status": status, "reload": broken},
        on_request=lambda cmd, result: seen.append((cmd, result)),
    )
    srv.start()
    yield srv, seen
    srv.stop()


def _raw(path: Path, *lines: bytes) -> list[dict[str, object]]:
    """Send raw request lines on one connection; return the decoded replies."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(b"".join(lines))
        s.shutdown(socket.SHUT_WR)
        with s.makefile("rb") as f:
            return [json.loads(line) for line in f]


def test_socket_is_0660_in_a_created_directory_and_answers(
    server: tuple[ControlServer, list[tuple[str, str]]], caplog: pytest.LogCaptureFixture
) -> None:
    srv, seen = server
    st = os.stat(srv.path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert srv.path.parent.is_dir()
    with caplog.at_level(logging.DEBUG, logger="deidfs.ops.control"):
        reply = call(srv.path, "status", {"x": 1})
    assert reply.ok
    assert reply.result == {"echo": {"x": 1}, "pid_seen": os.getpid()}
    assert seen == [("status", "ok")]
    # The peer's credentials (SO_PEERCRED) are logged with the command.
    assert f"peer_pid={os.getpid()} peer_uid={os.getuid()}" in caplog.text


def test_protocol_errors_are_answered_and_the_connection_stays_usable(
    server: tuple[ControlServer, list[tuple[str, str]]],
) -> None:
    srv, seen = server
    replies = _raw(
        srv.path,
        b"not json\n",
        b"[1, 2]\n",
        b'{"v": 2, "cmd": "status"}\n',
        b'{"cmd": "status"}\n',
        b'{"v": 1, "cmd": "frobnicate", "args": {}}\n',
        b'{"v": 1, "cmd": "status", "args": "no"}\n',
        b"\n",
        b'{"v": 1, "cmd": "reload", "args": {}}\n',
        b'{"v": 1, "cmd": "status"}\n',
    )
    codes = [r["error"]["code"] if not r["ok"] else "ok" for r in replies]  # type: ignore[index]
    assert codes == [
        "bad_request",
        "bad_request",
        "unsupported_version",
        "unsupported_version",
        "unknown_command",
        "bad_request",
        "internal",  # the handler raised: contained, the server keeps serving
        "ok",
    ]
    assert all(r["v"] == 1 for r in replies)
    # Metric labels stay bounded: an unknown command name is not echoed into a label.
    assert ("unknown", "unknown_command") in seen
    assert all(cmd in ("status", "reload", "export", "unknown") for cmd, _ in seen)


def test_an_overlong_request_is_refused(
    server: tuple[ControlServer, list[tuple[str, str]]],
) -> None:
    srv, _ = server
    (reply,) = _raw(srv.path, b"x" * (MAX_LINE_BYTES + 10) + b"\n")
    assert reply["ok"] is False
    assert reply["error"]["code"] == "bad_request"  # type: ignore[index]


def test_a_stale_socket_is_replaced_and_a_live_one_refused(sock_dir: Path) -> None:
    path = sock_dir / "control.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on: what a killed daemon leaves
    first = ControlServer(path, {"status": lambda r: Reply.success()})
    first.start()
    try:
        assert call(path, "status").ok
        second = ControlServer(path, {})
        with pytest.raises(DeidfsError, match="another daemon"):
            second.start()
        assert call(path, "status").ok  # the running one is untouched
    finally:
        first.stop()
    assert not path.exists()
    path.write_text("not a socket")
    with pytest.raises(DeidfsError, match="not a socket"):
        ControlServer(path, {}).start()
    assert path.read_text() == "not a socket"


def test_client_errors_map_to_exit_codes(sock_dir: Path) -> None:
    with pytest.raises(ControlUnavailable) as unavailable:
        call(sock_dir / "missing.sock", "status")
    assert unavailable.value.exit_code == 69
    assert ControlDenied("x").exit_code == 77
    # A socket file nobody listens on (a killed daemon): not running either.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock_dir / "stale.sock"))
    stale.close()
    with pytest.raises(ControlUnavailable):
        call(sock_dir / "stale.sock", "status")


def test_cli_reports_not_running_and_permission_denied(
    sock_dir: Path, server: tuple[ControlServer, list[tuple[str, str]]]
) -> None:
    done = _deidfs("status", "--socket", str(sock_dir / "none.sock"))
    assert done.returncode == 69, done.stderr
    assert "not running" in done.stderr
    done = _deidfs("reload", "--wait", "--socket", str(sock_dir / "none.sock"))
    assert done.returncode == 69, done.stderr
    srv, _ = server
    done = _deidfs("status", "--socket", str(srv.path), as_nobody=True)
    assert done.returncode == 77, done.stderr
    assert "permission denied" in done.stderr


def test_export_request_arguments_are_validated() -> None:
    req = ExportRequest.from_args(
        {"folder": "ct", "study": "1.2.3", "patient": ["A", "B"], "to": "/x", "workers": 2}
    )
    assert req.study == ("1.2.3",)
    assert req.patient == ("A", "B")
    assert req.to == "/x"
    assert req.workers == 2
    for bad in (
        {},
        {"folder": ""},
        {"folder": "ct", "study": [1]},
        {"folder": "ct", "workers": 0},
        {"folder": "ct", "workers": True},
        {"folder": "ct", "bogus": 1},
        {"folder": "ct", "to": 5},
    ):
        with pytest.raises(ValueError):  # noqa: PT011 (each message differs)
            ExportRequest.from_args(bad)


def test_many_concurrent_clients_are_served(
    server: tuple[ControlServer, list[tuple[str, str]]],
) -> None:
    srv, _ = server
    results: list[bool] = []

    def ask() -> None:
        results.append(call(srv.path, "status").ok)

    threads = [threading.Thread(target=ask) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert results == [True] * 12


# -- against a running daemon --------------------------------------------------------------


@pytest.mark.fuse
def test_status_of_a_running_daemon(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory().start()
    d.add(sample_file("CT_small.dcm"), "ct.dcm")
    d.add(sample_file("MR_small.dcm"), "mr.dcm")
    (d.incoming / "notes.txt").write_text("not DICOM")
    d.wait_views(2)
    sock = d.state / "control.sock"
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660

    def settled() -> dict[str, object] | None:
        reply = call(sock, "status")
        folder = reply.result["folders"][0]
        return reply.result if folder["withheld_total"] == 1 else None

    st = wait_for(settled)
    assert isinstance(st, dict)
    assert st["ready"] is True
    assert st["mount"] == {
        "mountpoint": str(d.mnt),
        "mounted": True,
        "libfuse": st["mount"]["libfuse"],
    }  # type: ignore[index]
    assert st["config"]["sha256"] == d.config().sha256  # type: ignore[index]
    (folder,) = st["folders"]  # type: ignore[misc]
    assert folder["id"] == "samples"
    assert folder["profile"] == "Nominal"
    assert folder["visible"] == 2
    assert folder["withheld"] == {"not_dicom": 1}
    assert folder["watch"]["kind"] in ("inotify", "poll")
    assert folder["watch"]["healthy"] is True
    assert st["last_reload"]["ok"] is True  # type: ignore[index]
    assert st["last_reload"]["trigger"] == "start"  # type: ignore[index]
    # Status names no source: no file name of the watched folder appears in it.
    text = json.dumps(st)
    assert "ct.dcm" not in text
    assert "notes.txt" not in text
    assert str(d.incoming) not in text

    done = _deidfs("status", "--config", str(d.config_path))
    assert done.returncode == 0, done.stderr
    assert "mounted (libfuse 3." in done.stdout
    assert "samples" in done.stdout
    assert "withheld not_dicom 1" in done.stdout
    assert d.config().sha256 in done.stdout
    done = _deidfs("status", "--json", "--config", str(d.config_path))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["folders"][0]["visible"] == 2

    # Export through the daemon, with its key: the bytes the mount serves.
    reply = call(sock, "export", {"folder": "samples"}, timeout=120)
    if reply.error is not None and reply.error.code is ErrorCode.NOT_AVAILABLE:
        pytest.skip("this build has no export")
    assert reply.ok, reply.error
    assert reply.result["files"] == 2
    assert reply.result["failed"] == 0
    out = Path(reply.result["destination"])
    assert out == d.export / "samples"
    for view in d.views():
        assert (out / view.relative_to(d.folder)).read_bytes() == view.read_bytes()
    reply = call(sock, "export", {"folder": "nope"})
    assert reply.error is not None
    assert reply.error.code is ErrorCode.NOT_FOUND
    reply = call(sock, "export", {"folder": "samples", "to": str(d.root / "outside")})
    assert reply.error is not None
    assert "exit_code=77" in reply.error.details  # confined to export_dir
    assert not (d.root / "outside").exists()
    reply = call(sock, "export", {"study": "x"})
    assert reply.error is not None
    assert reply.error.code is ErrorCode.BAD_REQUEST

    assert d.stop() == 0
    assert not sock.exists()
    done = _deidfs("status", "--config", str(d.config_path))
    assert done.returncode == 69


def test_only_root_and_the_config_owner_may_read_source_paths(tmp_path: Path) -> None:
    from deidfs.ops.control import Peer, may_read_sources

    config = tmp_path / "deidfs.toml"
    config.write_text("")
    os.chown(config, 0, 0)
    nobody = Peer(pid=1, uid=65534, gid=65534)
    assert may_read_sources(Peer(pid=1, uid=0, gid=0), config)
    assert not may_read_sources(nobody, config)
    assert not may_read_sources(None, config)
    assert not may_read_sources(nobody, None)
    assert not may_read_sources(nobody, tmp_path / "missing.toml")
    os.chown(config, 65534, 65534)
    assert may_read_sources(nobody, config)
    assert not may_read_sources(Peer(pid=1, uid=1000, gid=1000), config)
