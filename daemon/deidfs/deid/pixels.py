"""Pixel rules: confidentiality masks, the burned-in text policy, and redaction.

PS3.15 E.3.1 (Clean Pixel Data Option) asks that identifying information burned into the
pixels be removed. deidfs cannot read text in pixels; it removes what an admin's
confidentiality *masks* describe (rectangles, per device and image size) and withholds
what may carry burned-in text but matches no mask. This module decides and computes; it
does no I/O:

- :func:`image_info` reads what the rules need from a parsed header;
- :func:`decide` applies a profile to it: pixels as they are, redacted by masks, served with
  their burned-in text risk flagged, or withheld;
- :func:`native_ranges` gives the byte ranges the rectangles cover in native (uncompressed)
  pixel data, so a view patches zeros over them and still streams the rest from the source;
- :func:`reencode` decodes encapsulated (or YCbCr native) pixel data, zeroes the rectangles in
  every frame and encodes the result losslessly: RLE Lossless where an RLE encoder can, native
  otherwise; :func:`update_header` makes the header describe the new pixel data.

Burned-in text policy (``decide``). An image *may carry burned-in text* when Burned In
Annotation (0028,0301) is YES, or when it is absent and the modality is one where text is
usually burned in (US, SC, OT, XC, ES) or the SOP class is a Secondary Capture, ultrasound or
visible light class. With Clean Pixel Data (the ``+Pixel`` built-in) such an image is withheld
(reason ``burned_in_no_mask``) unless a mask matches it. Without Clean Pixel Data it is served
with its pixels unchanged and its :attr:`PixelDecision.policy` says ``AT_RISK``, which the
engine reports (``Report.burned_in_risk``) and which sets Patient Identity Removed to NO.

Masks are considered when the profile has ``apply_masks`` or Clean Pixel Data. A mask matches
an image when every criterion it sets is equal (:meth:`~deidfs.deid.profiles.Mask.matches`)
and at least one of its rectangles overlaps the image; rectangles are clipped to the image.
A matched image has Burned In Annotation set to NO.

Clean Graphics (PS3.15 E.3.3; Table E.1-1 column C on Graphic Annotation Sequence, Overlay
Data, Overlay Comments and Curve Data): graphic annotations are kept with the text of their
text objects cleaned of the instance's identifying values (the engine's C action inside the
sequence). Overlay bitmaps (60xx,3000) and binary curve data are pictures of unknown content
that cannot be searched for text: they are removed (fail closed), as the Basic Profile does,
together with the rest of their repeating group. Overlay bits stored in unused high bits of
native pixel data lie in the same bytes as the pixels and are zeroed with them by a mask.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

from deidfs.deid.profiles import Mask, Profile, Rect
from deidfs.deid.standard import Option
from deidfs.errors import Refused

if TYPE_CHECKING:
    import numpy as np
    from pydicom.dataelem import DataElement
    from pydicom.dataset import Dataset

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED = "1.2.840.10008.1.2.1.99"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"
NATIVE_SYNTAXES = frozenset({IMPLICIT_LE, EXPLICIT_LE, DEFLATED, EXPLICIT_BE})
#: Lossy transfer syntaxes and their Lossy Image Compression Method (PS3.3 C.7.6.1.1.5.1).
#: JPEG 2000 (.91) may be lossless or not: the source's own Lossy Image Compression says.
LOSSY_SYNTAXES = {
    "1.2.840.10008.1.2.4.50": "ISO_10918_1",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51": "ISO_10918_1",  # JPEG Extended (Process 2 and 4)
    "1.2.840.10008.1.2.4.81": "ISO_14495_1",  # JPEG-LS Near-Lossless
}
#: Photometric interpretations whose native samples are patched with zeros in place. Zero is
#: a uniform value in each (black, white for MONOCHROME1, palette entry 0); YCbCr is not
#: (zero chroma is green), so native YCbCr goes through :func:`reencode`.
PATCHABLE_PHOTOMETRICS = frozenset({"MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR"})
#: Modalities where text is usually burned into the pixels (PS3.15 E.3.1 notes).
BURNED_IN_MODALITIES = frozenset({"US", "SC", "OT", "XC", "ES"})
#: SOP classes whose images usually carry burned-in text: Secondary Capture, ultrasound,
#: visible light endoscopy and photography.
BURNED_IN_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image
        "1.2.840.10008.5.1.4.1.1.7.1",  # Multi-frame Single Bit Secondary Capture
        "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte Secondary Capture
        "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word Secondary Capture
        "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color Secondary Capture
        "1.2.840.10008.5.1.4.1.1.3",  # Ultrasound Multi-frame Image (retired)
        "1.2.840.10008.5.1.4.1.1.3.1",  # Ultrasound Multi-frame Image
        "1.2.840.10008.5.1.4.1.1.6",  # Ultrasound Image (retired)
        "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image
        "1.2.840.10008.5.1.4.1.1.6.2",  # Enhanced US Volume
        "1.2.840.10008.5.1.4.1.1.77.1.1",  # VL Endoscopic Image
        "1.2.840.10008.5.1.4.1.1.77.1.1.1",  # Video Endoscopic Image
        "1.2.840.10008.5.1.4.1.1.77.1.4",  # VL Photographic Image
        "1.2.840.10008.5.1.4.1.1.77.1.4.1",  # Video Photographic Image
    }
)
#: Largest decoded pixel data :func:`reencode` accepts (all frames): a view holds it in memory.
MAX_DECODED_BYTES = 512 * 1024 * 1024
#: RLE Lossless holds at most 15 segments (PS3.5 G.2): one per byte of each sample.
_RLE_MAX_SEGMENTS = 15


class PixelPolicy(Enum):
    """What happens to an image's pixels."""

    AS_IS = "as_is"  #: unchanged; nothing suggests burned-in text
    REDACT = "redact"  #: the rectangles of matching masks are zeroed in every frame
    AT_RISK = "at_risk"  #: unchanged although they may carry burned-in text (flagged)
    WITHHOLD = "withhold"  #: may carry burned-in text, no mask, Clean Pixel Data: not served


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What the pixel rules need to know about one image, read from its header."""

    rows: int | None
    columns: int | None
    samples_per_pixel: int
    bits_allocated: int | None
    planar_configuration: int
    number_of_frames: int | None
    photometric: str
    modality: str
    manufacturer: str
    model: str
    sop_class: str
    burned_in_annotation: str  #: "YES", "NO" or "" when absent
    transfer_syntax: str

    @property
    def is_native(self) -> bool:
        """Whether the pixel data is uncompressed (deflate compresses the data set, not it)."""
        return self.transfer_syntax in NATIVE_SYNTAXES

    @property
    def may_carry_burned_in_text(self) -> bool:
        """Burned In Annotation YES, or absent where burned-in text is usual."""
        if self.burned_in_annotation == "YES":
            return True
        if self.burned_in_annotation:
            return False
        return (
            self.modality.upper() in BURNED_IN_MODALITIES or self.sop_class in BURNED_IN_SOP_CLASSES
        )


@dataclass(frozen=True, slots=True)
class PixelDecision:
    """The pixel rule for one image: its policy and, to redact, the rectangles (clipped)."""

    policy: PixelPolicy
    rects: tuple[Rect, ...] = ()
    masks: tuple[int, ...] = ()  #: indices of the matching masks in the profile


AS_IS = PixelDecision(PixelPolicy.AS_IS)


def _get(ds: Dataset, keyword: str) -> Any:
    try:
        return ds.get(keyword)
    except Exception:  # an undecodable value counts as absent: it matches no mask
        return None


def _int(value: Any) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str | bytes):
        return value.decode("ascii", "replace") if isinstance(value, bytes) else value
    try:
        return "\\".join(str(v) for v in value)
    except TypeError:
        return str(value)


def image_info(ds: Dataset, sop_class: str, transfer_syntax: str) -> ImageInfo:
    """Read :class:`ImageInfo` from a parsed header, tolerating bad values (read as absent)."""
    frames = _get(ds, "NumberOfFrames")
    return ImageInfo(
        rows=_int(_get(ds, "Rows")),
        columns=_int(_get(ds, "Columns")),
        samples_per_pixel=_int(_get(ds, "SamplesPerPixel")) or 1,
        bits_allocated=_int(_get(ds, "BitsAllocated")),
        planar_configuration=_int(_get(ds, "PlanarConfiguration")) or 0,
        number_of_frames=1 if frames is None or frames == "" else _int(frames),
        photometric=_text(_get(ds, "PhotometricInterpretation")).strip().upper(),
        modality=_text(_get(ds, "Modality")).strip(),
        manufacturer=_text(_get(ds, "Manufacturer")).strip(),
        model=_text(_get(ds, "ManufacturerModelName")).strip(),
        sop_class=sop_class.strip(),
        burned_in_annotation=_text(_get(ds, "BurnedInAnnotation")).strip().upper(),
        transfer_syntax=transfer_syntax.strip(),
    )


def clip(rect: Rect, rows: int, columns: int) -> Rect | None:
    """``rect`` cut to an image of ``rows`` x ``columns``; None when nothing of it is inside."""
    right = min(rect.left + rect.width, columns)
    bottom = min(rect.top + rect.height, rows)
    if rect.left >= right or rect.top >= bottom:
        return None
    return Rect(rect.left, rect.top, right - rect.left, bottom - rect.top)


def matching_masks(masks: Sequence[Mask], info: ImageInfo) -> tuple[int, ...]:
    """Indices of the enabled masks whose criteria all equal the image's attributes."""
    return tuple(
        i
        for i, mask in enumerate(masks)
        if mask.matches(info.modality, info.manufacturer, info.model, info.rows, info.columns)
    )


def mask_rects(masks: Sequence[Mask], indices: Iterable[int], info: ImageInfo) -> tuple[Rect, ...]:
    """The rectangles of the masks at ``indices``, clipped to the image, sorted, distinct."""
    if not info.rows or not info.columns:
        return ()
    out: set[Rect] = set()
    for i in indices:
        for rect in masks[i].rects:
            inside = clip(rect, info.rows, info.columns)
            if inside is not None:
                out.add(inside)
    return tuple(sorted(out, key=lambda r: (r.top, r.left, r.height, r.width)))


def decide(profile: Profile, options: frozenset[Option], info: ImageInfo) -> PixelDecision:
    """The pixel rule of ``profile`` (with its compiled ``options``) for an image.

    A mask whose rectangles all lie outside the image does not count as matching: nothing of
    the image would be covered.
    """
    clean = Option.CLEAN_PIXEL_DATA in options
    if profile.apply_masks or clean:
        matched = matching_masks(profile.masks, info)
        rects = mask_rects(profile.masks, matched, info)
        if rects:
            used = tuple(
                i for i in matched if mask_rects(profile.masks, (i,), info)
            )  # the masks that cover something
            return PixelDecision(PixelPolicy.REDACT, rects, used)
    if not info.may_carry_burned_in_text:
        return AS_IS
    return PixelDecision(PixelPolicy.WITHHOLD if clean else PixelPolicy.AT_RISK)


# -- native pixel data: byte ranges -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NativeGeometry:
    """How native pixel data lies in bytes (PS3.5 8.1, 8.2): frame after frame."""

    rows: int
    columns: int
    samples: int
    sample_bytes: int
    planar: int  #: Planar Configuration: 0 samples interleaved, 1 one plane per sample
    frames: int

    @property
    def frame_bytes(self) -> int:
        return self.rows * self.columns * self.samples * self.sample_bytes

    @property
    def total_bytes(self) -> int:
        return self.frame_bytes * self.frames


def native_geometry(info: ImageInfo) -> NativeGeometry:
    """The layout of ``info``'s native pixel data.

    Raises
    ------
    Refused
        ``pixel_unsupported`` for layouts zero bytes cannot redact exactly (Bits Allocated
        not a multiple of 8, Samples per Pixel other than 1 and 3), ``bad_pixel_data`` for an
        image without dimensions.
    """
    if not info.rows or not info.columns or not info.number_of_frames or not info.bits_allocated:
        raise Refused("bad_pixel_data", "image dimensions missing or invalid")
    if info.bits_allocated % 8 or info.bits_allocated > 64:
        raise Refused("pixel_unsupported", f"bits allocated {info.bits_allocated}")
    if info.samples_per_pixel not in (1, 3):
        raise Refused("pixel_unsupported", f"samples per pixel {info.samples_per_pixel}")
    return NativeGeometry(
        rows=info.rows,
        columns=info.columns,
        samples=info.samples_per_pixel,
        sample_bytes=info.bits_allocated // 8,
        planar=info.planar_configuration if info.samples_per_pixel > 1 else 0,
        frames=info.number_of_frames,
    )


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, non-overlapping, non-adjacent ``[start, end)`` ranges covering ``ranges``."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if end <= start:
            continue
        if out and start <= out[-1][1]:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def native_ranges(geom: NativeGeometry, rects: Sequence[Rect]) -> tuple[tuple[int, int], ...]:
    """Byte ranges ``[start, end)`` of native pixel data that ``rects`` cover, in every frame.

    Offsets count from the first byte of the Pixel Data value. ``rects`` must lie inside the
    image (see :func:`clip`). Ranges are sorted and merged, so adjacent rows of a rectangle
    as wide as the image become one range.
    """
    if geom.planar == 0:
        pixel = geom.samples * geom.sample_bytes
        planes = 1
    else:
        pixel = geom.sample_bytes
        planes = geom.samples
    plane_bytes = geom.rows * geom.columns * geom.sample_bytes
    row_bytes = geom.columns * pixel
    frame: list[tuple[int, int]] = []
    for plane in range(planes):
        base = plane * plane_bytes
        for r in rects:
            left = base + r.left * pixel
            width = r.width * pixel
            for y in range(r.top, r.top + r.height):
                start = left + y * row_bytes
                frame.append((start, start + width))
    one = merge_ranges(frame)
    size = geom.frame_bytes
    return tuple(
        merge_ranges((a + f * size, b + f * size) for f in range(geom.frames) for a, b in one)
    )


def zero_ranges(
    data: bytearray | memoryview, at: int, ranges: Sequence[tuple[int, int]], first: int = 0
) -> None:
    """Zero, in ``data`` (the bytes from offset ``at`` on), the parts of ``ranges`` it holds.

    ``ranges`` are sorted and disjoint; ``first`` is the index of the first range that may
    end after ``at`` (from :func:`bisect.bisect_right` on the ends), to skip the others.
    """
    end = at + len(data)
    for i in range(first, len(ranges)):
        start, stop = ranges[i]
        if start >= end:
            break
        lo = max(start, at)
        hi = min(stop, end)
        if lo < hi:
            data[lo - at : hi - at] = bytes(hi - lo)


# -- decoded pixel data --------------------------------------------------------------------------


def redact_array(arr: np.ndarray, rects: Sequence[Rect], geom: NativeGeometry) -> np.ndarray:
    """``arr`` with ``rects`` zeroed in every frame (in place where ``arr`` is writeable).

    ``arr`` holds all frames as pydicom's decoders return them: (rows, columns[, samples])
    or (frames, rows, columns[, samples]), samples interleaved (Planar Configuration 0).
    """
    if not arr.flags.writeable or not arr.flags.c_contiguous:
        arr = arr.copy(order="C")
    shaped = arr.reshape((geom.frames, geom.rows, geom.columns, geom.samples))
    for r in rects:
        shaped[:, r.top : r.top + r.height, r.left : r.left + r.width, :] = 0
    return arr


@dataclass(frozen=True, slots=True)
class Reencoded:
    """New pixel data for a redacted image, and what its header must now say."""

    element: DataElement  #: the new Pixel Data element
    transfer_syntax: str
    photometric: str
    samples_per_pixel: int
    lossy_method: str | None  #: the source's lossy compression method, if it was lossy
    source_lossy: bool  #: the source pixel data was lossy-compressed once


def native_excess(info: ImageInfo, value_length: int) -> int | None:
    """Where the image ends in a native Pixel Data value of ``value_length`` bytes, when
    bytes follow it (None otherwise, or when the header does not say how large it is).

    Bytes past the last frame (and its even-length padding) are shown by no viewer but read
    by anyone who parses the file: a channel for text. Sizes are reckoned high (samples
    padded to whole bytes, so a 1-bit or subsampled image is never cut), so what lies past
    them is never image.
    """
    if not info.is_native or not info.rows or not info.columns or not info.bits_allocated:
        return None
    frames = 1 if info.number_of_frames is None else info.number_of_frames
    if frames < 1:
        return None
    sample_bytes = -(-info.bits_allocated // 8)
    size = info.rows * info.columns * max(1, info.samples_per_pixel) * sample_bytes * frames
    size += size & 1
    return size if value_length > size else None


def decoded_size(info: ImageInfo) -> int:
    """Bytes of all decoded frames, samples padded to whole bytes."""
    rows, cols = info.rows or 0, info.columns or 0
    sample_bytes = max(1, -(-(info.bits_allocated or 8) // 8))
    return rows * cols * info.samples_per_pixel * sample_bytes * (info.number_of_frames or 0)


def _rle_encoder() -> tuple[Any, str] | None:
    from pydicom.pixels.encoders.base import get_encoder  # noqa: PLC0415  (codecs load on use)

    encoder = get_encoder(RLE_LOSSLESS)
    if not encoder.is_available:
        return None
    plugins = encoder.available_plugins
    # pylibjpeg-rle encodes in compiled code; pydicom's own encoder is pure Python and slow.
    return encoder, "pylibjpeg" if "pylibjpeg" in plugins else ""


def reencode(
    ds: Dataset,
    info: ImageInfo,
    rects: Sequence[Rect],
    *,
    allow_rle: bool = True,
    little_endian: bool = True,
    max_bytes: int = MAX_DECODED_BYTES,
) -> Reencoded:
    """Decode ``ds``'s pixel data, zero ``rects`` in every frame, and encode it losslessly.

    Parameters
    ----------
    ds
        A data set with its Pixel Data and ``file_meta.TransferSyntaxUID``.
    info
        :func:`image_info` of ``ds``.
    rects
        Rectangles inside the image.
    allow_rle
        Encode as RLE Lossless when an RLE encoder can (compressed sources): false keeps the
        result native in the source's own transfer syntax (native sources).
    little_endian
        Byte order of native output (the source's, for a native source).
    max_bytes
        Refuse pixel data larger than this when decoded.

    Raises
    ------
    Refused
        ``too_large``, ``pixel_unsupported`` (no decoder for the transfer syntax, or a layout
        deidfs does not redact), ``bad_pixel_data`` (decoding failed).
    """
    # pydicom's codecs (and numpy) load here, for the few views that redact pixels: a
    # process that never does (the fast path, most exports) never pays their import.
    from pydicom.dataelem import DataElement  # noqa: PLC0415
    from pydicom.encaps import encapsulate  # noqa: PLC0415
    from pydicom.pixels.decoders.base import get_decoder  # noqa: PLC0415

    geom = native_geometry(info)
    if decoded_size(info) > max_bytes:
        raise Refused("too_large", "decoded pixel data exceeds the size limit")
    try:
        decoder = get_decoder(info.transfer_syntax)
    except NotImplementedError as exc:
        raise Refused("pixel_unsupported", "no decoder for the transfer syntax") from exc
    if not decoder.is_available:
        raise Refused("pixel_unsupported", "the decoder for the transfer syntax is missing")
    try:
        arr, meta = decoder.as_array(ds)
    except Exception as exc:  # decoders raise many types on bad data
        raise Refused("bad_pixel_data", f"decoding failed: {type(exc).__name__}") from exc
    expected = geom.rows * geom.columns * geom.samples * geom.frames
    if arr.size != expected or arr.dtype.itemsize != geom.sample_bytes:
        raise Refused("bad_pixel_data", "decoded pixel data does not match the image")
    arr = redact_array(arr, rects, geom)
    photometric = str(meta.get("photometric_interpretation", info.photometric))
    method = LOSSY_SYNTAXES.get(info.transfer_syntax)
    lossy = method is not None or _text(_get(ds, "LossyImageCompression")).strip() == "01"
    if method is None and lossy and info.transfer_syntax == "1.2.840.10008.1.2.4.91":
        method = "ISO_15444_1"
    bits_allocated = geom.sample_bytes * 8
    element: DataElement | None = None
    ts = info.transfer_syntax if info.is_native else EXPLICIT_LE
    rle = _rle_encoder() if allow_rle else None
    if rle is not None and geom.samples * geom.sample_bytes <= _RLE_MAX_SEGMENTS:
        encoder, plugin = rle
        opts = {
            "rows": geom.rows,
            "columns": geom.columns,
            "samples_per_pixel": geom.samples,
            "number_of_frames": geom.frames,
            "bits_allocated": bits_allocated,
            "bits_stored": _int(_get(ds, "BitsStored")) or bits_allocated,
            "pixel_representation": int(arr.dtype.kind == "i"),
            "photometric_interpretation": photometric,
            "planar_configuration": 0,
        }
        try:
            frames = list(encoder.iter_encode(arr, encoding_plugin=plugin, **opts))
        except (ValueError, RuntimeError):
            # A layout the encoder does not take (pydicom refuses 32-bit RGB, say): native.
            frames = None
        if frames is not None:
            element = DataElement(0x7FE00010, "OB", encapsulate(frames, has_bot=True))
            element.is_undefined_length = True
            ts = RLE_LOSSLESS
    if element is None:
        data = arr.astype(arr.dtype.newbyteorder("<" if little_endian else ">")).tobytes()
        if len(data) % 2:
            data += b"\x00"
        element = DataElement(0x7FE00010, "OB" if bits_allocated <= 8 else "OW", data)
    return Reencoded(
        element=element,
        transfer_syntax=ts,
        photometric=photometric,
        samples_per_pixel=geom.samples,
        lossy_method=method,
        source_lossy=lossy,
    )


def update_header(ds: Dataset, new: Reencoded) -> None:
    """Make the (de-identified, new) header ``ds`` describe the re-encoded pixel data.

    Photometric Interpretation and Planar Configuration follow the decoded data (YCbCr is
    decoded to RGB, samples interleaved). Pixel data that was lossy-compressed once stays
    marked so (Lossy Image Compression 01, with its method where the source did not say),
    although this encoding is lossless. An Extended Offset Table of the old encoding goes.
    """
    ds.PhotometricInterpretation = new.photometric
    if new.samples_per_pixel > 1:
        ds.PlanarConfiguration = 0
    elif "PlanarConfiguration" in ds:
        del ds.PlanarConfiguration
    for keyword in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):
        if keyword in ds:
            delattr(ds, keyword)
    if new.source_lossy:
        ds.LossyImageCompression = "01"
        if new.lossy_method and "LossyImageCompressionMethod" not in ds:
            ds.LossyImageCompressionMethod = new.lossy_method
    if hasattr(ds, "file_meta"):
        from pydicom.uid import UID  # noqa: PLC0415

        ds.file_meta.TransferSyntaxUID = UID(new.transfer_syntax)
