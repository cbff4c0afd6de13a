"""Which attributes are direct identifiers (what ``deidfs verify`` fails on when kept)."""

from __future__ import annotations

import pytest

from deidfs.deid.identifiers import DirectKind, direct_kind
from deidfs.deid.tags import parse_tag

KINDS = {
    "PatientName": DirectKind.NAME,
    "OperatorsName": DirectKind.NAME,
    "InstitutionName": DirectKind.NAME,
    "StationName": DirectKind.NAME,
    "PatientID": DirectKind.ID,
    "OtherPatientIDs": DirectKind.ID,
    "AccessionNumber": DirectKind.ID,
    "DetectorID": DirectKind.ID,
    "StudyDate": DirectKind.DATE,
    "PatientBirthDate": DirectKind.DATE,
    "AcquisitionDateTime": DirectKind.DATE,
    "InstitutionAddress": DirectKind.ADDRESS,
    "PatientAddress": DirectKind.ADDRESS,
    "PatientTelephoneNumbers": DirectKind.PHONE,
    "DeviceSerialNumber": DirectKind.SERIAL,
    "LensSerialNumber": DirectKind.SERIAL,
    "SOPInstanceUID": DirectKind.UID,
    "FrameOfReferenceUID": DirectKind.UID,
}
NOT_DIRECT = [
    "DeviceDescription",
    "StudyDescription",
    "PatientWeight",
    "PatientSex",
    "PatientAge",
    "StudyTime",
    "TypeOfPatientID",
    "EthnicGroup",
]


@pytest.mark.parametrize(("keyword", "kind"), sorted(KINDS.items()))
def test_direct_identifiers(keyword: str, kind: DirectKind) -> None:
    assert direct_kind(parse_tag(keyword)) is kind


@pytest.mark.parametrize("keyword", NOT_DIRECT)
def test_descriptions_and_characteristics_are_not(keyword: str) -> None:
    assert direct_kind(parse_tag(keyword)) is None


def test_private_and_unknown_attributes_may_hold_anything() -> None:
    assert direct_kind(0x00191023) is DirectKind.UNKNOWN
    assert direct_kind(0x7FFE7777) is DirectKind.UNKNOWN  # in no dictionary or table


def test_attributes_newer_than_the_dictionary_are_judged_by_their_table_name() -> None:
    """(0010,0043) Sex Parameters for Clinical Use Category Sequence: in Table E.1-1."""
    assert direct_kind(0x00100043) is None
