"""Residual re-identification risk of de-identified data: quasi-identifiers and k-anonymity.

Pure: it reads de-identified datasets *as served* and returns frozen results; no I/O.

Model (what the report explains to the privacy officer)
--------------------------------------------------------
Quasi-identifiers (QIs)
    Attributes an adversary may know about a person from elsewhere (a registry, a hospital
    record, what they saw) and use to single out that person's images: patient
    characteristics, dates and intervals, acquisition, device and institution attributes,
    descriptions. :data:`QUASI_IDENTIFIERS` is the catalog; attributes are read at the top
    level of each served file. A QI is *retained* when at least one served file carries a
    non-empty value for it.
Dates
    A served date counts as a QI only in the form an adversary can link: a date kept as is is
    a QI at full precision; a date reduced to its year is a QI by year; a date shifted by the
    keyed per-patient offset is not linkable by itself, but the *intervals* between shifted
    dates of one patient are real, so the age at the study in days (birth to study) and the
    days between a patient's studies are QIs. Dummy, emptied and removed dates are not.
Patients
    A patient is the served (pseudonymized) Patient ID. Files without one are grouped by
    their served Study Instance UID (one pseudo-patient per study), which can only split a
    person into several records.
Multi-study patients
    A patient's record holds, for every QI, the *set* of distinct served values over all of
    the patient's files (studies, series, instances). Two patients are in the same
    equivalence class when all their sets are equal. A patient seen at ages 45 and 46 is
    therefore matched only by another patient seen at exactly those ages. This errs on the
    side of more uniqueness, as an Expert Determination should.
k-anonymity
    k is the size of the smallest equivalence class over the retained QIs. A patient in a
    class of size 1 is *unique*. Average risk is the number of classes divided by the number
    of patients (the mean over patients of 1 / class size); the maximum risk is 1 / k.
Why a unique patient is unique
    For a unique patient P and any other patient Q, let D(P, Q) be the QIs on which their
    records differ. Suppressing every QI in a set S merges P with Q exactly when D(P, Q) is a
    subset of S. The *minimal removal sets* of P are the minimal D(P, Q) by inclusion: no
    smaller set of QIs would merge P with anybody. *Singled out by* names the QIs whose value
    no other patient shares.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from deidfs.deid.plan import Op, Plan
from deidfs.deid.profiles import DateModification

PATIENT_ID = 0x00100020
STUDY_INSTANCE_UID = 0x0020000D
PATIENT_BIRTH_DATE = 0x00100030
#: Where a study's date is read from, in order of preference.
STUDY_DATE_TAGS = (0x00080020, 0x00080021, 0x00080022, 0x00080023)

#: Unique patients whose minimal removal sets are computed (each costs one pass over all
#: patients); the rest are counted, and listed with the attributes that single them out.
MAX_ANALYZED_UNIQUE = 2000
#: Minimal removal sets kept per unique patient, smallest first.
MAX_REMOVAL_SETS = 5
#: Most frequent values listed per QI.
MAX_LISTED_VALUES = 20


class QIGroup(Enum):
    """The kind of knowledge a quasi-identifier stands for."""

    PATIENT = "patient characteristics"
    DATES = "dates and intervals"
    ACQUISITION = "acquisition"
    DEVICE = "device"
    INSTITUTION = "institution"
    DESCRIPTION = "descriptions"


@dataclass(frozen=True, slots=True)
class QuasiIdentifier:
    """One entry of the catalog: a served attribute, or a value derived from served dates."""

    name: str
    group: QIGroup
    tag: int | None  #: the attribute read; ``None`` for values derived from dates
    description: str


def _qi(name: str, group: QIGroup, tag: int | None, description: str) -> QuasiIdentifier:
    return QuasiIdentifier(name, group, tag, description)


_P, _D, _A, _V, _I, _S = (
    QIGroup.PATIENT,
    QIGroup.DATES,
    QIGroup.ACQUISITION,
    QIGroup.DEVICE,
    QIGroup.INSTITUTION,
    QIGroup.DESCRIPTION,
)

#: Every quasi-identifier the assessment looks for, in report order.
QUASI_IDENTIFIERS: tuple[QuasiIdentifier, ...] = (
    _qi("PatientSex", _P, 0x00100040, "Patient's Sex"),
    _qi("PatientAge", _P, 0x00101010, "Patient's Age"),
    _qi("PatientSize", _P, 0x00101020, "Patient's Size (m)"),
    _qi("PatientWeight", _P, 0x00101030, "Patient's Weight (kg)"),
    _qi("EthnicGroup", _P, 0x00102160, "Ethnic Group"),
    _qi("Occupation", _P, 0x00102180, "Occupation"),
    _qi("SmokingStatus", _P, 0x001021A0, "Smoking Status"),
    _qi("PregnancyStatus", _P, 0x001021C0, "Pregnancy Status"),
    _qi("PatientBirthDate", _D, PATIENT_BIRTH_DATE, "birth date as served (kept or year only)"),
    _qi("StudyDate", _D, 0x00080020, "study date as served (kept or year only)"),
    _qi("AgeAtStudyDays", _D, None, "days from birth to study (both dates shifted alike)"),
    _qi("StudyIntervalDays", _D, None, "days between the patient's studies (shifted dates)"),
    _qi("Modality", _A, 0x00080060, "Modality"),
    _qi("BodyPartExamined", _A, 0x00180015, "Body Part Examined"),
    _qi("Manufacturer", _V, 0x00080070, "Manufacturer"),
    _qi("ManufacturerModelName", _V, 0x00081090, "Manufacturer's Model Name"),
    _qi("StationName", _V, 0x00081010, "Station Name"),
    _qi("DeviceSerialNumber", _V, 0x00181000, "Device Serial Number"),
    _qi("InstitutionName", _I, 0x00080080, "Institution Name"),
    _qi("InstitutionAddress", _I, 0x00080081, "Institution Address"),
    _qi("InstitutionalDepartmentName", _I, 0x00081040, "Institutional Department Name"),
    _qi("StudyDescription", _S, 0x00081030, "Study Description"),
    _qi("SeriesDescription", _S, 0x0008103E, "Series Description"),
    _qi("ProtocolName", _S, 0x00181030, "Protocol Name"),
)
QI_BY_NAME: Mapping[str, QuasiIdentifier] = {q.name: q for q in QUASI_IDENTIFIERS}
_DATE_QIS = frozenset({"PatientBirthDate", "StudyDate"})


class DateTreatment(Enum):
    """What a served date attribute still says about the real date."""

    REAL = "kept"  #: the real date
    YEAR = "year only"  #: the real year
    SHIFTED = "shifted per patient"  #: moved by the patient's keyed offset; intervals are real
    ABSENT = "removed, emptied or dummy"


def date_treatment(plan: Plan, tag: int) -> DateTreatment:
    """How ``plan`` treats the date attribute ``tag`` (see :mod:`deidfs.deid.engine`)."""
    op = plan.decide(tag).op
    if op in (Op.KEEP, Op.VERBATIM):
        return DateTreatment.REAL
    if op in (Op.SHIFT, Op.PSEUDONYM):
        return DateTreatment.SHIFTED
    if op is Op.CLEAN:
        if plan.profile.date_modification is DateModification.YEAR:
            return DateTreatment.YEAR
        return DateTreatment.SHIFTED
    return DateTreatment.ABSENT


@dataclass(frozen=True, slots=True)
class FileQI:
    """The quasi-identifiers of one served file."""

    patient: str  #: served Patient ID, or ``study:<served Study Instance UID>`` without one
    study: str  #: served Study Instance UID
    values: tuple[tuple[str, str], ...]  #: (QI name, served value), non-empty values only
    shifted_study_date: str = ""  #: the served study date when it is shifted (for intervals)


def _texts(ds: Dataset, tag: int) -> tuple[str, ...]:
    """Non-empty served values of ``tag`` as text; an undecodable value counts as absent."""
    try:
        elem = ds.get(tag)
    except Exception:  # a value pydicom cannot decode is not something a reader sees either
        return ()
    if elem is None or elem.VR == "SQ":
        return ()
    value: Any = elem.value
    items = list(value) if isinstance(value, list | MultiValue) else [value]
    out = []
    for v in items:
        if v is None:
            continue
        text = (v.decode("latin-1") if isinstance(v, bytes) else str(v)).strip(" \x00")
        if text:
            out.append(text)
    return tuple(out)


def _date(text: str) -> dt.date | None:
    if len(text) < 8 or not text[:8].isdigit():
        return None
    try:
        return dt.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return None


class Extractor:
    """Reads :class:`FileQI` from de-identified datasets produced under ``plan``."""

    def __init__(self, plan: Plan) -> None:
        self.birth = date_treatment(plan, PATIENT_BIRTH_DATE)
        self.study_dates = tuple((tag, date_treatment(plan, tag)) for tag in STUDY_DATE_TAGS)

    def _study_date(self, ds: Dataset) -> tuple[str, DateTreatment]:
        for tag, treatment in self.study_dates:
            if treatment is DateTreatment.ABSENT:
                continue
            texts = _texts(ds, tag)
            if texts:
                return texts[0], treatment
        return "", DateTreatment.ABSENT

    def extract(self, ds: Dataset) -> FileQI:
        """The quasi-identifiers of one de-identified dataset."""
        values: list[tuple[str, str]] = []
        for qi in QUASI_IDENTIFIERS:
            if qi.tag is None or qi.name in _DATE_QIS:
                continue
            values.extend((qi.name, v) for v in _texts(ds, qi.tag))
        birth_texts = _texts(ds, PATIENT_BIRTH_DATE)
        birth = birth_texts[0] if birth_texts else ""
        study, study_treatment = self._study_date(ds)
        for name, text, treatment in (
            ("PatientBirthDate", birth, self.birth),
            ("StudyDate", study, study_treatment),
        ):
            if not text:
                continue
            if treatment is DateTreatment.REAL:
                values.append((name, text))
            elif treatment is DateTreatment.YEAR and text[:4].isdigit():
                values.append((name, text[:4]))
        shifted_study = study if study_treatment is DateTreatment.SHIFTED else ""
        if shifted_study and birth and self.birth is DateTreatment.SHIFTED:
            born, seen = _date(birth), _date(shifted_study)
            if born is not None and seen is not None:
                values.append(("AgeAtStudyDays", str((seen - born).days)))
        study_uid = next(iter(_texts(ds, STUDY_INSTANCE_UID)), "")
        patient = next(iter(_texts(ds, PATIENT_ID)), "") or f"study:{study_uid}"
        return FileQI(patient, study_uid, tuple(values), shifted_study)


@dataclass(frozen=True, slots=True)
class PatientRecord:
    """A patient's record: for every QI of the catalog, the sorted set of served values."""

    patient: str
    files: int
    studies: int
    values: tuple[tuple[str, tuple[str, ...]], ...]

    def value(self, name: str) -> tuple[str, ...]:
        """The patient's sorted set of served values of the QI ``name``."""
        for qi_name, vals in self.values:
            if qi_name == name:
                return vals
        return ()


def patient_records(files: Iterable[FileQI]) -> tuple[PatientRecord, ...]:
    """Group files by patient into records (see the module docstring), sorted by patient."""
    by_patient: dict[str, list[FileQI]] = defaultdict(list)
    for f in files:
        by_patient[f.patient].append(f)
    records = []
    for patient in sorted(by_patient):
        group = by_patient[patient]
        sets: dict[str, set[str]] = defaultdict(set)
        for f in group:
            for name, value in f.values:
                sets[name].add(value)
        study_dates: dict[str, dt.date] = {}
        for f in group:
            d = _date(f.shifted_study_date) if f.shifted_study_date else None
            if d is not None:
                study_dates.setdefault(f.study, d)
        dates = sorted(set(study_dates.values()))
        for earlier, later in itertools.pairwise(dates):
            sets["StudyIntervalDays"].add(str((later - earlier).days))
        records.append(
            PatientRecord(
                patient=patient,
                files=len(group),
                studies=len({f.study for f in group}),
                values=tuple(
                    (q.name, tuple(sorted(sets.get(q.name, ())))) for q in QUASI_IDENTIFIERS
                ),
            )
        )
    return tuple(records)


@dataclass(frozen=True, slots=True)
class QISummary:
    """One QI over the data set."""

    qi: QuasiIdentifier
    retained: bool
    distinct: int  #: distinct served values over all files
    patients_with_value: int
    values: tuple[tuple[str, int], ...]  #: served value -> patients having it, most first
    more_values: int  #: values not listed in ``values``


@dataclass(frozen=True, slots=True)
class ClassSize:
    """How many equivalence classes have ``size`` patients."""

    size: int
    classes: int
    patients: int


@dataclass(frozen=True, slots=True)
class UniquePatient:
    """A patient alone in its equivalence class, and why."""

    patient: str  #: served Patient ID
    singled_out_by: tuple[str, ...]  #: QIs whose value no other patient has
    removal_sets: tuple[tuple[str, ...], ...]  #: minimal removal sets, smallest first
    removal_set_count: int  #: how many minimal removal sets exist (may exceed those listed)
    analyzed: bool  #: False when beyond :data:`MAX_ANALYZED_UNIQUE` (no removal sets)


@dataclass(frozen=True, slots=True)
class Responsibility:
    """How often a QI is behind a patient's uniqueness."""

    qi: str
    singles_out: int  #: unique patients whose value of this QI nobody else has
    in_smallest_set: int  #: unique patients for whom it is in a smallest removal set
    in_every_set: int  #: unique patients who cannot be merged with anybody while it is kept


@dataclass(frozen=True, slots=True)
class Assessment:
    """The residual risk of a data set."""

    patients: int
    files: int
    studies: int
    retained: tuple[str, ...]  #: names of the retained QIs, catalog order
    summaries: tuple[QISummary, ...]  #: every QI of the catalog
    class_sizes: tuple[ClassSize, ...]  #: ascending size
    k: int | None  #: smallest class size; None without patients
    unique: int
    unique_share: float
    average_risk: float
    unique_patients: tuple[UniquePatient, ...]
    responsibility: tuple[Responsibility, ...]  #: retained QIs, most responsible first

    @property
    def max_risk(self) -> float:
        """1 / k: the re-identification probability of the most exposed patient."""
        return 1.0 / self.k if self.k else 0.0


def _minimal_sets(masks: Iterable[int]) -> list[int]:
    """The masks no other mask is a proper subset of, fewest bits first."""
    kept: list[int] = []
    for mask in sorted(set(masks), key=lambda m: (m.bit_count(), m)):
        if not any(k & mask == k for k in kept):
            kept.append(mask)
    return kept


def _names(mask: int, retained: Sequence[str]) -> tuple[str, ...]:
    return tuple(name for i, name in enumerate(retained) if mask >> i & 1)


def assess(records: Sequence[PatientRecord], max_analyzed: int = MAX_ANALYZED_UNIQUE) -> Assessment:
    """Measure k-anonymity and uniqueness of ``records`` over the retained QIs."""
    n = len(records)
    summaries = []
    retained: list[str] = []
    for qi in QUASI_IDENTIFIERS:
        per_value: Counter[str] = Counter()
        with_value = 0
        for r in records:
            vals = r.value(qi.name)
            per_value.update(vals)
            with_value += bool(vals)
        if per_value:
            retained.append(qi.name)
        listed = sorted(per_value.items(), key=lambda kv: (-kv[1], kv[0]))[:MAX_LISTED_VALUES]
        summaries.append(
            QISummary(
                qi=qi,
                retained=bool(per_value),
                distinct=len(per_value),
                patients_with_value=with_value,
                values=tuple(listed),
                more_values=max(0, len(per_value) - MAX_LISTED_VALUES),
            )
        )
    tuples = [tuple(r.value(name) for name in retained) for r in records]
    classes: Counter[tuple[tuple[str, ...], ...]] = Counter(tuples)
    size_counts: Counter[int] = Counter(classes.values())
    class_sizes = tuple(
        ClassSize(size, count, size * count) for size, count in sorted(size_counts.items())
    )
    unique_idx = [i for i, t in enumerate(tuples) if classes[t] == 1]
    unique_patients, responsibility = _explain(records, tuples, retained, unique_idx, max_analyzed)
    return Assessment(
        patients=n,
        files=sum(r.files for r in records),
        studies=sum(r.studies for r in records),
        retained=tuple(retained),
        summaries=tuple(summaries),
        class_sizes=class_sizes,
        k=min(classes.values()) if classes else None,
        unique=len(unique_idx),
        unique_share=len(unique_idx) / n if n else 0.0,
        average_risk=len(classes) / n if n else 0.0,
        unique_patients=unique_patients,
        responsibility=responsibility,
    )


def _explain(
    records: Sequence[PatientRecord],
    tuples: Sequence[tuple[tuple[str, ...], ...]],
    retained: Sequence[str],
    unique_idx: Sequence[int],
    max_analyzed: int,
) -> tuple[tuple[UniquePatient, ...], tuple[Responsibility, ...]]:
    m = len(retained)
    if not unique_idx or m == 0:
        return (), ()
    # Value ids per column, so record comparison is one vectorized inequality per patient.
    columns = []
    for j in range(m):
        ids: dict[tuple[str, ...], int] = {}
        columns.append([ids.setdefault(t[j], len(ids)) for t in tuples])
    matrix = np.array(columns, dtype=np.int64).T  # patients x retained QIs
    weights = np.array([1 << j for j in range(m)], dtype=np.int64)
    col_freq = [Counter(col) for col in columns]
    singles: Counter[str] = Counter()
    smallest: Counter[str] = Counter()
    every: Counter[str] = Counter()
    out = []
    for rank, i in enumerate(unique_idx):
        singled = tuple(retained[j] for j in range(m) if col_freq[j][columns[j][i]] == 1)
        singles.update(singled)
        if rank >= max_analyzed or len(records) < 2:
            out.append(UniquePatient(records[i].patient, singled, (), 0, analyzed=False))
            continue
        masks = (matrix != matrix[i]) @ weights
        masks = np.delete(masks, i)
        minimal = _minimal_sets(int(x) for x in masks)
        if minimal:
            low = minimal[0].bit_count()
            union = 0
            for mask in minimal:
                if mask.bit_count() == low:
                    union |= mask
            smallest.update(_names(union, retained))
            common = minimal[0]
            for mask in minimal[1:]:
                common &= mask
            every.update(_names(common, retained))
        out.append(
            UniquePatient(
                records[i].patient,
                singled,
                tuple(_names(x, retained) for x in minimal[:MAX_REMOVAL_SETS]),
                len(minimal),
                analyzed=True,
            )
        )
    resp = sorted(
        (
            Responsibility(name, singles[name], smallest[name], every[name])
            for name in retained
            if singles[name] or smallest[name] or every[name]
        ),
        key=lambda r: (-r.in_every_set, -r.in_smallest_set, -r.singles_out, r.qi),
    )
    return tuple(out), tuple(resp)


def assess_files(files: Iterable[FileQI]) -> Assessment:
    """:func:`patient_records` then :func:`assess`."""
    return assess(patient_records(files))
