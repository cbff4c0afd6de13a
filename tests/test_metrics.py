"""Prometheus metrics: own registry per instance, names and labels, the HTTP endpoint."""

from __future__ import annotations

import errno
import re
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from conftest import Daemon, sample_file, wait_for
from deidfs.errors import DeidfsError
from deidfs.ops.http import MetricsServer, split_address
from deidfs.ops.metrics import FolderState, Metrics, StateSnapshot, errno_name

#: Label names allowed anywhere in the exposition (bounded identifiers only).
ALLOWED_LABELS = {
    "folder",
    "profile",
    "layout",
    "reason",
    "op",
    "errno",
    "result",
    "change",
    "event",
    "outcome",
    "command",
    "level",
    "version",
    "le",
    # python_info / python_gc_* of the standard collectors
    "implementation",
    "major",
    "minor",
    "patchlevel",
    "generation",
}
_UID_LIKE = re.compile(r"^\d+(\.\d+){3,}$")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 (http on loopback)
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def _check_names_and_labels(text: str) -> None:
    """Every series is ours or a standard collector's; no label could carry PHI."""
    for family in text_string_to_metric_families(text):
        assert family.name.startswith(("deidfs_", "process_", "python_")), family.name
        assert family.documentation, family.name
        for s in family.samples:
            assert set(s.labels) <= ALLOWED_LABELS, (s.name, s.labels)
            for value in s.labels.values():
                assert "/" not in value, (s.name, value)
                assert not _UID_LIKE.match(value), (s.name, value)
                assert len(value) <= 64, (s.name, value)
    assert "_created" not in text  # turned off: they double the series for nothing


def _promtool() -> str | None:
    beside = Path(sys.executable).parent / "promtool"
    return str(beside) if beside.exists() else shutil.which("promtool")


# -- unit ----------------------------------------------------------------------------------


def test_each_instance_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()
    a.observe_render("ct", 0.02)
    a.file_refused("ct", "not_dicom")
    a.fuse_op("read")
    a.fuse_read(4096)
    a.fuse_error("open", 5)
    assert a.registry.get_sample_value("deidfs_renders_total", {"folder": "ct"}) == 1
    assert b.registry.get_sample_value("deidfs_renders_total", {"folder": "ct"}) is None
    assert (
        a.registry.get_sample_value(
            "deidfs_files_refused_total", {"folder": "ct", "reason": "not_dicom"}
        )
        == 1
    )
    assert a.registry.get_sample_value("deidfs_fuse_read_bytes_total") == 4096
    assert (
        a.registry.get_sample_value(
            "deidfs_fuse_operation_errors_total", {"op": "open", "errno": "EIO"}
        )
        == 1
    )
    assert (
        a.registry.get_sample_value(
            "deidfs_render_duration_seconds_bucket", {"folder": "ct", "le": "0.025"}
        )
        == 1
    )
    assert a.registry.get_sample_value("deidfs_build_info", {"version": "0.1.0"}) == 1


def test_export_counters_for_the_export_code() -> None:
    m = Metrics(process_collectors=False)
    m.export_file("ct", "written", 1000)
    m.export_file("ct", "unchanged", 1000)
    m.export_failure("ct", "source_changed")
    m.export_finished("ct", 2.0, ok=False, when=100.0)
    m.export_finished("ct", 1.0, ok=True, when=200.0)
    r = m.registry
    assert (
        r.get_sample_value("deidfs_export_files_total", {"folder": "ct", "outcome": "written"}) == 1
    )
    assert r.get_sample_value("deidfs_export_written_bytes_total", {"folder": "ct"}) == 1000
    assert (
        r.get_sample_value(
            "deidfs_export_failures_total", {"folder": "ct", "reason": "source_changed"}
        )
        == 1
    )
    assert r.get_sample_value("deidfs_export_duration_seconds_count") == 2
    assert r.get_sample_value("deidfs_last_export_success_timestamp_seconds") == 200.0


def test_a_removed_folder_leaves_the_output() -> None:
    m = Metrics(process_collectors=False)
    m.folder_added("ct")
    m.folder_added("mr")
    m.observe_render("ct", 0.1)
    m.export_file("ct", "written", 10)
    m.forget_folder("ct")
    text = generate_latest(m.registry).decode()
    assert 'folder="ct"' not in text
    assert 'deidfs_watch_changes_total{change="ready",folder="mr"} 0.0' in text


def test_state_is_read_at_scrape_time() -> None:
    m = Metrics(process_collectors=False)
    state = StateSnapshot(
        mounted=True,
        backlog=3,
        open_files=1,
        stale_opens=0,
        cache_hits=7,
        cache_misses=2,
        cache_bytes=1024,
        cache_entries=2,
        folders=(
            FolderState(
                folder="ct",
                profile="+Pixel",
                layout="dicom",
                visible=5,
                duplicates=1,
                view_bytes=5000,
                withheld=(("not_dicom", 2),),
                watch_polling=False,
                watch_healthy=True,
                settling=0,
                directories=4,
                missed=0,
                events=(("created", 9),),
                overflows=2,
            ),
        ),
        pydicom_warnings=(("invalid_value", 4), ("vr_encoding_mismatch", 1)),
        refused_opens=6,
    )
    assert m.registry.get_sample_value("deidfs_fuse_mounted") is None
    m.set_state_source(lambda: state)
    text = generate_latest(m.registry).decode()
    _check_names_and_labels(text)
    s = _samples(text)
    assert _value(s, "deidfs_fuse_mounted") == 1
    assert _value(s, "deidfs_index_backlog") == 3
    assert _value(s, "deidfs_header_cache_hits_total") == 7
    assert _value(s, "deidfs_files_visible", folder="ct") == 5
    assert _value(s, "deidfs_files_withheld", folder="ct", reason="not_dicom") == 2
    assert _value(s, "deidfs_folder_info", folder="ct", layout="dicom", profile="+Pixel") == 1
    assert _value(s, "deidfs_watch_events_total", folder="ct", event="created") == 9
    assert _value(s, "deidfs_watch_overflows_total", folder="ct") == 2
    assert _value(s, "deidfs_pydicom_warnings_total", reason="invalid_value") == 4
    assert _value(s, "deidfs_pydicom_warnings_total", reason="vr_encoding_mismatch") == 1
    assert _value(s, "deidfs_fuse_refused_opens_total") == 6
    m.set_state_source(None)
    assert "deidfs_files_visible" not in generate_latest(m.registry).decode()


def _every_series() -> str:
    """The exposition of a registry in which every metric of deidfs has a series."""
    m = Metrics(process_collectors=False)
    m.config_loaded(True, 100.0)
    m.folder_added("ct")
    m.observe_render("ct", 0.1)
    m.file_refused("ct", "truncated")
    m.watch_change("ct", "ready")
    m.fuse_op("read")
    m.fuse_error("open", None)
    m.fuse_read(10)
    m.export_file("ct", "written", 10)
    m.export_failure("ct", "io_error")
    m.file_sent("pacs", "stored")
    m.export_finished("ct", 1.0, ok=True, when=100.0)
    m.control_request("status", "ok")
    folder = FolderState(
        folder="ct",
        profile="basic",
        layout="dicom",
        visible=1,
        duplicates=0,
        view_bytes=10,
        withheld=(("truncated", 1),),
        watch_polling=False,
        watch_healthy=True,
        settling=0,
        directories=1,
        missed=0,
        events=(("created", 1),),
        overflows=0,
    )
    state = StateSnapshot(
        mounted=True,
        backlog=0,
        open_files=0,
        stale_opens=0,
        cache_hits=0,
        cache_misses=0,
        cache_bytes=0,
        cache_entries=0,
        folders=(folder,),
        pydicom_warnings=(("invalid_value", 1),),
    )
    m.set_state_source(lambda: state)
    return generate_latest(m.registry).decode()


def test_readme_lists_every_metric_label() -> None:
    """The README's metrics paragraph names each label deidfs's own series carry."""
    text = _every_series()
    labels = {
        name
        for family in text_string_to_metric_families(text)
        if family.name.startswith("deidfs_")
        for s in family.samples
        for name in s.labels
    } - {"le"}
    assert {"folder", "reason", "op", "errno"} <= labels
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    (paragraph,) = [p for p in readme.split("\n\n") if "127.0.0.1:9464/metrics" in p]
    named = set(re.findall(r"`([a-z_]+)`", paragraph))
    assert labels <= named, sorted(labels - named)
    # The errno label is an errno name (the README's examples), never a number or a path.
    assert 'deidfs_fuse_operation_errors_total{errno="EUNKNOWN",op="open"} 1.0' in text
    for example in ("ENOENT", "EIO", "EUNKNOWN"):
        assert f"`{example}`" in paragraph
    assert (errno_name(errno.ENOENT), errno_name(errno.EIO)) == ("ENOENT", "EIO")


def test_metric_names_pass_promtool() -> None:
    promtool = _promtool()
    if promtool is None:
        pytest.skip("promtool not installed (scripts/setup extracts it from Debian's package)")
    m = Metrics()
    m.folder_added("ct")
    m.observe_render("ct", 0.01)
    m.file_refused("ct", "truncated")
    m.export_file("ct", "written", 1)
    m.export_failure("ct", "io_error")
    m.file_sent("pacs", "failed")
    m.fuse_error("getattr", 2)
    m.control_request("status", "ok")
    m.config_loaded(True, 1.0)
    m.set_state_source(
        lambda: StateSnapshot(
            True, 0, 0, 0, 0, 0, 0, 0, folders=(), pydicom_warnings=(("invalid_value", 1),)
        )
    )
    done = subprocess.run(
        [promtool, "check", "metrics"],
        input=generate_latest(m.registry),
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, (done.stdout + done.stderr).decode()


def test_http_endpoint_routes_and_readiness() -> None:
    m = Metrics(process_collectors=False)
    ready = [False]
    server = MetricsServer(f"127.0.0.1:{_free_port()}", m.registry, lambda: ready[0])
    server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        status, body = _get(base + "/metrics")
        assert status == 200
        assert "deidfs_build_info" in body
        assert _get(base + "/-/healthy")[0] == 200
        assert _get(base + "/-/ready")[0] == 503
        ready[0] = True
        assert _get(base + "/-/ready")[0] == 200
        assert _get(base + "/")[0] == 200
        assert _get(base + "/nope")[0] == 404
        # A second server on the same address fails at start, not later.
        clash = MetricsServer(f"127.0.0.1:{server.port}", m.registry, lambda: True)
        with pytest.raises(DeidfsError, match="cannot serve metrics"):
            clash.start()
    finally:
        server.stop()
    assert not server.alive


def test_address_parsing() -> None:
    assert split_address("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert split_address("[::1]:9464") == ("::1", 9464)
    with pytest.raises(ValueError, match="host:port"):
        split_address("9464")


# -- a running daemon, scraped over HTTP ---------------------------------------------------


@pytest.fixture
def scraped(daemon_factory: Callable[..., Daemon]) -> tuple[Daemon, str]:
    """A daemon with metrics on a free loopback port; yields it and the metrics URL base."""
    d = daemon_factory()
    port = _free_port()
    text = d.config_path.read_text()
    d.config_path.write_text(
        text.replace('metrics_address = ""', f'metrics_address = "127.0.0.1:{port}"')
    )
    d.start()
    return d, f"http://127.0.0.1:{port}"


@pytest.mark.fuse
def test_scrape_of_a_running_daemon(scraped: tuple[Daemon, str]) -> None:
    d, base = scraped
    d.add(sample_file("CT_small.dcm"), "a/ct.dcm")
    d.add(sample_file("MR_small.dcm"), "b/mr.dcm")
    (d.incoming / "notes.txt").write_text("not DICOM")
    views = d.wait_views(2)
    size = sum(len(v.read_bytes()) for v in views)

    def scrape() -> str:
        status, body = _get(base + "/metrics")
        assert status == 200
        return body

    def withheld() -> str | None:
        body = scrape()
        return (
            body
            if 'deidfs_files_withheld{folder="samples",reason="not_dicom"} 1.0' in body
            else None
        )

    text = wait_for(withheld)
    assert isinstance(text, str)
    _check_names_and_labels(text)
    s = _samples(text)
    assert _value(s, "deidfs_fuse_mounted") == 1
    assert _value(s, "deidfs_files_visible", folder="samples") == 2
    assert _value(s, "deidfs_renders_total", folder="samples") >= 3
    assert _value(s, "deidfs_render_duration_seconds_count", folder="samples") >= 3
    assert _value(s, "deidfs_files_refused_total", folder="samples", reason="not_dicom") == 1
    assert _value(s, "deidfs_fuse_operations_total", op="read") >= 2
    assert _value(s, "deidfs_fuse_operations_total", op="open") >= 2
    assert _value(s, "deidfs_fuse_read_bytes_total") >= size
    assert _value(s, "deidfs_watch_changes_total", folder="samples", change="ready") >= 3
    assert _value(s, "deidfs_folder_watch_healthy", folder="samples") == 1
    assert _value(s, "deidfs_index_backlog") == 0
    assert _value(s, "deidfs_config_last_reload_successful") == 1
    assert _value(s, "deidfs_config_last_reload_success_timestamp_seconds") > 1e9
    assert (
        _value(s, "deidfs_header_cache_hits_total") + _value(s, "deidfs_header_cache_misses_total")
        >= 2
    )
    assert ("process_resident_memory_bytes", ()) in s
    # Nothing of the sources leaks into the exposition.
    for name in ("ct.dcm", "mr.dcm", "notes.txt", str(d.incoming)):
        assert name not in text
    # A lookup of a name that is not there is an error by op and errno.
    assert not (d.folder / "no-such-view.dcm").exists()
    s = _samples(scrape())
    assert _value(s, "deidfs_fuse_operation_errors_total", op="getattr", errno="ENOENT") >= 1
    assert _get(base + "/-/healthy")[0] == 200
    assert _get(base + "/-/ready")[0] == 200

    # A rejected reload shows as 0 and counts as a failure; fixing it brings 1 back.
    good = d.config_path.read_text()
    d.config_path.write_text(good + "\n[daemon2]\n")
    done = subprocess.run(
        [sys.executable, "-m", "deidfs", "reload", "--wait", "--config", str(d.config_path)],
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 78
    s = _samples(scrape())
    assert _value(s, "deidfs_config_last_reload_successful") == 0
    assert _value(s, "deidfs_config_reloads_total", result="failure") >= 1
    assert _value(s, "deidfs_fuse_mounted") == 1
    d.config_path.write_text(good)

    def accepted() -> bool:
        return _value(_samples(scrape()), "deidfs_config_last_reload_successful") == 1

    wait_for(accepted)  # picked up by the file watch
    s = _samples(scrape())
    assert _value(s, "deidfs_config_reloads_total", result="success") >= 1
    assert (
        _value(s, "deidfs_control_requests_total", command="reload", result="config_invalid") == 1
    )

    promtool = _promtool()
    if promtool is not None:
        done = subprocess.run(
            [promtool, "check", "metrics"],
            input=scrape().encode(),
            capture_output=True,
            check=False,
            timeout=60,
        )
        assert done.returncode == 0, (done.stdout + done.stderr).decode()
