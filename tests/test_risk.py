"""Residual risk: quasi-identifier extraction, patient records, k-anonymity, uniqueness."""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset

from deidfs.deid.plan import compile_plan
from deidfs.deid.profiles import BASIC, HIPAA, Rule
from deidfs.deid.risk import (
    QUASI_IDENTIFIERS,
    DateTreatment,
    Extractor,
    FileQI,
    PatientRecord,
    assess,
    assess_files,
    date_treatment,
    patient_records,
)
from deidfs.deid.standard import Option

CHARACTERISTICS = BASIC.derive(
    "Characteristics", options=frozenset({Option.RETAIN_PATIENT_CHARACTERISTICS})
)


def served(patient: str, study: str = "2.25.1", **attrs: Any) -> Dataset:
    """A dataset shaped like a served (de-identified) one."""
    ds = Dataset()
    ds.PatientID = patient
    ds.StudyInstanceUID = study
    ds.Modality = "CT"
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


def five_patients() -> list[Dataset]:
    """E is alone on (sex, age, manufacturer); A+B and C+D share classes."""
    return [
        served("A", "2.25.1", PatientSex="M", PatientAge="045Y", Manufacturer="GE"),
        served("B", "2.25.2", PatientSex="M", PatientAge="045Y", Manufacturer="GE"),
        served("C", "2.25.3", PatientSex="F", PatientAge="060Y", Manufacturer="SIEMENS"),
        served("D", "2.25.4", PatientSex="F", PatientAge="060Y", Manufacturer="SIEMENS"),
        served("E", "2.25.5", PatientSex="F", PatientAge="045Y", Manufacturer="PHILIPS"),
    ]


def test_unique_patient_is_named_with_the_attributes_responsible() -> None:
    ex = Extractor(compile_plan(CHARACTERISTICS))
    result = assess_files(ex.extract(ds) for ds in five_patients())
    assert result.patients == 5
    assert result.k == 1
    assert result.unique == 1
    assert result.unique_share == 0.2
    assert set(result.retained) == {"PatientSex", "PatientAge", "Modality", "Manufacturer"}
    (u,) = result.unique_patients
    assert u.patient == "E"
    assert u.singled_out_by == ("Manufacturer",)
    assert set(u.removal_sets) == {
        ("PatientSex", "Manufacturer"),
        ("PatientAge", "Manufacturer"),
    }
    by_qi = {r.qi: r for r in result.responsibility}
    assert by_qi["Manufacturer"].in_every_set == 1
    assert by_qi["Manufacturer"].singles_out == 1
    assert by_qi["Manufacturer"].in_smallest_set == 1  # counted once per patient
    assert by_qi["PatientSex"].in_smallest_set == 1
    assert by_qi["PatientAge"].in_smallest_set == 1
    assert "Modality" not in by_qi  # shared by everybody: never responsible
    assert [(c.size, c.classes, c.patients) for c in result.class_sizes] == [(1, 1, 1), (2, 2, 4)]
    assert result.average_risk == 3 / 5
    assert result.max_risk == 1.0


def test_removing_the_responsible_attributes_raises_k() -> None:
    """The served data under a profile removing them carries none: one class of five."""
    datasets = five_patients()
    for ds in datasets:
        for keyword in ("PatientSex", "PatientAge", "Manufacturer"):
            delattr(ds, keyword)
    result = assess_files(Extractor(compile_plan(BASIC)).extract(ds) for ds in datasets)
    assert result.k == 5
    assert result.unique == 0
    assert result.unique_patients == ()
    assert result.retained == ("Modality",)


def test_value_summaries_count_patients_and_distinct_values() -> None:
    result = assess_files(
        Extractor(compile_plan(CHARACTERISTICS)).extract(ds) for ds in five_patients()
    )
    summary = {s.qi.name: s for s in result.summaries}
    assert summary["Manufacturer"].distinct == 3
    assert summary["Manufacturer"].values == (("GE", 2), ("SIEMENS", 2), ("PHILIPS", 1))
    assert summary["PatientSex"].values == (("F", 3), ("M", 2))
    assert not summary["PatientWeight"].retained
    assert summary["PatientWeight"].patients_with_value == 0
    assert len(result.summaries) == len(QUASI_IDENTIFIERS)


def test_multi_study_patient_record_is_the_set_of_its_values() -> None:
    """A patient seen at 45 and 46 matches only a patient seen at exactly those ages."""
    ex = Extractor(compile_plan(CHARACTERISTICS))
    files = [
        ex.extract(served("A", "2.25.1", PatientAge="045Y")),
        ex.extract(served("A", "2.25.2", PatientAge="046Y")),
        ex.extract(served("B", "2.25.3", PatientAge="045Y")),
        ex.extract(served("C", "2.25.4", PatientAge="045Y")),
    ]
    records = {r.patient: r for r in patient_records(files)}
    assert records["A"].value("PatientAge") == ("045Y", "046Y")
    assert records["A"].studies == 2
    assert records["A"].files == 2
    result = assess(list(records.values()))
    assert result.k == 1
    assert [u.patient for u in result.unique_patients] == ["A"]
    assert result.unique_patients[0].removal_sets == (("PatientAge",),)


def test_files_without_patient_id_are_grouped_by_study() -> None:
    ex = Extractor(compile_plan(BASIC))
    a = served("", "2.25.7")
    b = served("", "2.25.7")
    c = served("", "2.25.8")
    records = patient_records(ex.extract(ds) for ds in (a, b, c))
    assert [(r.patient, r.files) for r in records] == [("study:2.25.7", 2), ("study:2.25.8", 1)]


def test_date_treatments_follow_the_plan() -> None:
    basic = compile_plan(BASIC)
    assert date_treatment(basic, 0x00080020) is DateTreatment.ABSENT
    hipaa = compile_plan(HIPAA)
    assert date_treatment(hipaa, 0x00080020) is DateTreatment.YEAR
    assert date_treatment(hipaa, 0x00100030) is DateTreatment.ABSENT  # birth date is Z
    modified = compile_plan(
        BASIC.derive("Shifted", options=frozenset({Option.RETAIN_LONGITUDINAL_MODIFIED_DATES}))
    )
    assert date_treatment(modified, 0x00080020) is DateTreatment.SHIFTED
    full = compile_plan(
        BASIC.derive("Full", options=frozenset({Option.RETAIN_LONGITUDINAL_FULL_DATES}))
    )
    assert date_treatment(full, 0x00080020) is DateTreatment.REAL


def test_year_only_dates_count_by_year() -> None:
    ex = Extractor(compile_plan(HIPAA))
    f = ex.extract(served("A", StudyDate="20210101", PatientBirthDate="19700101"))
    assert ("StudyDate", "2021") in f.values
    assert not any(name == "PatientBirthDate" for name, _ in f.values)  # emptied by HIPAA


def test_shifted_dates_count_as_intervals_only() -> None:
    """Shifted dates are not linkable; the age at the study and the gaps between studies are."""
    profile = BASIC.derive(
        "Shift",
        options=frozenset({Option.RETAIN_LONGITUDINAL_MODIFIED_DATES}),
        rules=(Rule.parse("PatientBirthDate", "shift"),),
    )
    ex = Extractor(compile_plan(profile))
    files = [
        ex.extract(served("A", "2.25.1", StudyDate="20200110", PatientBirthDate="19900110")),
        ex.extract(served("A", "2.25.2", StudyDate="20200210", PatientBirthDate="19900110")),
    ]
    names = {name for f in files for name, _ in f.values}
    assert "StudyDate" not in names
    assert "PatientBirthDate" not in names
    (record,) = patient_records(files)
    assert record.value("AgeAtStudyDays") == ("10957", "10988")
    assert record.value("StudyIntervalDays") == ("31",)


def test_kept_dates_count_at_full_precision() -> None:
    profile = BASIC.derive("KeepDate", rules=(Rule.parse("StudyDate", "keep"),))
    f = Extractor(compile_plan(profile)).extract(served("A", StudyDate="20200110"))
    assert ("StudyDate", "20200110") in f.values


def test_no_patients() -> None:
    result = assess(())
    assert result.k is None
    assert result.unique == 0
    assert result.unique_share == 0.0
    assert result.max_risk == 0.0


def test_single_patient_cannot_be_merged() -> None:
    result = assess_files([FileQI("A", "2.25.1", (("Modality", "CT"),))])
    assert result.k == 1
    (u,) = result.unique_patients
    assert u.removal_sets == ()
    assert not u.analyzed


def test_analysis_is_capped_but_every_unique_patient_is_counted() -> None:
    files = [FileQI(str(i), f"2.25.{i}", (("PatientAge", f"{i:03d}Y"),)) for i in range(10)]
    result = assess(patient_records(files), max_analyzed=3)
    assert result.unique == 10
    assert sum(u.analyzed for u in result.unique_patients) == 3
    assert all(u.singled_out_by == ("PatientAge",) for u in result.unique_patients)


NAMES = ("PatientSex", "PatientAge", "Manufacturer", "BodyPartExamined")


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(*(st.sampled_from(("a", "b", "")) for _ in NAMES)), min_size=2, max_size=12)
)
def test_minimal_removal_sets_match_brute_force(rows: list[tuple[str, ...]]) -> None:
    records = [
        PatientRecord(
            f"P{i:02d}",
            1,
            1,
            tuple(
                (
                    q.name,
                    (row[NAMES.index(q.name)],)
                    if q.name in NAMES and row[NAMES.index(q.name)]
                    else (),
                )
                for q in QUASI_IDENTIFIERS
            ),
        )
        for i, row in enumerate(rows)
    ]
    result = assess(records)
    retained = result.retained
    tuples = {r.patient: tuple(r.value(n) for n in retained) for r in records}
    sizes = {t: list(tuples.values()).count(t) for t in tuples.values()}
    assert result.k == min(sizes.values())
    assert result.unique == sum(1 for t in tuples.values() if sizes[t] == 1)
    for u in result.unique_patients:
        mine = tuples[u.patient]
        merging = []
        for size in range(len(retained) + 1):
            for subset in itertools.combinations(range(len(retained)), size):
                keep = [j for j in range(len(retained)) if j not in subset]
                if any(
                    other != u.patient and all(t[j] == mine[j] for j in keep)
                    for other, t in tuples.items()
                ):
                    merging.append(frozenset(subset))
        minimal = {s for s in merging if not any(o < s for o in merging)}
        expected = {tuple(retained[j] for j in sorted(s)) for s in minimal}
        assert u.removal_set_count == len(expected)
        assert set(u.removal_sets) <= expected
        assert len(u.removal_sets) == min(len(expected), 5)
        if u.removal_sets:
            assert len(u.removal_sets[0]) == min(len(s) for s in minimal)
