"""Generate ``daemon/deidfs/deid/data/ps3.3-attribute-types.json``.

Where PS3.15 Table E.1-1 says X, X/Z, X/Z/D or X/D, the choice between removing, emptying
and a dummy depends on the attribute's Type in its module (PS3.15 E.1.1; PS3.5 7.4). This
script lists, for every IOD, where such an attribute is Type 1/1C or 2/2C: at the top level
or inside items of a named sequence. Everything it does not list is Type 3 (or absent from
the IOD), so the engine removes it.

Input: the PS3.3 tables that highdicom ships in ``highdicom/_standard`` (extracted from
PS3.3 by innolitics/dicom-standard). Usage::

    python -m pip download --no-deps highdicom==0.28.2 -d /tmp/hd
    (cd /tmp/hd && python -m zipfile -e highdicom-0.28.2-py3-none-any.whl .)
    python scripts/generate_attribute_types.py /tmp/hd/highdicom/_standard 0.28.2
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from pydicom.datadict import tag_for_keyword

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "daemon" / "deidfs" / "deid" / "data"
E1_1 = DATA / "ps3.15-2026d-table-E.1-1.json"
OUT = DATA / "ps3.3-attribute-types.json"
SOURCES = ("module_attribute_map.json", "iod_module_map.json", "sop_class_iod_map.json")
#: The Table E.1-1 codes whose concrete action depends on the attribute's Type.
BY_TYPE = frozenset({"X", "X/Z", "X/Z/D", "X/D"})


def _hex_tag(text: str) -> int | None:
    digits = text.strip("()").replace(",", "")
    if len(digits) != 8 or any(c not in "0123456789abcdefABCDEF" for c in digits):
        return None  # a repeating group or the private-attributes row
    return int(digits, 16)


def _relevant_tags() -> set[int]:
    rows = json.loads(E1_1.read_text(encoding="utf-8"))["rows"]
    out = set()
    for row in rows:
        codes = {row["basic_profile"], *row["options"].values()}
        tag = _hex_tag(row["tag"])
        if tag is not None and codes & BY_TYPE:
            out.add(tag)
    return out


def _tag_of(keyword: str) -> int | None:
    tag = tag_for_keyword(keyword)
    return None if tag is None else int(tag)


def main(source: Path, version: str) -> None:
    modules = json.loads((source / SOURCES[0]).read_text(encoding="utf-8"))
    iod_modules = json.loads((source / SOURCES[1]).read_text(encoding="utf-8"))
    sop_iods = json.loads((source / SOURCES[2]).read_text(encoding="utf-8"))
    relevant = _relevant_tags()
    iods = sorted(iod_modules)
    #: (tag, parent, class) -> IOD indexes; class 1 wins over 2 within one IOD
    found: dict[tuple[int, int], dict[int, int]] = {}
    for index, iod in enumerate(iods):
        for module in iod_modules[iod]:
            for attr in modules.get(module["key"], []):
                tag = _tag_of(attr["keyword"])
                kind = str(attr.get("type") or "")
                if tag not in relevant or kind not in ("1", "1C", "2", "2C"):
                    continue
                parent = _tag_of(attr["path"][-1]) if attr["path"] else 0
                if parent is None:
                    continue
                level = 1 if kind.startswith("1") else 2
                place = found.setdefault((tag, parent), {})
                place[index] = min(place.get(index, level), level)
    entries = []
    for (tag, parent), by_iod in sorted(found.items()):
        for level in (1, 2):
            indexes = sorted(i for i, lv in by_iod.items() if lv == level)
            if indexes:
                entries.append([f"{tag:08X}", f"{parent:08X}", level, indexes])
    sop_classes = {uid: iods.index(iod) for uid, iod in sorted(sop_iods.items()) if iod in iods}
    body = {"iods": iods, "sop_classes": sop_classes, "entries": entries}
    blob = json.dumps(body, sort_keys=True, separators=(",", ":"))
    document = {
        "schema": "deidfs-attribute-types/1",
        "what": (
            "Where attributes that PS3.15 Table E.1-1 removes (X, X/Z, X/Z/D, X/D) are "
            "Type 1/1C (level 1) or 2/2C (level 2) in each IOD of PS3.3: entries are "
            "[tag, enclosing sequence tag (00000000: top level), level, IOD indexes]; "
            "anything not listed is Type 3 there"
        ),
        "source": f"highdicom {version} highdicom/_standard (PS3.3 tables extracted by "
        "innolitics/dicom-standard)",
        "source_sha256": {
            name: hashlib.sha256((source / name).read_bytes()).hexdigest() for name in SOURCES
        },
        "acknowledgement": "DICOM PS3.3, © NEMA",
        "content_sha256": hashlib.sha256(blob.encode()).hexdigest(),
        **body,
    }
    # One entry, IOD or SOP Class per line: readable diffs when the tables are regenerated.
    lines = []
    for key, value in document.items():
        if isinstance(value, list | dict) and key != "source_sha256":
            rows = value.items() if isinstance(value, dict) else enumerate(value)
            inner = [
                (f"{json.dumps(k)}: " if isinstance(value, dict) else "") + json.dumps(v)
                for k, v in rows
            ]
            opening, closing = ("{", "}") if isinstance(value, dict) else ("[", "]")
            lines.append(
                f" {json.dumps(key)}: {opening}\n  " + ",\n  ".join(inner) + f"\n {closing}"
            )
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value)}")
    OUT.write_text("{\n" + ",\n".join(lines) + "\n}\n", encoding="utf-8")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
