"""De-identify a header straight from its bytes, for the common case.

:func:`deidentify_header` returns, byte for byte, the header the reference path builds (pydicom
parse up to Pixel Data, :func:`~deidfs.deid.engine.deidentify`, the view encoder of
:mod:`deidfs.view.render`), with the same :class:`~deidfs.deid.outcome.Report`, at a fraction of its
cost: it walks the encoded elements with :mod:`struct`, copies kept elements as the bytes they
are and encodes only what an action changes. Whatever it does not reproduce exactly raises
:class:`Decline`, and the caller takes the reference path: implicit VR, big endian, deflate,
a file without preamble or transfer syntax, a character set that is not ASCII-compatible, text
it would have to decode that is not printable ASCII, clean and date actions, pixel rules, age
caps, a value that does not read back as it was written, any malformed structure, and every
case the engine could refuse.

The reference encoding, as mirrored here:

- elements in ascending tag order; the engine's added attributes (PatientIdentityRemoved,
  DeidentificationMethod, DeidentificationMethodCodeSequence,
  LongitudinalTemporalInformationModified) replace the source's;
- a top-level data set whose Specific Character Set is kept is written from its raw elements;
  every other data set (each sequence item, a top level without Specific Character Set) is
  re-encoded: pydicom decodes each raw value and writes it again, which drops trailing
  padding and the like (:func:`~deidfs.deid.fast_values._reencode` mirrors that, value
  representation by value representation);
- every sequence the engine keeps is rebuilt with defined lengths, sequence and items.

Here are the entry point and what it checks once the walk is done (pixels, refused classes,
the view's name); the walk is :mod:`deidfs.deid.fast_walk` (its parts: :mod:`~deidfs.deid.fast_scan`
reads the elements, :mod:`~deidfs.deid.fast_root` keeps the top-level values,
:mod:`~deidfs.deid.fast_actions` decides what each element becomes), the file meta group is
:mod:`deidfs.deid.fast_meta`, the per-plan tables :mod:`deidfs.deid.fast_tables`, values
:mod:`deidfs.deid.fast_values`, and :class:`Decline` and :class:`NeedMore`, which callers
import from here, are defined with the rest of the vocabulary in :mod:`deidfs.deid.fast_wire`.

Pure: no I/O, no logging.
"""

from __future__ import annotations

from dataclasses import dataclass

from deidfs.deid.fast_meta import _file_meta, _transfer_syntax
from deidfs.deid.fast_tables import _tables
from deidfs.deid.fast_values import _image_info, _plain
from deidfs.deid.fast_walk import _Run
from deidfs.deid.fast_wire import (
    _DEFAULT_SOP_CLASS,
    _IMAGE_PIXEL_TAGS,
    BURNED_IN_ANNOTATION,
    PATIENT_ID,
    SERIES_INSTANCE_UID,
    SOP_CLASS_UID,
    SOP_INSTANCE_UID,
    STUDY_INSTANCE_UID,
    Decline,
    NeedMore,
)
from deidfs.deid.outcome import (
    ENCAPSULATED_DOCUMENT_CLASSES,
    MEDIA_DIRECTORY_CLASS,
    UID_TEXT,
    Report,
)
from deidfs.deid.pixels import ImageInfo, PixelPolicy
from deidfs.deid.pixels import decide as pixel_decision
from deidfs.deid.plan import Plan
from deidfs.deid.pseudonym import Pseudonymizer

__all__ = ["Decline", "FastHeader", "NeedMore", "deidentify_header"]


@dataclass(frozen=True, slots=True)
class FastHeader:
    """The de-identified header of one source, and what the view needs besides."""

    header: bytes  #: preamble, file meta and data set, up to Pixel Data
    pixel_offset: int  #: where the Pixel Data element starts in the source (its size if none)
    has_pixels: bool
    trailer: bytes  #: the de-identified elements after Pixel Data, when given
    report: Report
    #: Output values the view's name is built from (None: absent), in this order:
    #: SOPInstanceUID, PatientID, StudyInstanceUID, SeriesInstanceUID.
    names: tuple[str | None, str | None, str | None, str | None]
    image: ImageInfo | None = None  #: what the header says of the pixels (with pixels)


def deidentify_header(
    data: bytes,
    size: int,
    plan: Plan,
    pseudo: Pseudonymizer,
    trailer: bytes | None = None,
) -> FastHeader:
    """De-identify the header in ``data`` (the first bytes of a source of ``size`` bytes).

    Parameters
    ----------
    data
        The source from its first byte, through at least the first 12 bytes of its Pixel
        Data element (or the whole source when it has none).
    size
        The size of the source.
    plan, pseudo
        As for :func:`~deidfs.deid.engine.deidentify`.
    trailer
        The source's bytes after its Pixel Data element, if any: a first call without them
        tells where Pixel Data starts, the caller finds where it ends.

    Raises
    ------
    NeedMore
        When ``data`` ends before the header does: call again with more bytes.
    Decline
        When the reference path must take this source.
    """
    try:
        return _deidentify_header(data, size, plan, pseudo, trailer)
    except Decline:
        raise
    except Exception as exc:  # a case the checks above missed: the reference path decides
        raise Decline(f"internal_{type(exc).__name__}") from exc


def _deidentify_header(
    data: bytes, size: int, plan: Plan, pseudo: Pseudonymizer, trailer: bytes | None
) -> FastHeader:
    tables = _tables(plan)
    if tables.decline:
        raise Decline(tables.decline)
    if len(data) > size:
        raise Decline("size")
    start, ts, media_class = _transfer_syntax(data)
    run = _Run(data, size, tables, pseudo, media_class)
    run.top.top_next = start
    run.top.top_start = start
    run.top.top_end = len(data)
    raw_mode = run.actions.top_mode()
    # The added attributes depend on Burned In Annotation, which may follow them: walk with
    # the common value, and swap in the other if the source says YES.
    pos, parts = run.dataset(start, None, True, False, raw_mode)
    has_pixels = pos < len(data)
    root = run.top.root
    if not run.top_count:
        raise Decline("empty")
    if has_pixels:
        for slot, converted in run.actions.pixel_fixups:
            if converted is None:
                raise Decline("pixel_attribute")
            parts[slot] = converted
    trailer_out = b""
    if trailer:
        if not has_pixels:
            raise Decline("trailer_without_pixels")
        # engine.deidentify walks the trailer with the same context; render encodes it as a
        # data set of its own, re-encoded like a sequence item.
        run.scan.data = trailer
        run.top.root_done = 1 << 32
        _, trailer_parts = run.dataset(0, len(trailer), False, False)
        trailer_out = b"".join(trailer_parts)
    if not has_pixels and any(t in root for t in _IMAGE_PIXEL_TAGS):
        raise Decline("no_pixel_data")
    burned = root.get(BURNED_IN_ANNOTATION)
    burned_in = burned is not None and _plain(burned[0], burned[1]).upper() == "YES"
    if burned_in:
        parts[run.removed_slot] = tables.added[True][0][1]
    sop = root.get(SOP_CLASS_UID)
    sop_class = _plain(sop[0], sop[1]) if sop is not None else ""
    if not sop_class:
        sop_class = media_class
    if sop_class and not UID_TEXT.match(sop_class):
        raise Decline("bad_sop_class")  # the reference path refuses it
    if sop_class == MEDIA_DIRECTORY_CLASS or sop_class in ENCAPSULATED_DOCUMENT_CLASSES:
        raise Decline("refused_class")
    at_risk = False
    image = None
    if has_pixels:
        image = _image_info(root, sop_class, ts)
        policy = pixel_decision(plan.profile, plan.options, image)
        if policy.policy not in (PixelPolicy.AS_IS, PixelPolicy.AT_RISK) or policy.rects:
            raise Decline("pixel_policy")
        at_risk = policy.policy is PixelPolicy.AT_RISK
    instance = root.get(SOP_INSTANCE_UID)
    if instance is None or not _plain(instance[0], instance[1]):
        raise Decline("no_sop_instance_uid")
    names = run.names
    sop_out = names.get(SOP_INSTANCE_UID)
    if not sop_out or not sop_out.strip():
        raise Decline("no_sop_instance_uid")
    header = _file_meta(sop_class or _DEFAULT_SOP_CLASS, sop_out, ts) + b"".join(parts)
    report = Report(
        profile=plan.profile.name,
        digest=plan.digest,
        counts=tuple(sorted(run.actions.counts.items())),
        burned_in_annotation=burned_in,
        notes=tuple(sorted(run.actions.notes)),
        burned_in_risk=at_risk,
    )
    return FastHeader(
        header=header,
        pixel_offset=pos if has_pixels else size,
        has_pixels=has_pixels,
        trailer=trailer_out,
        report=report,
        names=(
            sop_out,
            names.get(PATIENT_ID),
            names.get(STUDY_INSTANCE_UID),
            names.get(SERIES_INSTANCE_UID),
        ),
        image=image,
    )
