"""Apply a :class:`~deidfs.deid.plan.Plan` to a parsed dataset (PS3.15 Annex E).

:func:`deidentify` never changes its input: it builds a new dataset, copying untouched
elements in their raw, still-encoded form (no decode, no re-encode) and decoding only the
elements an action changes. It recurses into every sequence it keeps. It returns the new
dataset and a :class:`Report` that holds counts and reasons, never a value.

Anything the engine cannot handle safely raises :class:`~deidfs.errors.Refused`.

Here are the walker and :func:`deidentify`; what one element is decided to be, and whether
it is trusted, is :mod:`deidfs.deid.element_rules` (shared with the verifier), the value
helpers :mod:`deidfs.deid.engine_values`, what the walk knows of one instance
:mod:`deidfs.deid.engine_context`, and the date, time and age rules
:mod:`deidfs.deid.engine_dates`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID
from pydicom.uid import UID_dictionary as _REGISTERED_UIDS  # type: ignore[attr-defined]

from deidfs import __version__
from deidfs.deid.attribute_types import TOP_LEVEL, placements
from deidfs.deid.dictionary import TEXT_VRS, VALUE_SIZES, length_fits, text_is_clean
from deidfs.deid.element_rules import (
    _VALUE_KEPT,
    ITEMS_SERVED,
    MISPLACED_GROUP,
    distrust,
    element_decision,
    item_scrub,
)
from deidfs.deid.engine_context import _Context
from deidfs.deid.engine_dates import _AGE, _age_over, _modify_dates
from deidfs.deid.engine_values import (
    _DUMMY_BY_VR,
    _DUMMY_TEXT,
    _NUMERIC_VRS,
    _STRING_VRS,
    BURNED_IN_ANNOTATION,
    PATIENT_AGE,
    PATIENT_BIRTH_DATE,
    PATIENT_ID,
    PATIENT_NAME,
    SOP_CLASS_UID,
    SOP_INSTANCE_UID,
    SPECIFIC_CHARACTER_SET,
    _element,
    _empty,
    _fit,
    _plain,
    _raw_value,
    _text_bytes,
    _value_length,
    _values,
    _vr_of,
)
from deidfs.deid.outcome import (
    ENCAPSULATED_DOCUMENT_CLASSES,
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    MEDIA_DIRECTORY_CLASS,
    UID_TEXT,
    Report,
)
from deidfs.deid.pixels import PixelDecision, PixelPolicy, decide, image_info
from deidfs.deid.plan import Decision, Op, Plan, Source, basic_dummies
from deidfs.deid.profiles import DateModification
from deidfs.deid.pseudonym import Pseudonymizer
from deidfs.deid.standard import Action, Option, method_codes
from deidfs.deid.tags import keyword_of
from deidfs.deid.trust import REASONS, STRUCTURAL
from deidfs.errors import Refused

_SAFE_VR_MISMATCH = Decision(
    Op.REMOVE, Action.REMOVE, Source.PRIVATE, note="VR differs from Table E.3.10-1"
)


@dataclass(frozen=True, slots=True)
class Result:
    """The de-identified header (with ``file_meta``), optional trailer, and the report."""

    dataset: Dataset
    trailer: Dataset | None
    report: Report


# -- date helpers ------------------------------------------------------------------------------


# -- element operations ------------------------------------------------------------------------
def _convert(raw: RawDataElement | DataElement, ctx: _Context, src: Dataset) -> DataElement:
    if isinstance(raw, DataElement):
        return raw
    try:
        return convert_raw_data_element(raw, encoding=ctx.charset, ds=src)
    except Exception as exc:
        raise Refused("bad_value", f"element {int(raw.tag):08X}: {type(exc).__name__}") from exc


class _Walker:
    """Walks one dataset level; recursion creates a walker per sequence item."""

    def __init__(self, ctx: _Context, scrub: Op | None = None, parent: int = TOP_LEVEL) -> None:
        self.ctx = ctx
        self.scrub = scrub  #: Op.DUMMY or Op.CLEAN inside a D or C sequence (_SCRUB_VRS)
        self.parent = parent  #: the tag of the sequence whose items this walks

    def dataset(self, src: Dataset) -> Dataset:
        ctx = self.ctx
        out = Dataset()
        out.set_original_encoding(ctx.implicit, ctx.little, ctx.charset)
        out_dict = out._dict
        creators: dict[int, str] = {}
        kept_private_blocks: set[tuple[int, int]] = set()
        private_out: dict[int, RawDataElement | DataElement] = {}
        for key, stored in src._dict.items():
            tag = int(key)
            raw = stored
            if isinstance(stored, RawDataElement) and stored.value is None:
                raw = src.get_item(key)  # get_item converts a raw element without value
            if tag >> 16 & 1:
                self._private(src, tag, raw, creators, kept_private_blocks, private_out)
                continue
            decision = element_decision(ctx.plan, tag, raw, self.scrub, ctx.places, self.parent)
            if decision is MISPLACED_GROUP:
                ctx.counts[Op.REMOVE.value] += 1
                ctx.counts["misplaced_group_removed"] += 1
                continue
            elem = self.apply(src, tag, raw, decision)
            if elem is not None:
                if elem.VR == "SQ":
                    out[tag] = elem
                else:
                    # What Dataset.__setitem__ does for a public element that is not a
                    # sequence, into a new data set, without its checks (a tenth of the walk).
                    out_dict[elem.tag] = elem
        # A private creator is kept only when an element of its block is kept.
        for tag, elem in private_out.items():
            if (tag & 0xFFFF) <= 0xFF and (tag >> 16, tag & 0xFF) not in kept_private_blocks:
                if (tag & 0xFFFF) >= 0x10:
                    ctx.counts[Op.REMOVE.value] += 1
                continue
            out[tag] = elem
        return out

    def _private(
        self,
        src: Dataset,
        tag: int,
        raw: RawDataElement | DataElement,
        creators: dict[int, str],
        kept_blocks: set[tuple[int, int]],
        private_out: dict[int, RawDataElement | DataElement],
    ) -> None:
        ctx = self.ctx
        group, elem_no = tag >> 16, tag & 0xFFFF
        if elem_no == 0 or elem_no < 0x10:
            ctx.counts[Op.REMOVE.value] += 1
            return
        if elem_no <= 0xFF:  # private creator: decided after its block
            private_out[tag] = raw
            value = _raw_value(src, tag, ctx.charset)
            creators[(group << 8) | elem_no] = _plain(value)
            return
        block = elem_no >> 8
        creator = creators.get((group << 8) | block)
        decision = ctx.plan.decide_private(tag, creator)
        if decision.source is Source.OPTION and creator is not None:
            # Listed for this creator, but the table vouches only for the VR it names.
            vrs = ctx.plan.safe_private_vrs(tag, creator)
            if vrs and raw.VR not in (None, "UN") and raw.VR not in vrs:
                decision = _SAFE_VR_MISMATCH
            elif vrs == {"SQ"} and raw.VR in (None, "UN") and isinstance(raw, RawDataElement):
                # Implicit VR (or UN): only the table says it is a sequence, and a kept
                # sequence is de-identified inside, never passed through as opaque bytes.
                raw = raw._replace(VR="SQ")
        elem = self.apply(src, tag, raw, decision)
        if elem is not None:
            private_out[tag] = elem
            kept_blocks.add((group, block))

    def apply(
        self, src: Dataset, tag: int, raw: RawDataElement | DataElement, decision: Decision
    ) -> RawDataElement | DataElement | None:
        ctx = self.ctx
        op = decision.op
        if op in _VALUE_KEPT or tag in STRUCTURAL:
            why = distrust(tag, decision, raw, implicit=ctx.implicit)
            if why is not None:
                if tag in STRUCTURAL:
                    raise Refused("untrusted_attribute", f"element {tag:08X}: {REASONS[why]}")
                # Not the attribute the profile keeps: removed, whatever it holds.
                ctx.counts[Op.REMOVE.value] += 1
                ctx.counts[f"untrusted_{why}_removed"] += 1
                return None
        ctx.counts[op.value] += 1
        if op is Op.REMOVE:
            return None
        vr = _vr_of(raw, tag)
        if (
            op in (Op.KEEP, Op.VERBATIM)
            and vr in VALUE_SIZES
            and not length_fits(tag, vr, _value_length(raw, vr))
        ):
            raise Refused("bad_value", "a kept number's length does not fit its VR and VM")
        if op in (Op.KEEP, Op.VERBATIM) and vr in TEXT_VRS and not text_is_clean(_text_bytes(raw)):
            raise Refused("bad_value", "a kept text value holds control bytes")
        if op is Op.VERBATIM:
            return raw
        if op is Op.KEEP:
            if vr != "SQ":
                if tag == PATIENT_AGE and ctx.plan.profile.max_age is not None:
                    return self._capped_age(src, tag, raw)
                return raw
            return self._sequence(src, tag, raw, op)
        table_sourced = decision.source in (Source.BASIC, Source.OPTION)
        if table_sourced and tag in (PATIENT_ID, PATIENT_NAME) and op in (Op.EMPTY, Op.DUMMY):
            # Z and Z/D allow a dummy: the keyed patient token keeps patients grouped.
            return DataElement(tag, vr, ctx.patient_token)
        if op is Op.EMPTY:
            return _empty(tag, vr)
        if vr == "SQ":
            if op in ITEMS_SERVED:
                # D and C on a sequence: keep its structure (a Type 1 sequence keeps its
                # items), de-identify every item with the same plan (each nested attribute
                # has its own row), and dummy (D) or clean (C) the text the table does not
                # list, which a recursion alone would keep (e.g. Text Value in Content
                # Sequence, Code Meaning in Person Identification Code Sequence).
                return self._sequence(src, tag, raw, op)
            return _empty(tag, vr)
        if op is Op.UID or (vr == "UI" and op in (Op.DUMMY, Op.PSEUDONYM, Op.CLEAN)):
            return self._uids(src, tag, raw, vr, decision)
        if op is Op.DUMMY:
            return self._dummy(src, tag, raw, vr)
        if op is Op.PSEUDONYM:
            return self._pseudonym(src, tag, raw, vr)
        if op is Op.SHIFT:
            return self._dates(src, tag, raw, vr, shift=True)
        if op is Op.CLEAN:
            if vr in ("DA", "DT", "TM"):
                return self._dates(src, tag, raw, vr, shift=False)
            if vr in _STRING_VRS:
                return self._clean_text(src, tag, raw, vr)
            ctx.notes.add("clean_binary_removed")
            return None
        raise AssertionError(op)  # pragma: no cover

    # -- operations needing the value -----------------------------------------------------------
    def _sequence(
        self, src: Dataset, tag: int, raw: RawDataElement | DataElement, op: Op
    ) -> DataElement:
        elem = _convert(raw, self.ctx, src)
        items = elem.value if elem.VR == "SQ" else None
        if items is None:
            raise Refused("bad_sequence", f"element {tag:08X} is not a readable sequence")
        walker = _Walker(self.ctx, item_scrub(self.scrub, op), tag)
        return DataElement(tag, "SQ", Sequence([walker.dataset(item) for item in items]))

    def _uids(
        self, src: Dataset, tag: int, raw: RawDataElement | DataElement, vr: str, d: Decision
    ) -> DataElement | None:
        if vr != "UI":
            self.ctx.counts["uid_on_non_ui_removed"] += 1
            return None
        values = _values(_convert(raw, self.ctx, src).value)
        out = []
        for v in values:
            text = str(v).strip().rstrip("\x00")
            if d.source is Source.DEFAULT and (text in _REGISTERED_UIDS or not text):
                out.append(text)  # a registered UID (class, transfer syntax): no instance data
            else:
                out.append(self.ctx.pseudo.uid(text))
        return _element(tag, "UI", [UID(v) for v in out] if out else "")

    def _dummy(
        self, src: Dataset, tag: int, raw: RawDataElement | DataElement, vr: str
    ) -> DataElement | None:
        if vr in ("LO", "SH") and self._is_identifier(tag):
            return self._pseudonym(src, tag, raw, vr)
        if vr in _DUMMY_BY_VR:
            return DataElement(tag, vr, _DUMMY_BY_VR[vr])
        if vr in _STRING_VRS:
            return DataElement(tag, vr, _fit(vr, _DUMMY_TEXT))
        if vr in ("US", "SS", "UL", "SL", "UV", "SV"):
            return DataElement(tag, vr, 0)
        if vr in ("FL", "FD"):
            return DataElement(tag, vr, 0.0)
        if vr in ("OB", "OW", "OD", "OF", "OL", "OV", "UN"):
            return DataElement(tag, vr, b"\x00\x00")
        return _empty(tag, vr)

    @staticmethod
    def _is_identifier(tag: int) -> bool:
        kw = keyword_of(tag)
        return kw.endswith(("ID", "Number", "Identifier"))

    def _pseudonym(
        self, src: Dataset, tag: int, raw: RawDataElement | DataElement, vr: str
    ) -> DataElement | None:
        ctx = self.ctx
        if vr in ("DA", "DT", "TM"):
            return self._dates(src, tag, raw, vr, shift=True)
        if vr in _NUMERIC_VRS or vr not in _STRING_VRS:
            return _empty(tag, vr)
        values = _values(_convert(raw, ctx, src).value)
        if tag in (PATIENT_ID, PATIENT_NAME):
            tokens = [ctx.patient_token for _ in values] or [ctx.patient_token]
        else:
            tokens = [ctx.pseudo.token(str(v), "id") for v in values]
        if vr == "PN":
            tokens = ["ANON^" + t for t in tokens]
        return _element(tag, vr, [_fit(vr, t) for t in tokens] if tokens else "")

    def _dates(
        self, src: Dataset, tag: int, raw: RawDataElement | DataElement, vr: str, *, shift: bool
    ) -> DataElement | None:
        if vr not in ("DA", "DT", "TM"):
            self.ctx.counts["date_op_on_non_date_removed"] += 1
            return None
        values = _values(_convert(raw, self.ctx, src).value)
        if not values:
            return _empty(tag, vr)
        year_only = self.ctx.plan.profile.date_modification is DateModification.YEAR
        if vr == "TM" and not shift and year_only and tag in basic_dummies():
            # Year only keeps no time of day; where the Basic Profile gives the attribute a
            # dummy (D: Content Time, Type 1 in SR and enhanced images) it is midnight.
            self.ctx.notes.add("time_of_day_midnight")
            return _element(tag, vr, [_DUMMY_BY_VR["TM"] for _ in values])
        out = _modify_dates(vr, values, self.ctx, shift=shift)
        if out is None:
            self.ctx.notes.add("unparseable_date_emptied")
            return _empty(tag, vr)
        return _element(tag, vr, out)

    def _clean_text(
        self, src: Dataset, tag: int, raw: RawDataElement | DataElement, vr: str
    ) -> DataElement:
        values = _values(_convert(raw, self.ctx, src).value)
        pattern = self.ctx.phi_pattern()
        out = []
        for v in values:
            text = str(v)
            if pattern is not None:
                text = pattern.sub("", text)
            text = re.sub(r"\s{2,}", " ", text).strip(" ,;:-")
            out.append(_fit(vr, text))
        return _element(tag, vr, out if any(out) else "")

    def _capped_age(
        self, src: Dataset, tag: int, raw: RawDataElement | DataElement
    ) -> RawDataElement | DataElement:
        max_age = self.ctx.plan.profile.max_age
        assert max_age is not None
        text = _plain(_convert(raw, self.ctx, src).value)
        m = _AGE.match(text)
        if m is None and text:
            # Not an age string ("95 years"): it cannot be capped, so it is not kept.
            self.ctx.notes.add("age_unparseable_emptied")
            return DataElement(tag, "AS", "")
        if m and m.group(2) == "Y" and int(m.group(1)) > max_age:
            self.ctx.notes.add("age_capped")
            return DataElement(tag, "AS", f"{max_age + 1:03d}Y")
        return raw


def _method_codes(plan: Plan, *, pixels_cleaned: bool = False) -> Sequence:
    options = set(plan.options)
    if pixels_cleaned:
        options.add(Option.CLEAN_PIXEL_DATA)  # masks cleaned this instance's pixels
    items = []
    for code in method_codes(options):
        item = Dataset()
        item.CodeValue = code.value
        item.CodingSchemeDesignator = code.scheme
        item.CodeMeaning = code.meaning
        items.append(item)
    return Sequence(items)


def _transfer_syntax(ds: Dataset, implicit: bool, little: bool) -> str:
    meta = getattr(ds, "file_meta", None)
    ts = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    if ts:
        return str(ts)
    if implicit:
        return "1.2.840.10008.1.2"
    return "1.2.840.10008.1.2.1" if little else "1.2.840.10008.1.2.2"


def _check_refusals(ds: Dataset, plan: Plan, has_pixels: bool, sop_class: str) -> None:
    if sop_class == MEDIA_DIRECTORY_CLASS:
        raise Refused("dicomdir", "DICOMDIR files are not served")
    if sop_class in ENCAPSULATED_DOCUMENT_CLASSES:
        raise Refused("encapsulated_document", "encapsulated documents cannot be cleaned")


def _pixel_decision(
    ds: Dataset, plan: Plan, has_pixels: bool, sop_class: str, transfer_syntax: str
) -> PixelDecision:
    """The pixel rule for this instance (:func:`deidfs.deid.pixels.decide`); withheld ones
    raise here, before any work."""
    if not has_pixels:
        return PixelDecision(PixelPolicy.AS_IS)
    decision = decide(plan.profile, plan.options, image_info(ds, sop_class, transfer_syntax))
    if decision.policy is PixelPolicy.WITHHOLD:
        raise Refused(
            "burned_in_no_mask",
            "the pixels may carry burned-in text and no mask matches (Clean Pixel Data)",
        )
    return decision


def deidentify(
    ds: Dataset,
    plan: Plan,
    pseudonymizer: Pseudonymizer,
    *,
    has_pixels: bool,
    trailer: Dataset | None = None,
) -> Result:
    """De-identify ``ds`` (a header, parsed up to Pixel Data) by ``plan``.

    Parameters
    ----------
    ds
        The parsed dataset, with ``file_meta`` when the source had one. Not modified.
    plan
        The compiled profile.
    pseudonymizer
        Keyed pseudonym source (UIDs, tokens, date shifts).
    has_pixels
        Whether the source has Pixel Data (or Float/Double Float Pixel Data) after ``ds``.
    trailer
        Elements that follow Pixel Data in the source, if any; de-identified the same way.

    Raises
    ------
    Refused
        When the instance cannot be served safely (PS3.15 cannot be applied, bad values,
        pixels that may carry burned-in text under Clean Pixel Data with no mask).
    """
    implicit, little = ds.original_encoding
    if implicit is None or little is None:
        implicit, little = False, True
    charset = ds.original_character_set if SPECIFIC_CHARACTER_SET in ds else None
    meta = getattr(ds, "file_meta", None)
    sop_class = _plain(_raw_value(ds, SOP_CLASS_UID, charset))
    if not sop_class and meta is not None:
        sop_class = str(meta.get("MediaStorageSOPClassUID", "")).strip()
    if sop_class and not UID_TEXT.match(sop_class):
        # Copied into the file meta as it is: a value that is not a UID (a corrupt length
        # that swallowed the elements after it) would carry their bytes there.
        raise Refused("bad_value", "SOP Class UID is not a UID")
    _check_refusals(ds, plan, has_pixels, sop_class)
    ts = _transfer_syntax(ds, bool(implicit), bool(little))
    pixel_rule = _pixel_decision(ds, plan, has_pixels, sop_class, ts)
    if SOP_INSTANCE_UID not in ds or not _plain(_raw_value(ds, SOP_INSTANCE_UID, charset)):
        raise Refused("no_sop_instance_uid", "SOP Instance UID is missing")

    ctx = _Context(
        plan, pseudonymizer, ds, charset, bool(implicit), bool(little), placements(sop_class)
    )
    walker = _Walker(ctx)
    out = walker.dataset(ds)
    out_trailer = walker.dataset(trailer) if trailer is not None and len(trailer) else None

    if SOP_INSTANCE_UID not in out or not _plain(out.SOPInstanceUID):
        raise Refused("no_sop_instance_uid", "the profile removes SOP Instance UID")

    max_age = plan.profile.max_age
    if max_age is not None and PATIENT_BIRTH_DATE in out and _age_over(ds, ctx, max_age):
        out[PATIENT_BIRTH_DATE] = DataElement(PATIENT_BIRTH_DATE, "DA", "")
        ctx.notes.add("birth_date_emptied_age_cap")

    burned_in = _plain(_raw_value(ds, BURNED_IN_ANNOTATION, charset)).upper() == "YES"
    redacted = pixel_rule.policy is PixelPolicy.REDACT
    at_risk = pixel_rule.policy is PixelPolicy.AT_RISK
    if redacted:
        # A mask covered the burned-in text (PS3.3 C.7.6.1.1.6: no burned-in annotation
        # "that identifies the patient" remains).
        out[BURNED_IN_ANNOTATION] = DataElement(BURNED_IN_ANNOTATION, "CS", "NO")
        ctx.notes.add("pixels_masked")
    # Patient Identity Removed covers the pixels too (PS3.3 C.12.1.1.7): not claimed where
    # the source says text is burned in and no mask covered it. Images that merely may
    # carry such text (no flag, a modality where it is usual) are flagged in the report.
    out.PatientIdentityRemoved = "NO" if (burned_in and not redacted) else "YES"
    out.DeidentificationMethod = f"deidfs {__version__} {plan.profile.name}"[:64]
    out.DeidentificationMethodCodeSequence = _method_codes(plan, pixels_cleaned=redacted)
    if Option.RETAIN_LONGITUDINAL_FULL_DATES in plan.options:
        out.LongitudinalTemporalInformationModified = "UNMODIFIED"
    elif Option.RETAIN_LONGITUDINAL_MODIFIED_DATES in plan.options:
        out.LongitudinalTemporalInformationModified = "MODIFIED"
    else:
        out.LongitudinalTemporalInformationModified = "REMOVED"
    for item in out.DeidentificationMethodCodeSequence:
        item.set_original_encoding(ctx.implicit, ctx.little, charset)

    new_meta = FileMetaDataset()
    new_meta.FileMetaInformationVersion = b"\x00\x01"
    new_meta.MediaStorageSOPClassUID = UID(sop_class or "1.2.840.10008.5.1.4.1.1.7")
    new_meta.MediaStorageSOPInstanceUID = UID(str(out.SOPInstanceUID))
    new_meta.TransferSyntaxUID = UID(ts)
    new_meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    new_meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    out.file_meta = new_meta

    report = Report(
        profile=plan.profile.name,
        digest=plan.digest,
        counts=tuple(sorted(ctx.counts.items())),
        burned_in_annotation=burned_in,
        notes=tuple(sorted(ctx.notes)),
        burned_in_risk=at_risk,
        redactions=pixel_rule.rects,
    )
    return Result(out, out_trailer, report)
