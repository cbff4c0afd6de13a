"""``deidfs profile ...`` / ``deidfs folder ...``: comment-preserving, validated, locked edits.

Golden files under ``tests/data/edit/``: ``base.toml`` is a hand-commented configuration
(comments above, below and beside headers and keys, blank lines, odd spacing, literal
strings, a quoted table name, an array of tables); each ``<case>.toml`` is the whole file
expected after one command, byte for byte.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import tomlkit
from tomlkit.toml_document import TOMLDocument

from deidfs.cli.main import main
from deidfs.config import edit as config_edit
from deidfs.config import edit_folders, edit_profiles
from deidfs.config.edit import ConfigBusy, EditContext
from deidfs.config.load import load_config, parse_config
from deidfs.deid.plan import compile_plan
from deidfs.deid.profiles import BUILTIN_PROFILES, rules_from_json, rules_to_json
from deidfs.errors import ConfigError

DATA = Path(__file__).parent / "data" / "edit"
BASE = DATA / "base.toml"
RULES = DATA / "rules.json"


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    path = tmp_path / "deidfs.toml"
    shutil.copyfile(BASE, path)
    return path


def run(cfg: Path, *args: str) -> int:
    return main(["--config", str(cfg), *args])


def validator(path: Path) -> config_edit.Validator:
    return lambda text: parse_config(text, path)


def comments(text: str) -> list[str]:
    """The comments of a TOML text (``base.toml`` has no ``#`` inside strings)."""
    return [line[line.index("#") :] for line in text.splitlines() if "#" in line]


# --------------------------------------------------------------------------------------------
# Golden files

# fmt: off
GOLDEN: list[tuple[str, list[str]]] = [
    ("profile-add", ["profile", "add", "qa", "--base", "Nominal", "--comment", "QA checks"]),
    ("profile-copy-builtin", ["profile", "copy", "HIPAA", "HIPAA site"]),
    (
        "profile-copy",
        ["profile", "copy", "research", "research_v2", "--comment", "Research, second cohort"],
    ),
    (
        "profile-edit",
        [
            "profile",
            "edit",
            "research",
            "--comment",
            "Research exports, v2",
            "--apply-masks",
            "--option=-retain_uids",
            "--option",
            "+clean_descriptors",
            "--disable-attr",
            "PatientBirthDate",
            "--enable-attr",
            "0008,1030",
            "--rule",
            "0008.1090=keep",
            "--rule",
            "(0008,103e)=X",
            "--note",
            "reviewed 2026-11",
        ],
    ),
    (
        "profile-edit-inherited",
        [
            "profile",
            "edit",
            "US burned-in",
            "--option=-clean_pixel_data",
            "--no-apply-masks",
            "--disable-attr",
            "00081090",
            "--comment",
            "US, masks only",
        ],
    ),
    ("profile-delete", ["profile", "delete", "research"]),
    ("profile-rules-import", ["profile", "rules-import", "Nominal", str(RULES)]),
    (
        "folder-add",
        [
            "folder",
            "add",
            "mr",
            "/data/incoming/mr",
            "--profile",
            "research",
            "--layout",
            "flat",
            "--watch",
            "inotify",
        ],
    ),
    ("folder-set-profile", ["folder", "set-profile", "ct", "research"]),
    ("folder-remove", ["folder", "remove", "ct"]),
    ("folder-remove-last", ["folder", "remove", "us"]),
]
# fmt: on

#: Comment lines that go with the table a golden case deletes; every other one must survive.
DELETED_COMMENTS = {
    "profile-delete": {
        "# Longitudinal studies: dates shifted per patient, UIDs kept.",
        "# intervals survive",
        "# study description stays",
        "# (more rules to come after the ethics review)",
        "# burned-in header band",
    },
    "folder-remove": {
        "# CT drop from the scanners (storescp writes *.part, then renames).",
        '# layout stays "dicom"',
    },
    "folder-remove-last": {"# ultrasound, NFS share"},
}


@pytest.mark.parametrize(("golden", "args"), GOLDEN, ids=[g for g, _ in GOLDEN])
def test_edit_gives_golden_file(
    cfg: Path, capsys: pytest.CaptureFixture[str], golden: str, args: list[str]
) -> None:
    before = cfg.read_text()
    assert run(cfg, *args) == 0
    after = cfg.read_text()
    expected = (DATA / f"{golden}.toml").read_text()
    assert after == expected
    # What is printed is exactly the change.
    assert capsys.readouterr().out == config_edit.unified_diff(before, after, cfg)
    # Comments of untouched parts are all there, in order.
    kept = [c for c in comments(before) if c not in DELETED_COMMENTS.get(golden, set())]
    remaining = iter(comments(after))
    assert all(c in remaining for c in kept)  # a subsequence: same order
    load_config(cfg)  # and the result is a valid configuration


def test_golden_results_mean_what_the_commands_say(tmp_path: Path) -> None:
    def load(name: str) -> dict[str, object]:
        path = tmp_path / f"{name}.toml"
        shutil.copyfile(DATA / f"{name}.toml", path)
        config = load_config(path)
        return {"profiles": config.profiles, "folders": config.folders}

    base = load("base")
    edited = load("profile-edit")["profiles"]
    assert isinstance(edited, dict)
    research = edited["research"]
    assert {o.value for o in research.options} == {
        "retain_longitudinal_modified_dates",
        "clean_descriptors",
    }
    assert research.apply_masks
    assert research.disabled == frozenset({0x00100030})
    assert {(r.id_text, r.act_text, r.note) for r in research.rules} == {
        ("(0008,103E)", "X", "reviewed 2026-11"),
        ("(0008,1090)", "keep", "reviewed 2026-11"),
    }
    inherited = load("profile-edit-inherited")["profiles"]
    assert isinstance(inherited, dict)
    us = inherited["US burned-in"]
    assert not us.options
    assert not us.apply_masks
    assert us.disabled == frozenset({0x00081090})
    folders = load("folder-set-profile")["folders"]
    assert isinstance(folders, dict)
    assert folders["ct"].profile == "research"
    assert base["folders"] != folders


@pytest.mark.parametrize(
    ("value", "written"),
    [
        ("Research exports, v3", "comment = 'Research exports, v3'"),  # the admin's quotes
        ("Smith's exports", 'comment = "Smith\'s exports"'),  # a literal cannot hold '
        ("tab\there", "comment = 'tab\there'"),
        ("bell\x07", 'comment = "bell\\u0007"'),
    ],
)
def test_a_changed_string_keeps_its_quotes_where_it_can(
    cfg: Path, value: str, written: str
) -> None:
    assert "comment = 'Research exports'" in cfg.read_text()
    assert run(cfg, "profile", "edit", "research", "--comment", value) == 0
    text = cfg.read_text()
    assert written in text.splitlines()
    assert load_config(cfg).profiles["research"].comment == value


# --------------------------------------------------------------------------------------------
# Copies


@pytest.mark.parametrize("source", sorted(BUILTIN_PROFILES))
def test_copy_of_builtin_is_editable_and_equivalent(cfg: Path, source: str) -> None:
    assert run(cfg, "profile", "copy", source, "Mine") == 0
    table = tomlkit.parse(cfg.read_text())["profiles"]["Mine"]
    # Settings written out, so an admin sees and edits each one.
    for key in ("base", "comment", "enabled", "apply_masks", "options", "date_modification"):
        assert key in table
    copy = load_config(cfg).profiles["Mine"]
    original = BUILTIN_PROFILES[source]
    assert not copy.builtin
    assert dataclasses.replace(copy, name=original.name, base=original.base) == original
    assert compile_plan(copy).exact == compile_plan(original).exact
    assert run(cfg, "profile", "edit", "Mine", "--option", "+retain_uids") == 0


def test_copy_of_configured_profile_is_equivalent(cfg: Path) -> None:
    assert run(cfg, "profile", "copy", "research", "r2") == 0
    profiles = load_config(cfg).profiles
    assert dataclasses.replace(profiles["r2"], name="research") == profiles["research"]


# --------------------------------------------------------------------------------------------
# Edits and their inverses


INVERSES = [
    (["profile", "add", "qa"], ["profile", "delete", "qa"]),
    (
        ["folder", "add", "mr", "/data/incoming/mr", "--profile", "HIPAA"],
        ["folder", "remove", "mr"],
    ),
    (
        ["profile", "edit", "US burned-in", "--option=-clean_pixel_data"],
        ["profile", "edit", "US burned-in", "--option", "+clean_pixel_data"],
    ),
    (
        ["profile", "edit", "Nominal", "--disable-attr", "PatientName"],
        ["profile", "edit", "Nominal", "--enable-attr", "(0010,0010)"],
    ),
    (
        ["profile", "edit", "Nominal", "--rule", "PatientID=keep", "--note", "x"],
        ["profile", "edit", "Nominal", "--remove-rule", "00100020"],
    ),
    (
        ["profile", "edit", "research", "--enable-attr", "StudyDescription"],
        ["profile", "edit", "research", "--disable-attr", "(0008,1030)"],
    ),
]


@pytest.mark.parametrize(("do", "undo"), INVERSES, ids=[" ".join(d[:3]) for d, _ in INVERSES])
def test_edit_then_inverse_restores_the_file(cfg: Path, do: list[str], undo: list[str]) -> None:
    assert run(cfg, *do) == 0
    assert cfg.read_bytes() != BASE.read_bytes()
    assert run(cfg, *undo) == 0
    assert cfg.read_bytes() == BASE.read_bytes()


@pytest.mark.parametrize(
    "tag",
    ["PatientName", "(0010,0010)", "(0010,0010)".lower(), "00100010", "0010,0010", "0010.0010"],
)
def test_tags_are_stored_canonically(cfg: Path, tag: str) -> None:
    assert (
        run(cfg, "profile", "edit", "Nominal", "--disable-attr", tag, "--rule", f"{tag}=empty") == 0
    )
    table = tomlkit.parse(cfg.read_text())["profiles"]["Nominal"]
    assert table["disabled"] == ["(0010,0010)"]
    assert table["rules"] == [{"id": "(0010,0010)", "act": "empty"}]


def test_inherited_option_and_attribute_are_turned_off_with_minus_entries(cfg: Path) -> None:
    # research inherits from Nominal; give Nominal an option and a disabled attribute first.
    assert run(cfg, "profile", "edit", "Nominal", "--option", "+clean_graphics") == 0
    assert run(cfg, "profile", "edit", "Nominal", "--disable-attr", "PatientAge") == 0
    assert (
        run(
            cfg,
            "profile", "edit", "research",
            "--option=-clean_graphics", "--enable-attr", "PatientAge",
        )
        == 0
    )  # fmt: skip
    table = tomlkit.parse(cfg.read_text())["profiles"]["research"]
    assert "-clean_graphics" in table["options"]
    assert "-(0010,1010)" in table["disabled"]
    research = load_config(cfg).profiles["research"]
    assert 0x00101010 not in research.disabled
    assert all(o.value != "clean_graphics" for o in research.options)


def test_no_change_writes_nothing(cfg: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stat = cfg.stat()
    assert run(cfg, "profile", "edit", "research", "--enable", "--no-apply-masks") == 0
    assert run(cfg, "profile", "edit", "research", "--comment", "Research exports") == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "no change" in captured.err
    assert cfg.read_bytes() == BASE.read_bytes()
    assert cfg.stat().st_mtime_ns == stat.st_mtime_ns


def test_dry_run_prints_the_diff_and_writes_nothing(
    cfg: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(cfg, "profile", "add", "qa", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "+[profiles.qa]\n" in out
    assert '+base = "Basic"\n' in out
    assert cfg.read_bytes() == BASE.read_bytes()
    assert not cfg.with_name(cfg.name + ".lock").exists()


def test_folder_add_stores_an_absolute_path(
    cfg: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert run(cfg, "folder", "add", "mr", "incoming/../incoming/mr", "--profile", "HIPAA") == 0
    assert load_config(cfg).folders["mr"].path == tmp_path / "incoming" / "mr"


# --------------------------------------------------------------------------------------------
# Refusals: nothing written


def assert_untouched(cfg: Path, stat: os.stat_result) -> None:
    assert cfg.read_bytes() == BASE.read_bytes()
    now = cfg.stat()
    assert (now.st_ino, now.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    assert sorted(p.name for p in cfg.parent.iterdir() if p.name != cfg.name + ".lock") == [
        cfg.name
    ]


INVALID = [
    (["profile", "edit", "Nominal", "--disable"], "is disabled"),
    (["folder", "add", "mr", "/data/incoming/ct/mr", "--profile", "research"], "nested"),
    (["folder", "add", "mr", "/data/mr", "--profile", "reserch"], "did you mean 'research'"),
    (["folder", "add", "1/2", "/data/mr", "--profile", "research"], "invalid folder id"),
    (["folder", "add", "ct", "/data/mr", "--profile", "research"], "already exists"),
    (["folder", "set-profile", "ct", "nope"], "unknown profile 'nope'"),
    (
        ["profile", "edit", "research", "--option", "+retain_longitudinal_full_dates"],
        "exclude each other",
    ),
    (["profile", "add", "research"], "already exists"),
    (["profile", "add", "hipaa"], "built-in"),
    (["profile", "add", "a/b"], "invalid profile name"),
    (["profile", "add", "qa", "--base", "qa"], "no profile named 'qa'"),
    (["profile", "copy", "Nominal", "+PIXEL"], "built-in"),
]


@pytest.mark.parametrize(("args", "reason"), INVALID, ids=[" ".join(a) for a, _ in INVALID])
def test_invalid_edit_is_refused_and_writes_nothing(
    cfg: Path, capsys: pytest.CaptureFixture[str], args: list[str], reason: str
) -> None:
    stat = cfg.stat()
    code = run(cfg, *args)
    err = capsys.readouterr().err
    assert reason in err
    assert code == (66 if "no profile named" in reason else 78)
    assert_untouched(cfg, stat)


def test_delete_is_refused_while_a_folder_uses_the_profile(
    cfg: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stat = cfg.stat()
    assert run(cfg, "profile", "delete", "US burned-in") == 78
    assert "used by folder(s) us" in capsys.readouterr().err
    assert_untouched(cfg, stat)
    assert run(cfg, "folder", "set-profile", "us", "+Pixel") == 0
    assert run(cfg, "profile", "delete", "US burned-in") == 0
    assert "US burned-in" not in load_config(cfg).profiles


def test_delete_is_refused_while_another_profile_builds_on_it(
    cfg: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(cfg, "folder", "set-profile", "ct", "HIPAA") == 0
    before = cfg.read_bytes()
    assert run(cfg, "profile", "delete", "Nominal") == 78
    assert "is the base of research" in capsys.readouterr().err
    assert cfg.read_bytes() == before


BUILTIN_EDITS = [
    ["profile", "edit", "Basic", "--comment", "mine"],
    ["profile", "edit", "+Pixel", "--no-apply-masks"],
    ["profile", "delete", "HIPAA"],
    ["profile", "rules-import", "HIPAA", str(RULES)],
]


@pytest.mark.parametrize("args", BUILTIN_EDITS, ids=[" ".join(a[:3]) for a in BUILTIN_EDITS])
def test_builtin_profiles_cannot_be_changed(
    cfg: Path, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    stat = cfg.stat()
    assert run(cfg, *args) == 78
    assert "built-in profile and cannot be changed; copy it first" in capsys.readouterr().err
    assert_untouched(cfg, stat)


def test_an_already_invalid_file_is_reported_as_such(
    cfg: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = BASE.read_text().replace('profile = "Nominal"', 'profile = "Nominl"')
    cfg.write_text(broken)
    assert run(cfg, "profile", "add", "qa") == 78
    err = capsys.readouterr().err
    assert "already invalid" in err
    assert "folders.ct.profile" in err
    assert cfg.read_text() == broken
    # An edit that fixes it is let through.
    assert run(cfg, "folder", "set-profile", "ct", "Nominal") == 0
    assert cfg.read_bytes() == BASE.read_bytes()


def test_syntax_error_in_the_file_is_refused(cfg: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg.write_text(BASE.read_text() + "\n[folders.ct]\n")
    before = cfg.read_bytes()
    assert run(cfg, "folder", "remove", "us") == 78
    assert "invalid TOML" in capsys.readouterr().err
    assert cfg.read_bytes() == before


def test_missing_config_exits_66(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "none.toml"
    assert run(missing, "profile", "add", "qa") == 66
    assert run(missing, "folder", "list") == 66
    assert "not found" in capsys.readouterr().err
    assert not missing.exists()
    assert not (tmp_path / "none.toml.lock").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["profile", "edit", "research"],
        ["profile", "edit", "research", "--rule", "PatientName"],
        ["profile", "edit", "research", "--rule", "PatientName=scramble"],
        ["profile", "edit", "research", "--disable-attr", "NoSuchKeyword"],
        ["profile", "edit", "research", "--option", "+retain_everything"],
        ["profile", "edit", "research", "--rule", "PatientID=keep", "--remove-rule", "00100020"],
        ["profile", "edit", "research", "--enable", "--disable"],
        ["profile", "edit", "research", "--note", "why"],
        ["folder", "add", "mr", "/data/mr"],
        ["folder", "add", "mr", "/data/mr", "--profile", "HIPAA", "--layout", "tree"],
    ],
)
def test_usage_errors_exit_2(cfg: Path, args: list[str]) -> None:
    stat = cfg.stat()
    try:
        code = run(cfg, *args)
    except SystemExit as exc:  # argparse's own usage errors
        code = int(exc.code or 0)
    assert code == 2
    assert_untouched(cfg, stat)


# --------------------------------------------------------------------------------------------
# Custom rules as JSON


def test_rules_export_import_round_trip_exactly(
    cfg: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    exported = tmp_path / "research.json"
    assert run(cfg, "profile", "rules-export", "research", str(exported)) == 0
    assert exported.read_text() == rules_to_json(load_config(cfg).profiles["research"].rules)
    assert run(cfg, "profile", "rules-import", "Nominal", str(exported)) == 0
    capsys.readouterr()
    assert run(cfg, "profile", "rules-export", "Nominal") == 0
    assert capsys.readouterr().out == exported.read_text()

    # A file in the JSON format (tags and acts as the admin spelled them) comes back unchanged.
    assert run(cfg, "profile", "rules-import", "Nominal", str(RULES)) == 0
    capsys.readouterr()
    assert run(cfg, "profile", "rules-export", "Nominal") == 0
    assert capsys.readouterr().out == RULES.read_text()
    assert load_config(cfg).profiles["Nominal"].rules == rules_from_json(RULES.read_text())


def test_rules_export_gives_only_the_profiles_own_rules(
    cfg: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(cfg, "profile", "rules-import", "Nominal", str(RULES)) == 0
    research = load_config(cfg).profiles["research"]
    assert len(research.rules) == 3  # (0008,103E) of its own replaces the inherited one
    capsys.readouterr()
    assert run(cfg, "profile", "rules-export", "research") == 0
    assert [r["id"] for r in json.loads(capsys.readouterr().out)] == ["(0008,103E)"]
    assert run(cfg, "profile", "rules-export", "HIPAA") == 0
    assert capsys.readouterr().out == "[]\n"


def test_rules_import_of_an_empty_array_removes_the_rules(cfg: Path, tmp_path: Path) -> None:
    empty = tmp_path / "none.json"
    empty.write_text("[]\n")
    assert run(cfg, "profile", "rules-import", "research", str(empty)) == 0
    assert "rules" not in tomlkit.parse(cfg.read_text())["profiles"]["research"]
    assert load_config(cfg).profiles["research"].rules == ()


@pytest.mark.parametrize(
    ("content", "code"),
    [
        ('{"id": "PatientName", "act": "keep"}', 78),
        ('[{"id": "PatientName", "act": "scramble"}]', 78),
        ('[{"id": "PatientName", "act": "keep"}, {"id": "(0010,0010)", "act": "X"}]', 78),
        ("[{", 78),
        (None, 66),
    ],
)
def test_rules_import_of_a_bad_file_writes_nothing(
    cfg: Path, tmp_path: Path, content: str | None, code: int
) -> None:
    rules = tmp_path / "rules.json"
    if content is not None:
        rules.write_text(content)
    stat = cfg.stat()
    assert run(cfg, "profile", "rules-import", "research", str(rules)) == code
    assert cfg.read_bytes() == BASE.read_bytes()
    assert cfg.stat().st_mtime_ns == stat.st_mtime_ns


def test_profile_with_rules_file(cfg: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copyfile(RULES, cfg.parent / "site-rules.json")
    text = BASE.read_text().replace(
        'base = "+Pixel"\n', 'base = "+Pixel"\nrules_file = "site-rules.json"\n'
    )
    cfg.write_text(text)
    assert run(cfg, "profile", "rules-export", "US burned-in") == 0
    assert capsys.readouterr().out == RULES.read_text()
    # Rules kept in a file are edited there, not through --rule.
    assert run(cfg, "profile", "edit", "US burned-in", "--rule", "PatientName=keep") == 78
    assert "rules_file" in capsys.readouterr().err
    assert cfg.read_text() == text
    # Importing replaces them by inline rules.
    assert run(cfg, "profile", "rules-import", "US burned-in", str(RULES)) == 0
    table = tomlkit.parse(cfg.read_text())["profiles"]["US burned-in"]
    assert "rules_file" not in table
    assert len(table["rules"]) == 3


# --------------------------------------------------------------------------------------------
# The transaction: lock, atomic write, guards


def test_lock_held_by_another_process_exits_75(cfg: Path) -> None:
    lock = cfg.with_name(cfg.name + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        proc = subprocess.run(
            [
                sys.executable, "-m", "deidfs", "--config", str(cfg),
                "profile", "add", "qa", "--lock-timeout", "0.2",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )  # fmt: skip
    finally:
        os.close(fd)
    assert proc.returncode == 75, proc.stderr
    assert "another edit holds" in proc.stderr
    assert cfg.read_bytes() == BASE.read_bytes()
    # Once released, the same edit goes through.
    assert run(cfg, "profile", "add", "qa") == 0


def test_write_keeps_mode_owner_and_group_and_replaces_atomically(cfg: Path) -> None:
    os.chmod(cfg, 0o640)
    if os.geteuid() == 0:
        os.chown(cfg, 1234, 2345)
    before = cfg.stat()
    assert run(cfg, "profile", "add", "qa") == 0
    after = cfg.stat()
    assert after.st_mode == before.st_mode
    assert (after.st_uid, after.st_gid) == (before.st_uid, before.st_gid)
    assert after.st_ino != before.st_ino  # a new file renamed into place, never rewritten
    assert sorted(p.name for p in cfg.parent.iterdir()) == [cfg.name, cfg.name + ".lock"]
    lock = cfg.with_name(cfg.name + ".lock").stat()
    assert (lock.st_uid, lock.st_gid) == (before.st_uid, before.st_gid)
    assert lock.st_mode & 0o777 == 0o640


def test_symlinked_config_is_edited_at_its_target(cfg: Path, tmp_path: Path) -> None:
    link = tmp_path / "link.toml"
    link.symlink_to(cfg)
    assert run(link, "profile", "add", "qa") == 0
    assert link.is_symlink()
    assert "qa" in load_config(cfg).profiles


def test_file_changed_during_the_edit_is_not_overwritten(cfg: Path) -> None:
    hand_edit = BASE.read_text() + "# saved by hand meanwhile\n"

    def edit(doc: TOMLDocument, context: EditContext) -> Sequence[tuple[str, ...]]:
        cfg.write_text(hand_edit)  # an admin's editor saving without the lock
        return edit_profiles.add_profile("qa")(doc, context)

    with pytest.raises(ConfigBusy):
        config_edit.edit_config(cfg, edit, validator(cfg))
    assert cfg.read_text() == hand_edit


def test_edit_changing_more_than_it_declares_is_refused(cfg: Path) -> None:
    def edit(doc: TOMLDocument, context: EditContext) -> Sequence[tuple[str, ...]]:
        doc["daemon"]["allow_other"] = True
        return [("profiles", "Nominal")]

    with pytest.raises(ConfigError, match="more than it should"):
        config_edit.edit_config(cfg, edit, validator(cfg))
    assert cfg.read_bytes() == BASE.read_bytes()


def test_reference_config_survives_a_session_of_edits_byte_for_byte(tmp_path: Path) -> None:
    reference = Path(__file__).parents[1] / "etc" / "deidfs.toml"
    cfg = tmp_path / "deidfs.toml"
    shutil.copyfile(reference, cfg)
    session = [
        ["folder", "add", "edit_ct", str(tmp_path / "ct"), "--profile", "Nominal"],
        ["profile", "add", "EditResearch", "--base", "HIPAA", "--comment", "x"],
        ["folder", "add", "edit_mr", str(tmp_path / "mr"), "--profile", "EditResearch"],
        ["profile", "edit", "EditResearch", "--option=-retain_patient_characteristics"],
        ["profile", "edit", "EditResearch", "--rule", "StationName=dummy"],
        ["profile", "copy", "EditResearch", "EditResearch2"],
    ]
    for args in session:
        assert run(cfg, *args) == 0
    edited = cfg.read_text()
    assert edited.startswith(reference.read_text().split("\n[folders]\n")[0])
    for args in (
        ["profile", "delete", "EditResearch2"],
        ["folder", "remove", "edit_ct"],
        ["folder", "remove", "edit_mr"],
        ["profile", "delete", "EditResearch"],
    ):
        assert run(cfg, *args) == 0
    assert cfg.read_bytes() == reference.read_bytes()


# --------------------------------------------------------------------------------------------
# Placement on other layouts


def edited(text: str, edit: config_edit.Edit, tmp_path: Path) -> str:
    path = tmp_path / "x.toml"
    return config_edit.apply_edit(text, path, edit, validator(path))


def test_first_table_into_an_empty_file(tmp_path: Path) -> None:
    out = edited("", edit_folders.add_folder("a", "/d/a", "HIPAA"), tmp_path)
    assert out == '[folders.a]\npath = "/d/a"\nprofile = "HIPAA"\n'


def test_file_without_final_newline(tmp_path: Path) -> None:
    text = '[folders.a]\npath = "/d/a"\nprofile = "HIPAA"'
    out = edited(text, edit_folders.add_folder("b", "/d/b", "HIPAA"), tmp_path)
    assert out == text + '\n\n[folders.b]\npath = "/d/b"\nprofile = "HIPAA"\n'


def test_section_split_by_another_goes_on_after_its_last_part(tmp_path: Path) -> None:
    text = (
        '[profiles.A]\nbase = "Basic"\n\n[folders.a]\npath = "/d/a"\nprofile = "A"\n\n'
        '[profiles.B]\nbase = "A"\n\n# folder b\n[folders.b]\npath = "/d/b"\nprofile = "B"\n'
    )
    out = edited(text, edit_profiles.add_profile("C"), tmp_path)
    assert out == text.replace(
        '[profiles.B]\nbase = "A"\n\n',
        '[profiles.B]\nbase = "A"\n\n[profiles.C]\nbase = "Basic"\n\n',
    )


def test_delete_takes_the_comment_right_above_and_keeps_the_section_comment(
    tmp_path: Path,
) -> None:
    text = (
        '# head\n\n# ---- profiles ----\n\n# about A\n[profiles.A]\nbase = "Basic"\n'
        '# end of A\n\n# about B\n[profiles.B]\nbase = "Basic"\n'
    )
    out = edited(text, edit_profiles.delete_profile("A"), tmp_path)
    assert out == '# head\n\n# ---- profiles ----\n\n# about B\n[profiles.B]\nbase = "Basic"\n'
    out = edited(text, edit_profiles.delete_profile("B"), tmp_path)
    assert out == (
        '# head\n\n# ---- profiles ----\n\n# about A\n[profiles.A]\nbase = "Basic"\n# end of A\n'
    )


def test_crlf_line_ends_are_kept(tmp_path: Path) -> None:
    text = '[profiles.Nominal]\r\nbase = "Basic"\r\n\r\n[folders.a]\r\npath = "/d/a"\r\n'
    out = edited(text, edit_profiles.add_profile("qa"), tmp_path)
    assert out.count("\n") == out.count("\r\n")
    assert '\r\n\r\n[profiles.qa]\r\nbase = "Basic"\r\n\r\n[folders.a]' in out
    out = edited(text, edit_folders.remove_folder("a"), tmp_path)
    assert out == '[profiles.Nominal]\r\nbase = "Basic"\r\n'


def test_inline_tables_are_edited_in_place(tmp_path: Path) -> None:
    text = '[profiles]\nNominal = { base = "Basic" }  # default\nA = { base = "HIPAA" }\n'
    out = edited(
        text, edit_profiles.edit_profile("A", edit_profiles.ProfileChanges(comment="x")), tmp_path
    )
    assert out.startswith('[profiles]\nNominal = { base = "Basic" }  # default\nA = {')
    assert parse_config(out).profiles["A"].comment == "x"


# --------------------------------------------------------------------------------------------
# Reads


def test_profile_list(cfg: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(cfg, "profile", "list") == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in lines[1:-1]}
    assert rows["Basic"].startswith("Basic *")
    assert " ct " in rows["Nominal"]
    assert rows["research"].split()[1] == "Nominal"
    assert run(cfg, "profile", "list", "--json") == 0
    doc = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert doc["US burned-in"]["folders"] == ["us"]
    assert doc["US burned-in"]["base"] == "+Pixel"
    assert doc["HIPAA"]["builtin"]
    assert not doc["Nominal"]["builtin"]


def test_profile_show(cfg: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(cfg, "profile", "show", "research") == 0
    out = capsys.readouterr().out
    assert "base:         Nominal" in out
    assert "options:      retain_longitudinal_modified_dates, retain_uids" in out
    assert "    (0008,1030) StudyDescription\n" in out
    assert "(0008,103E) SeriesDescription: remove  # series names carry initials" in out
    assert "modality=US: [0,0 640x40]" in out
    table = [line.split() for line in out.splitlines() if line.startswith("(")]
    by_tag = {row[0]: row for row in table}
    assert by_tag["(0008,1030)"][1:4] == ["K", "verbatim", "disabled"]
    assert by_tag["(0008,103E)"][1:5] == ["X", "remove", "custom", "rule"]
    assert len(table) >= 657
    assert run(cfg, "profile", "show", "research", "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["disabled"] == ["(0008,1030)"]
    assert doc["rules"] == [
        {"id": "(0008,103E)", "act": "remove", "note": "series names carry initials"}
    ]
    assert run(cfg, "profile", "show", "nope") == 66


def test_folder_list(cfg: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(cfg, "folder", "list") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "PROFILE", "LAYOUT", "WATCH", "PATH"]
    assert lines[2].split() == ["us", "US", "burned-in", "dicom", "poll", "/data/incoming/us"]
    assert run(cfg, "folder", "list", "--json") == 0
    assert json.loads(capsys.readouterr().out)[0] == {
        "id": "ct",
        "path": "/data/incoming/ct",
        "profile": "Nominal",
        "layout": "dicom",
        "watch": "auto",
    }
