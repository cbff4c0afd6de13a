"""The configuration layer: schema, errors with file:line: key, inheritance, check-config."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import sample_file
from deidfs.cli.common import load_profiles
from deidfs.cli.main import main
from deidfs.config.load import load_config, parse_config
from deidfs.config.model import (
    CONFIG_ENV,
    Config,
    ConfigInvalid,
    ConfigUnreadable,
    DaemonConfig,
    FolderConfig,
    WatchMode,
)
from deidfs.deid.plan import compile_plan
from deidfs.deid.profiles import BUILTIN_PROFILES, DateModification, Rect
from deidfs.deid.standard import Action, Option
from deidfs.deid.tags import parse_tag
from deidfs.errors import ConfigError
from deidfs.view.render import Layout

REFERENCE = Path(__file__).resolve().parents[1] / "etc" / "deidfs.toml"

NOMINAL = """\
[profiles.Nominal]
base = "Basic"
"""


def write(tmp_path: Path, text: str, name: str = "deidfs.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def line_of(text: str, snippet: str) -> int:
    """1-based number of the only line of ``text`` containing ``snippet``."""
    hits = [n for n, line in enumerate(textwrap.dedent(text).splitlines(), 1) if snippet in line]
    assert len(hits) == 1, f"{snippet!r} is not on exactly one line"
    return hits[0]


def only_error(path: Path) -> ConfigError:
    with pytest.raises(ConfigInvalid) as info:
        load_config(path)
    assert len(info.value.errors) == 1, str(info.value)
    return info.value.errors[0]


# --------------------------------------------------------------------------------------------
# The reference configuration


def test_reference_config_loads_with_documented_defaults() -> None:
    config = load_config(REFERENCE)
    assert config.daemon == DaemonConfig()
    assert config.daemon.mountpoint == Path("/srv/deidfs")
    assert config.daemon.state_dir == Path("/var/lib/deidfs")
    assert config.daemon.export_dir == Path("/var/lib/deidfs/export")
    assert config.daemon.control_socket == Path("/run/deidfs/control.sock")
    assert config.daemon.metrics_address == "127.0.0.1:9464"
    assert config.folders == {}
    assert list(config.profiles) == ["Basic", "HIPAA", "+Pixel", "Nominal"]
    nominal = config.profiles["Nominal"]
    assert nominal.base == "Basic"
    assert nominal.comment
    assert nominal.enabled
    assert not nominal.builtin
    assert nominal.options == frozenset()
    assert config.source == REFERENCE
    assert config.sha256 == hashlib.sha256(REFERENCE.read_bytes()).hexdigest()
    # Nominal is the Basic Profile under another name: the same decisions for every tag.
    assert compile_plan(nominal).exact == compile_plan(BUILTIN_PROFILES["Basic"]).exact


def test_reference_config_comments_stand_below_table_headers() -> None:
    # tomlkit attaches comments above a header to the previous table (tomlkit#295), so the
    # reference keeps every comment under its header: no comment block just before one.
    lines = REFERENCE.read_text().splitlines()
    for n, line in enumerate(lines):
        if line.startswith("["):
            assert n == 0 or not lines[n - 1].startswith("#"), f"comment above line {n + 1}"


def uncomment_examples(text: str) -> str:
    """Turn each commented-out example table (``# [...]`` up to a lone ``#``) into TOML."""
    out: list[str] = []
    inside = False
    for line in text.splitlines():
        if line.startswith("# ["):
            inside = True
        elif line.strip() == "#":
            inside = False
        out.append(line[2:] if inside else line)
    return "\n".join(out) + "\n"


def test_reference_config_examples_are_valid(tmp_path: Path) -> None:
    text = uncomment_examples(REFERENCE.read_text())
    assert "\n[profiles.Research]\n" in text
    assert "\n[folders.ct_incoming]\n" in text
    assert "\n[destinations.research_pacs]\n" in text
    config = parse_config(text, tmp_path / "deidfs.toml")
    pacs = config.destinations["research_pacs"]
    assert (pacs.ae_title, pacs.called_ae, pacs.host, pacs.port) == (
        "DEIDFS",
        "RESEARCH",
        "pacs.example.org",
        11112,
    )
    assert config.folders["ct_incoming"] == FolderConfig(
        id="ct_incoming",
        path=Path("/srv/dicom/incoming/ct"),
        profile="Nominal",
        layout=Layout.DICOM,
        watch=WatchMode.AUTO,
    )
    research = config.profiles["Research"]
    hipaa = BUILTIN_PROFILES["HIPAA"]
    assert research.base == "HIPAA"
    assert research.options == (hipaa.options | {Option.CLEAN_DESCRIPTORS}) - {
        Option.RETAIN_PATIENT_CHARACTERISTICS
    }
    assert research.date_modification is DateModification.SHIFT
    assert research.max_age == 89
    assert research.apply_masks
    assert research.disabled == {parse_tag("SeriesDescription"), 0x00081030}
    assert [(r.tag, r.act, r.note) for r in research.rules] == [
        (0x00080080, Action.REMOVE, "institution is not needed"),
        (parse_tag("StationName"), Action.DUMMY, ""),
    ]
    (mask,) = research.masks
    assert (mask.modality, mask.manufacturer, mask.model) == ("US", "ACME", "Sono 3000")
    assert (mask.rows, mask.columns, mask.enabled) == (600, 800, True)
    assert mask.rects == (Rect(0, 0, 800, 60), Rect(0, 540, 200, 60))


# --------------------------------------------------------------------------------------------
# Valid configurations


def test_full_config_values_and_relative_paths(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        [daemon]
        mountpoint = "mnt"
        state_dir = "state"
        export_dir = "../elsewhere/export"
        control_socket = "/run/x/control.sock"
        metrics_address = ""
        allow_other = true
        settle_seconds = 0
        reconcile_seconds = 0.5
        poll_seconds = 30
        cache_mib = 64
        workers = 8

        [profiles.Nominal]
        base = "Basic"

        [folders.ct]
        path = "incoming/ct"

        [folders."mr-2.old"]
        path = "/data/mr"
        profile = "HIPAA"
        layout = "mirror"
        watch = "poll"
        """,
    )
    config = load_config(path)
    assert config.daemon == DaemonConfig(
        mountpoint=tmp_path / "mnt",
        export_dir=tmp_path.parent / "elsewhere" / "export",
        state_dir=tmp_path / "state",
        metrics_address="",
        control_socket=Path("/run/x/control.sock"),
        allow_other=True,
        settle_seconds=0.0,
        reconcile_seconds=0.5,
        poll_seconds=30.0,
        cache_mib=64,
        workers=8,
    )
    assert config.folders == {
        "ct": FolderConfig(id="ct", path=tmp_path / "incoming" / "ct"),
        "mr-2.old": FolderConfig(
            id="mr-2.old",
            path=Path("/data/mr"),
            profile="HIPAA",
            layout=Layout.MIRROR,
            watch=WatchMode.POLL,
        ),
    }


def test_empty_config_is_all_defaults() -> None:
    config = parse_config("")
    assert config.daemon == DaemonConfig()
    assert config.folders == {}
    assert dict(config.profiles) == BUILTIN_PROFILES
    assert config.source is None
    assert config.sha256 == hashlib.sha256(b"").hexdigest()


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("", "empty"),
        ("\n  \n\t\n", "empty"),
        ("# deidfs\n\n# [folders.a]\n#path = '/x'\n", "blank"),
    ],
)
def test_a_blank_file_is_refused_where_blank_is_not_allowed(
    tmp_path: Path, text: str, said: str
) -> None:
    path = tmp_path / "deidfs.toml"
    path.write_text(text)
    assert load_config(path).folders == {}  # as the defaults, where allowed
    with pytest.raises(ConfigInvalid) as info:
        load_config(path, allow_blank=False)
    assert info.value.exit_code == 78
    assert str(info.value).startswith(f"{path}: the configuration file is {said}")
    assert "would remove every folder" in str(info.value)
    # Any table or key is content: a configuration with no folder stays an admin's choice.
    for content in ("[daemon]\n", "# x\n[profiles.Nominal]\nbase = 'Basic'\n"):
        path.write_text(content)
        assert load_config(path, allow_blank=False).folders == {}


def test_without_a_path_relative_paths_use_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = parse_config(NOMINAL + '[folders.a]\npath = "in"\n')
    assert config.folders["a"].path == tmp_path / "in"
    with pytest.raises(ConfigInvalid) as info:
        parse_config("[daemon]\nworkers = 0\n")
    assert str(info.value).startswith("<config>:2: daemon.workers: ")


def test_config_equality_is_by_content(tmp_path: Path) -> None:
    a = load_config(REFERENCE)
    b = parse_config(REFERENCE.read_text(), REFERENCE)
    assert a == b
    assert isinstance(a, Config)


# --------------------------------------------------------------------------------------------
# Profile inheritance


def profiles_of(tmp_path: Path, text: str) -> Config:
    return load_config(write(tmp_path, text))


def test_options_add_to_and_remove_from_the_base(tmp_path: Path) -> None:
    config = profiles_of(
        tmp_path,
        """\
        [profiles.Mid]
        base = "HIPAA"
        options = ["retain_uids", "-retain_patient_characteristics"]

        [profiles.Leaf]
        base = "Mid"
        options = ["clean_graphics", "-retain_uids", "-retain_safe_private"]
        """,
    )
    hipaa = BUILTIN_PROFILES["HIPAA"].options
    mid = config.profiles["Mid"]
    leaf = config.profiles["Leaf"]
    assert mid.options == (hipaa | {Option.RETAIN_UIDS}) - {Option.RETAIN_PATIENT_CHARACTERISTICS}
    # Removing an option the base does not have (retain_safe_private) changes nothing.
    assert leaf.options == {Option.RETAIN_LONGITUDINAL_MODIFIED_DATES, Option.CLEAN_GRAPHICS}
    # Settings the derived tables do not set come from HIPAA through the chain.
    assert (leaf.date_modification, leaf.max_age) == (DateModification.YEAR, 89)
    assert (leaf.base, mid.base) == ("Mid", "HIPAA")


def test_disabled_adds_and_removes_in_any_tag_syntax(tmp_path: Path) -> None:
    config = profiles_of(
        tmp_path,
        """\
        [profiles.A]
        disabled = ["(0008,103e)", "00081030", "StationName"]

        [profiles.B]
        base = "A"
        disabled = ["-SeriesDescription", "0010.0040", "-0008,1030"]
        """,
    )
    assert config.profiles["A"].disabled == {0x0008103E, 0x00081030, 0x00081010}
    assert config.profiles["B"].disabled == {0x00081010, 0x00100040}


def test_accepted_adds_and_removes_like_disabled(tmp_path: Path) -> None:
    """Identifiers a profile serves on purpose (``deidfs verify`` accepts them)."""
    config = profiles_of(
        tmp_path,
        """\
        [profiles.A]
        accepted = ["(0010,0010)", "PatientID", "0018,1000"]

        [profiles.B]
        base = "A"
        accepted = ["-PatientID", "StationName"]
        """,
    )
    assert config.profiles["A"].accepted == {0x00100010, 0x00100020, 0x00181000}
    assert config.profiles["B"].accepted == {0x00100010, 0x00181000, 0x00081010}
    assert not config.profiles["Basic"].accepted
    # Accepting changes nothing served: the plan, and so the index, stays the same.
    a = config.profiles["A"]
    assert compile_plan(a).digest == compile_plan(replace(a, accepted=frozenset())).digest


def test_rules_override_the_base_per_tag(tmp_path: Path) -> None:
    config = profiles_of(
        tmp_path,
        """\
        [profiles.A]
        rules = [
          { id = "(0008,103E)", act = "keep", note = "series names are generic here" },
          { id = "StudyDescription", act = "remove" },
        ]

        [profiles.B]
        base = "A"

        [[profiles.B.rules]]
        id = "0008103E"
        act = "X"

        [[profiles.B.rules]]
        id = "StationName"
        act = "dummy"
        """,
    )
    a = {r.tag: (r.act, r.note) for r in config.profiles["A"].rules}
    b = {r.tag: (r.act, r.note) for r in config.profiles["B"].rules}
    assert a == {
        0x0008103E: (Action.KEEP, "series names are generic here"),
        0x00081030: (Action.REMOVE, ""),
    }
    assert b == {
        0x0008103E: (Action.REMOVE, ""),
        0x00081030: (Action.REMOVE, ""),
        0x00081010: (Action.DUMMY, ""),
    }
    plan = compile_plan(config.profiles["B"])
    assert plan.decide(0x0008103E).action is Action.REMOVE


def test_unset_fields_are_inherited_but_comment_and_enabled_are_not(tmp_path: Path) -> None:
    config = profiles_of(
        tmp_path,
        """\
        [profiles.Template]
        enabled = false
        comment = "not for folders"
        apply_masks = true
        date_modification = "year"
        max_age = 80
        masks = [{ modality = "US", rects = [[0, 0, 10, 10]] }]

        [profiles.Child]
        base = "Template"

        [profiles.Other]
        base = "Template"
        apply_masks = false
        max_age = 0
        masks = [{ rows = 512, columns = 512, enabled = false, rects = [
          { left = 1, top = 2, width = 3, height = 4 },
        ] }]
        """,
    )
    template = config.profiles["Template"]
    child = config.profiles["Child"]
    other = config.profiles["Other"]
    assert not template.enabled
    assert (child.enabled, child.comment) == (True, "")
    assert (child.apply_masks, child.date_modification, child.max_age) == (
        True,
        DateModification.YEAR,
        80,
    )
    assert child.masks == template.masks
    assert template.masks[0].modality == "US"
    assert (other.apply_masks, other.max_age) == (False, None)
    (mask,) = other.masks
    assert (mask.rows, mask.columns, mask.enabled, mask.rects) == (
        512,
        512,
        False,
        (Rect(1, 2, 3, 4),),
    )


def test_profiles_may_name_bases_defined_later_and_default_to_basic(tmp_path: Path) -> None:
    config = profiles_of(
        tmp_path,
        """\
        [profiles.C]
        base = "B"
        [profiles.B]
        base = "A"
        [profiles.A]
        options = ["retain_uids"]
        """,
    )
    assert [config.profiles[n].base for n in "ABC"] == ["Basic", "A", "B"]
    assert config.profiles["C"].options == {Option.RETAIN_UIDS}


def test_rules_file_is_read_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "site.json").write_text(
        json.dumps(
            [
                {"id": "(0008,103E)", "act": "keep", "note": "reviewed"},
                {"id": "InstitutionName", "act": "Z"},
            ]
        )
    )
    config = profiles_of(
        tmp_path,
        """\
        [profiles.Site]
        base = "Basic"
        rules_file = "rules/site.json"
        """,
    )
    rules = config.profiles["Site"].rules
    assert [(r.tag, r.act, r.note) for r in rules] == [
        (0x0008103E, Action.KEEP, "reviewed"),
        (0x00080080, Action.EMPTY, ""),
    ]
    assert [r.to_json()["id"] for r in rules] == ["(0008,103E)", "InstitutionName"]


def test_quoted_profile_names_and_keys(tmp_path: Path) -> None:
    text = """\
    [profiles."Site: CT (v2)"]
    base = "+Pixel"
    comment = '''
    multi-line text that looks like TOML:
    [folders.fake]
    path = "x"
    '''

    [folders.ct]
    path = "/data/ct"
    profile = "Site: CT (v2)"
    "layout" = "flatt"
    """
    config_error = only_error(write(tmp_path, text))
    assert config_error.key == "folders.ct.layout"
    assert config_error.line == line_of(text, '"layout" = "flatt"')
    good = text.replace('"flatt"', '"flat"')
    config = load_config(write(tmp_path, good))
    assert config.profiles["Site: CT (v2)"].base == "+Pixel"
    assert config.folders["ct"].layout is Layout.FLAT


# --------------------------------------------------------------------------------------------
# Errors: each names the file, the line and the key

BAD: list[tuple[str, str, str, str, str]] = [
    # (test id, config, snippet on the expected line, key, part of the message)
    ("top-level-key", "colour = 'blue'\n", "colour", "colour", "unknown key"),
    (
        "daemon-key",
        "[daemon]\nmountpont = '/x'\n",
        "mountpont",
        "daemon.mountpont",
        "did you mean 'mountpoint'?",
    ),
    (
        "folder-key",
        NOMINAL + "[folders.ct]\npath = '/d'\nprofle = 'Nominal'\n",
        "profle",
        "folders.ct.profle",
        "did you mean 'profile'?",
    ),
    (
        "profile-key",
        "[profiles.P]\noption = ['retain_uids']\n",
        "option =",
        "profiles.P.option",
        "did you mean 'options'?",
    ),
    (
        "rule-key",
        "[profiles.P]\nrules = [\n  {id = 'PatientAge', act = 'keep'},\n"
        "  {id = 'PatientSex', act = 'keep', why = 'x'},\n]\n",
        "PatientSex",
        "profiles.P.rules[1].why",
        "unknown key",
    ),
    (
        "mask-key",
        "[profiles.P]\n[[profiles.P.masks]]\nrects = [[0, 0, 1, 1]]\n"
        "[[profiles.P.masks]]\ncolour = 'red'\nrects = [[0, 0, 1, 1]]\n",
        "colour",
        "profiles.P.masks[1].colour",
        "unknown key",
    ),
    (
        "rect-key",
        "[profiles.P]\nmasks = [{rects = [{left = 0, top = 0, width = 1, height = 1, d = 1}]}]\n",
        "masks",
        "profiles.P.masks[0].rects[0].d",
        "unknown key",
    ),
    (
        "bad-type-int",
        "[daemon]\nworkers = 'two'\n",
        "workers",
        "daemon.workers",
        "expected an integer, got string 'two'",
    ),
    (
        "bad-type-bool",
        "[daemon]\nallow_other = 'yes'\n",
        "allow_other",
        "daemon.allow_other",
        "expected true or false",
    ),
    (
        "bad-type-path",
        NOMINAL + "[folders.ct]\npath = 5\n",
        "path = 5",
        "folders.ct.path",
        "expected a non-empty path string",
    ),
    (
        "bad-type-table",
        "folders = 3\n",
        "folders",
        "folders",
        "expected a table",
    ),
    (
        "negative-seconds",
        "[daemon]\nsettle_seconds = -1\n",
        "settle",
        "daemon.settle_seconds",
        "at least 0",
    ),
    (
        "infinite-seconds",
        "[daemon]\npoll_seconds = inf\n",
        "poll",
        "daemon.poll_seconds",
        "finite number greater than 0",
    ),
    (
        "metrics-address",
        "[daemon]\nmetrics_address = '127.0.0.1'\n",
        "metrics",
        "daemon.metrics_address",
        "host:port",
    ),
    (
        "mountpoint-in-state-dir",
        "[daemon]\nstate_dir = '/var/lib/deidfs'\nmountpoint = '/var/lib/deidfs/mnt'\n",
        "mountpoint",
        "daemon.mountpoint",
        "must not be, contain or lie inside state_dir",
    ),
    (
        "unknown-option",
        "[profiles.P]\noptions = ['retain_uids', 'retain_device_id']\n",
        "options",
        "profiles.P.options[1]",
        "unknown option 'retain_device_id' (did you mean 'retain_device_identity'?)",
    ),
    (
        "unknown-removed-option",
        "[profiles.P]\noptions = ['-clean_everything']\n",
        "options",
        "profiles.P.options[0]",
        "unknown option 'clean_everything'",
    ),
    (
        "option-added-and-removed",
        "[profiles.P]\noptions = ['retain_uids', '-retain_uids']\n",
        "options",
        "profiles.P.options",
        "both added and removed",
    ),
    (
        "both-date-options",
        "[profiles.P]\noptions = [\n'retain_longitudinal_full_dates',\n"
        "'retain_longitudinal_modified_dates',\n]\n",
        "options",
        "profiles.P.options",
        "exclude each other",
    ),
    (
        "inherited-date-option-conflict",
        "[profiles.P]\nbase = 'HIPAA'\noptions = ['retain_longitudinal_full_dates']\n",
        "options",
        "profiles.P.options",
        "after inheriting from 'HIPAA'",
    ),
    (
        "bad-tag",
        "[profiles.P]\ndisabled = [\n  'PatientName',\n  '(0010,00ZZ)',\n]\n",
        "00ZZ",
        "profiles.P.disabled[1]",
        "not a DICOM tag: '(0010,00ZZ)'",
    ),
    (
        "bad-accepted-tag",
        "[profiles.P]\naccepted = ['PatientName', 'PatientNaem']\n",
        "accepted",
        "profiles.P.accepted[1]",
        "unknown DICOM keyword 'PatientNaem'",
    ),
    (
        "unknown-keyword",
        "[profiles.P]\ndisabled = ['PatientNmae']\n",
        "disabled",
        "profiles.P.disabled[0]",
        "unknown DICOM keyword 'PatientNmae'",
    ),
    (
        "bad-act",
        "[profiles.P]\nrules = [\n  { id = '(0008,103E)', act = 'remove' },\n"
        "  { id = 'StudyDescription', act = 'scramble' },\n]\n",
        "scramble",
        "profiles.P.rules[1].act",
        "unknown act 'scramble'",
    ),
    (
        "bad-rule-tag",
        "[profiles.P]\n\n[[profiles.P.rules]]\nid = 'not a tag'\nact = 'X'\n",
        "not a tag",
        "profiles.P.rules[0].id",
        "not a DICOM tag",
    ),
    (
        "rule-without-act",
        "[profiles.P]\nrules = [{ id = 'PatientAge' }]\n",
        "rules",
        "profiles.P.rules[0].act",
        "missing act",
    ),
    (
        "same-tag-twice",
        "[profiles.P]\nrules = [\n  { id = '(0008,103E)', act = 'X' },\n"
        "  { id = 'SeriesDescription', act = 'K' },\n]\n",
        "SeriesDescription",
        "profiles.P.rules[1].id",
        "a second rule for (0008,103E) (first: rules[0])",
    ),
    (
        "unknown-base",
        "[profiles.P]\ncomment = 'x'\nbase = 'hipaa'\n",
        "base",
        "profiles.P.base",
        "unknown base profile 'hipaa' (did you mean 'HIPAA'?)",
    ),
    (
        "base-cycle",
        "[profiles.A]\nbase = 'B'\n[profiles.B]\nbase = 'C'\n[profiles.C]\nbase = 'A'\n",
        "base = 'A'",
        "profiles.C.base",
        "base profiles form a cycle: A -> B -> C -> A",
    ),
    (
        "base-self",
        "[profiles.A]\nbase = 'A'\n",
        "base",
        "profiles.A.base",
        "cycle: A -> A",
    ),
    (
        "redefine-builtin",
        "[profiles.Basic]\noptions = ['retain_uids']\n",
        "[profiles.Basic]",
        "profiles.Basic",
        "built-in profile and cannot be redefined",
    ),
    (
        "redefine-builtin-quoted",
        '[profiles."+pixel"]\nbase = "Basic"\n',
        "pixel",
        'profiles."+pixel"',
        "'+Pixel' is a built-in profile",
    ),
    (
        "profile-name",
        '[profiles."a/b"]\n',
        "a/b",
        'profiles."a/b"',
        "invalid profile name",
    ),
    (
        "max-age",
        "[profiles.P]\nmax_age = 150\n",
        "max_age",
        "profiles.P.max_age",
        "must be 0 to 149",
    ),
    (
        "date-modification",
        "[profiles.P]\ndate_modification = 'month'\n",
        "date_mod",
        "profiles.P.date_modification",
        "one of: shift, year",
    ),
    (
        "negative-rect",
        "[profiles.P]\n[[profiles.P.masks]]\nrects = [[0, 0, 5, 5], [-1, 0, 5, 5]]\n",
        "rects",
        "profiles.P.masks[0].rects[1]",
        "left, top >= 0",
    ),
    (
        "short-rect",
        "[profiles.P]\n[[profiles.P.masks]]\nrects = [[0, 0, 5]]\n",
        "rects",
        "profiles.P.masks[0].rects[0]",
        "expected [left, top, width, height]",
    ),
    (
        "mask-without-rects",
        "[profiles.P]\n[[profiles.P.masks]]\nmodality = 'US'\n",
        "[[profiles.P.masks]]",
        "profiles.P.masks[0].rects",
        "missing rects",
    ),
    (
        "rules-and-rules-file",
        "[profiles.P]\nrules = []\nrules_file = 'r.json'\n",
        "rules_file",
        "profiles.P.rules_file",
        "either rules or rules_file",
    ),
    (
        "rules-file-missing",
        "[profiles.P]\nrules_file = 'absent.json'\n",
        "rules_file",
        "profiles.P.rules_file",
        "absent.json not found",
    ),
    (
        "same-folder-path",
        NOMINAL + "[folders.a]\npath = '/data/in'\n[folders.b]\npath = '/data/in/'\n",
        "'/data/in/'",
        "folders.b.path",
        "the same path as folder 'a'",
    ),
    (
        "nested-folder-path",
        NOMINAL + "[folders.a]\npath = '/data/in/ct'\n[folders.b]\npath = '/data/in'\n",
        "'/data/in'",
        "folders.b.path",
        "nested with folder 'a'",
    ),
    (
        "folder-in-mount",
        NOMINAL + "[folders.a]\npath = '/srv/deidfs/a'\n",
        "path",
        "folders.a.path",
        "daemon.mountpoint",
    ),
    (
        "folder-holds-export",
        NOMINAL + "[daemon]\nexport_dir = '/data/in/export'\n[folders.a]\npath = '/data/in'\n",
        "'/data/in'",
        "folders.a.path",
        "daemon.export_dir",
    ),
    (
        "folder-unknown-profile",
        NOMINAL + "[folders.a]\npath = '/d'\nprofile = 'Nominel'\n",
        "Nominel",
        "folders.a.profile",
        "unknown profile 'Nominel' (did you mean 'Nominal'?)",
    ),
    (
        "folder-disabled-profile",
        "[profiles.Off]\nenabled = false\n[folders.a]\npath = '/d'\nprofile = 'Off'\n",
        "profile = 'Off'",
        "folders.a.profile",
        "profile 'Off' is disabled",
    ),
    (
        "folder-default-profile-missing",
        "[folders.a]\npath = '/d'\n",
        "[folders.a]",
        "folders.a.profile",
        "default profile 'Nominal' is not defined",
    ),
    (
        "folder-without-path",
        NOMINAL + "[folders.a]\nlayout = 'flat'\n",
        "[folders.a]",
        "folders.a.path",
        "missing path",
    ),
    (
        "folder-layout",
        NOMINAL + "[folders.a]\npath = '/d'\nlayout = 'tree'\n",
        "layout",
        "folders.a.layout",
        "unknown layout 'tree'; one of: dicom, flat, mirror",
    ),
    (
        "folder-watch",
        NOMINAL + "[folders.a]\npath = '/d'\nwatch = 'polling'\n",
        "watch",
        "folders.a.watch",
        "unknown watch 'polling' (did you mean 'poll'?)",
    ),
    (
        "folder-id",
        NOMINAL + "[folders.'.hidden']\npath = '/d'\n",
        "hidden",
        'folders.".hidden"',
        "invalid folder id",
    ),
    (
        "folder-not-a-table",
        "[folders]\nct = '/data/ct'\n",
        "ct =",
        "folders.ct",
        "expected a table [folders.ct]",
    ),
]


@pytest.mark.parametrize(
    ("text", "snippet", "key", "message"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD],
)
def test_bad_config_names_file_line_and_key(
    tmp_path: Path, text: str, snippet: str, key: str, message: str
) -> None:
    path = write(tmp_path, text)
    error = only_error(path)
    line = line_of(text, snippet)
    assert (error.path, error.line, error.key) == (str(path), line, key)
    assert message in error.reason
    assert str(error).startswith(f"{path}:{line}: {key}: ")


def test_toml_syntax_error_has_its_line(tmp_path: Path) -> None:
    text = NOMINAL + "[folders.a]\npath = '/d\nlayout = 'flat'\n"
    error = only_error(write(tmp_path, text))
    assert error.line == line_of(text, "path = '/d")
    assert error.key == ""
    assert error.reason.startswith("invalid TOML: ")
    assert str(error).startswith(f"{tmp_path / 'deidfs.toml'}:{error.line}: invalid TOML")


@pytest.mark.parametrize(
    ("text", "line"),
    [
        pytest.param("[folders.a]\npath = '/a'\n\n[folders.a]\npath = '/b'\n", 4, id="table"),
        pytest.param("[daemon]\nworkers = 1\ncache_mib = 2\nworkers = 3\n", 4, id="key"),
    ],
)
def test_a_name_given_twice_is_a_syntax_error(tmp_path: Path, text: str, line: int) -> None:
    error = only_error(write(tmp_path, text))
    assert error.line == line
    assert "already exists" in error.reason


def test_bad_rules_file_names_the_rule(tmp_path: Path) -> None:
    (tmp_path / "r.json").write_text('[{"id": "PatientAge", "act": "keep"}, {"id": "x"}]')
    text = "[profiles.P]\nbase = 'Basic'\nrules_file = 'r.json'\n"
    error = only_error(write(tmp_path, text))
    assert (error.line, error.key) == (3, "profiles.P.rules_file")
    assert "rule #2" in error.reason


def test_every_problem_is_reported_top_to_bottom(tmp_path: Path) -> None:
    text = """\
    [folders.ct]
    path = "/data/ct"
    profile = "Research"

    [profiles.Research]
    base = "HIPAA"
    options = ["retain_uidz"]

    [daemon]
    workers = 0
    """
    path = write(tmp_path, text)
    with pytest.raises(ConfigInvalid) as info:
        load_config(path)
    errors = info.value.errors
    # The folder's profile is broken, not unknown: it is reported once, where it is defined.
    assert [(e.line, e.key) for e in errors] == [
        (7, "profiles.Research.options[0]"),
        (10, "daemon.workers"),
    ]
    assert info.value.line == 7
    assert str(info.value).splitlines() == [str(e) for e in errors]


def test_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "deidfs.toml"
    path.write_bytes(b"[daemon]\n# caf\xe9\n")
    error = only_error(path)
    assert (error.line, error.reason) == (2, "not UTF-8 text")


def test_missing_file_is_unreadable_not_invalid(tmp_path: Path) -> None:
    with pytest.raises(ConfigUnreadable) as info:
        load_config(tmp_path / "absent.toml")
    assert info.value.exit_code == os.EX_NOINPUT
    assert str(tmp_path / "absent.toml") in str(info.value)
    assert ConfigInvalid([ConfigError("x")]).exit_code == os.EX_CONFIG


def test_line_numbers_survive_tricky_toml(tmp_path: Path) -> None:
    text = '''\
    # [folders.commented] = "not a table"
    [profiles.P]
    comment = """
    [folders.inside_a_string]
    key = "value" \\"""
    """
    disabled = [ # a comment with ] and [
      "PatientName",  # still an item
      'C:\\path',
    ]
    [ profiles . "Q" ]
    base = "P"  # trailing comment
    '''
    error = only_error(write(tmp_path, text))
    assert (error.line, error.key) == (line_of(text, "C:"), "profiles.P.disabled[1]")


# --------------------------------------------------------------------------------------------
# check-config and the CLI helpers


def test_check_config_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, NOMINAL + "[folders.a]\npath = '/d'\n")
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert out == f"ok: 1 folder, 4 profiles (sha256 {digest})\n"


def test_check_config_reports_every_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "[daemon]\nworkers = 0\nbogus = 1\n")
    assert main(["check-config", str(path)]) == os.EX_CONFIG
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"{path}:2: daemon.workers: must be 1 to 256")
    assert err[1].startswith(f"{path}:3: daemon.bogus: unknown key")
    assert err[2] == "2 problems"


def test_check_config_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "[profiles.P]\nbase = 'Q'\n")
    assert main(["check-config", "--format", "json", str(path)]) == os.EX_CONFIG
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False
    assert doc["errors"] == [
        {
            "file": str(path),
            "line": 2,
            "key": "profiles.P.base",
            "message": doc["errors"][0]["message"],
        }
    ]
    assert doc["errors"][0]["message"].startswith("unknown base profile 'Q'")
    assert main(["check-config", "--format", "json", str(REFERENCE)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is True
    assert doc["profiles"] == ["Basic", "HIPAA", "+Pixel", "Nominal"]


def test_check_config_missing_file_exits_66(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check-config", str(tmp_path / "absent.toml")]) == os.EX_NOINPUT
    assert "configuration file not found" in capsys.readouterr().err


def test_check_config_finds_the_file_like_every_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    good = write(tmp_path, NOMINAL, "good.toml")
    bad = write(tmp_path, "[daemon]\nworkers = -1\n", "bad.toml")
    monkeypatch.setenv(CONFIG_ENV, str(bad))
    assert main(["check-config"]) == os.EX_CONFIG
    assert main(["--config", str(good), "check-config"]) == 0
    assert main(["--config", str(bad), "check-config", str(good)]) == 0
    out = capsys.readouterr().out
    assert out.count("ok: 0 folders, 4 profiles") == 2


def test_check_config_as_a_process(tmp_path: Path) -> None:
    bad = write(tmp_path, "[folders.a]\npath = '/d'\n")
    env = {k: v for k, v in os.environ.items() if k != CONFIG_ENV}
    run = subprocess.run(
        [sys.executable, "-m", "deidfs", "check-config", str(bad)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=60,
    )
    assert run.returncode == 78
    assert re.match(rf"{re.escape(str(bad))}:1: folders\.a\.profile: no profile", run.stderr)


def test_load_profiles_reads_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, NOMINAL + "[profiles.Mine]\nbase = 'HIPAA'\n")
    profiles = load_profiles(str(path))
    assert list(profiles) == ["Basic", "HIPAA", "+Pixel", "Nominal", "Mine"]
    assert profiles["Mine"].options == BUILTIN_PROFILES["HIPAA"].options
    monkeypatch.setenv(CONFIG_ENV, str(path))
    assert list(load_profiles(None)) == list(profiles)


def test_global_options_are_accepted_after_every_subcommand(tmp_path: Path) -> None:
    """``--config``, ``--log-level`` and ``--version`` after any subcommand, at any depth,
    run by the real CLI. The environment names a missing file: a command that accepted
    ``--config`` but did not use it would say so (66)."""
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    (incoming / "ct.dcm").write_bytes(sample_file("CT_small.dcm").read_bytes())
    (tmp_path / "second").mkdir()
    config = write(
        tmp_path,
        f"""\
        [daemon]
        mountpoint = "{tmp_path / "mnt"}"
        state_dir = "{tmp_path / "state"}"
        export_dir = "{tmp_path / "export"}"
        control_socket = "{tmp_path / "state" / "control.sock"}"
        metrics_address = ""

        [folders.onlyhere]
        path = "{incoming}"
        profile = "OnlyHere"

        [profiles.Nominal]
        base = "Basic"

        [profiles.OnlyHere]
        base = "Basic"
        rules = [{{ id = "(0008,103E)", act = "remove" }}]

        [[profiles.OnlyHere.masks]]
        modality = "CT"
        rects = [[0, 0, 8, 8]]
        """,
    )
    bad = write(tmp_path, "[daemon]\nmountpiont = 'typo'\n", "bad.toml")
    rules = tmp_path / "rules.json"
    png = tmp_path / "preview.png"
    sample = str(incoming / "ct.dcm")
    # (argv, exit code, text the output must contain): in order, as edits build on each other.
    cases: list[tuple[list[str], int, str]] = [
        (["profile", "list"], 0, "OnlyHere"),
        (["profile", "show", "OnlyHere"], 0, "(0008,103E)"),
        (["profile", "add", "Extra"], 0, "Extra"),
        (["profile", "copy", "OnlyHere", "Copy2"], 0, "Copy2"),
        (["profile", "edit", "Extra", "--comment", "for the test"], 0, "for the test"),
        (["profile", "rules-export", "OnlyHere", str(rules)], 0, ""),
        (["profile", "rules-import", "Extra", str(rules)], 0, "(0008,103E)"),
        (["profile", "delete", "Copy2"], 0, "Copy2"),
        (["folder", "list"], 0, "onlyhere"),
        (["folder", "add", "second", str(tmp_path / "second"), "--profile", "Extra"], 0, "second"),
        (["folder", "set-profile", "second", "OnlyHere"], 0, "OnlyHere"),
        (["folder", "remove", "second"], 0, "second"),
        (["describe-profile", "OnlyHere"], 0, "(0008,103E)"),
        (["check-config"], 0, "ok: 1 folder"),
        (["anonymize", sample, "--to", str(tmp_path / "out"), "--profile", "OnlyHere"], 0, ""),
        (["export", "onlyhere", "--quiet"], 0, ""),
        (["mask", "preview", sample, "--profile", "OnlyHere", "--png", str(png)], 0, "1 mask"),
        (["report", "OnlyHere"], 0, "OnlyHere"),
        (["verify", "onlyhere", "--export"], 0, ""),
        (["status"], 69, "not running"),
        (["reload", "--wait"], 69, "not running"),
        (["withheld"], 69, "not running"),
        (["unmount"], 0, ""),
    ]
    env = {**os.environ, CONFIG_ENV: str(tmp_path / "not-this-one.toml")}

    def deidfs(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "deidfs", *argv],
            capture_output=True,
            text=True,
            env=env,
            check=False,
            timeout=120,
        )

    for argv, code, said in cases:
        done = deidfs(*argv, "--config", str(config), "--log-level", "warning")
        assert done.returncode == code, (argv, done.stderr)
        assert said in done.stdout + done.stderr, (argv, done.stdout, done.stderr)
    assert (tmp_path / "out").is_dir()
    assert png.is_file()
    assert rules.is_file()
    assert any((tmp_path / "export" / "onlyhere").rglob("*.dcm"))
    # run: the file named after the command is the one read (and refused), with file:line.
    done = deidfs("run", "--log-level", "debug", f"--config={bad}")
    assert done.returncode == 78, done.stderr
    assert f"{bad}:2" in done.stderr
    # Given after the command, an option wins over the same option before it.
    done = deidfs("--config", str(bad), "check-config", "--config", str(config))
    assert done.returncode == 0, done.stderr
    done = deidfs("demo", "--dir", str(tmp_path / "demo"), "--log-level", "error")
    assert done.returncode == 0, done.stderr
    for argv in (["status"], ["profile", "list"], ["mask", "preview"], ["verify"]):
        done = deidfs(*argv, "--version")
        assert done.returncode == 0, (argv, done.stderr)
        assert done.stdout.startswith("deidfs "), (argv, done.stdout)
    done = deidfs("status", "--log-level", "loud")
    assert done.returncode == 2
    assert "invalid choice: 'loud'" in done.stderr


def test_parse_timeout_seconds_defaults_to_a_minute_and_must_be_positive(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert load_config(write(tmp_path, NOMINAL)).daemon.parse_timeout_seconds == 60.0
    path = write(tmp_path, "[daemon]\nparse_timeout_seconds = 2.5\n" + NOMINAL)
    assert load_config(path).daemon.parse_timeout_seconds == 2.5
    for bad in ("0", "-1", '"60"', "true"):
        path = write(tmp_path, f"[daemon]\nparse_timeout_seconds = {bad}\n")
        assert main(["check-config", str(path)]) == os.EX_CONFIG
        err = capsys.readouterr().err.splitlines()
        assert err[0].startswith(f"{path}:2: daemon.parse_timeout_seconds: "), err
