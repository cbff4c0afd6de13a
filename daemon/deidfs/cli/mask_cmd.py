"""``deidfs mask preview FILE --profile P --png OUT``: check a profile's masks on an image.

Writes the first frame as a PNG (grayscale windowed to 8 bits, colour as it is) with the
rectangles of every matching mask drawn as outlines, and says which masks match and what the
profile does to the image. Exits 1, with the reason, when no mask matches.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, apply_voi_lut

from deidfs.cli.common import load_profiles
from deidfs.deid.pixels import (
    EXPLICIT_LE,
    ImageInfo,
    PixelPolicy,
    decide,
    image_info,
    mask_rects,
    matching_masks,
)
from deidfs.deid.plan import compile_plan
from deidfs.deid.profiles import Mask, Profile
from deidfs.deid.standard import Option
from deidfs.errors import NotFound, Refused

#: Outline colour of mask rectangles: pure red stands out on grayscale and most colour images.
OUTLINE = (255, 0, 0)

_POLICY_WORDS = {
    PixelPolicy.AS_IS: "served with its pixels as they are",
    PixelPolicy.REDACT: "served with the mask rectangles blacked out in every frame",
    PixelPolicy.AT_RISK: (
        "served with its pixels as they are, counted as a burned-in text risk (no mask)"
    ),
    PixelPolicy.WITHHOLD: "withheld: it may carry burned-in text and no mask matches",
}


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser(
        "mask",
        help="check confidentiality masks against an image",
        description="Check a profile's confidentiality masks against a DICOM image.",
    )
    actions = p.add_subparsers(dest="mask_command", required=True, metavar="ACTION")
    pv = actions.add_parser(
        "preview",
        help="write a PNG of an image's first frame with the matching masks drawn",
        description=(
            "Write the first frame of FILE as a PNG with the rectangles of every mask of the "
            "profile that matches the image drawn as red outlines, and say which masks match. "
            "Exits 1 when none matches (the PNG is written all the same)."
        ),
    )
    pv.add_argument("file", metavar="FILE", help="a DICOM image")
    pv.add_argument("--profile", required=True, help="profile whose masks are checked")
    pv.add_argument("--png", required=True, metavar="OUT", help="PNG file to write")
    pv.set_defaults(func=run)


def _criteria(mask: Mask) -> str:
    pairs = (
        ("modality", mask.modality),
        ("manufacturer", mask.manufacturer),
        ("model", mask.model),
        ("rows", mask.rows),
        ("columns", mask.columns),
    )
    text = ", ".join(f"{k}={v}" for k, v in pairs if v is not None)
    return (text or "any image") + ("" if mask.enabled else ", disabled")


def _mismatch(mask: Mask, info: ImageInfo) -> str:
    """Why ``mask`` does not match ``info``: the first criterion that differs."""
    if not mask.enabled:
        return "disabled"
    for name, want, have in (
        ("modality", mask.modality, info.modality),
        ("manufacturer", mask.manufacturer, info.manufacturer),
        ("model", mask.model, info.model),
    ):
        if want is not None and want.strip().casefold() != have.strip().casefold():
            return f"{name} {have!r} is not {want!r}"
    if mask.rows is not None and mask.rows != info.rows:
        return f"rows {info.rows} is not {mask.rows}"
    if mask.columns is not None and mask.columns != info.columns:
        return f"columns {info.columns} is not {mask.columns}"
    return "every rectangle lies outside the image"


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Scale to the full 0..255 range (a flat image becomes black)."""
    arr = values.astype(np.float64)
    lo, hi = float(np.min(arr)), float(np.max(arr))
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    return np.round((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def display_frame(ds: Dataset) -> np.ndarray:
    """The first frame of ``ds`` for display: (rows, columns) or (rows, columns, 3) uint8.

    Grayscale goes through the Modality LUT and the first VOI window (or LUT) the file has,
    then is stretched to 8 bits; MONOCHROME1 is inverted so that it looks as it should.
    Palette colour goes through its palette. RGB (and YCbCr, decoded to RGB) is kept; only
    more than 8 bits per sample are scaled down.
    """
    ts = str(ds.file_meta.get("TransferSyntaxUID", EXPLICIT_LE))
    try:
        arr, meta = get_decoder(ts).as_array(ds, index=0)
    except Exception as exc:  # no decoder, or undecodable pixel data
        raise Refused("bad_pixel_data", f"cannot decode the first frame: {exc}") from exc
    photometric = str(meta.get("photometric_interpretation", ""))
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        return rgb if rgb.dtype == np.uint8 else _to_uint8(rgb)
    if arr.ndim == 3:
        return arr if arr.dtype == np.uint8 else _to_uint8(arr)
    values = apply_modality_lut(arr, ds)
    if "WindowCenter" in ds or "VOILUTSequence" in ds:
        values = apply_voi_lut(values, ds, index=0)
    gray = _to_uint8(values)
    return 255 - gray if photometric == "MONOCHROME1" else gray


def run(args: argparse.Namespace) -> int:
    profiles = load_profiles(getattr(args, "config", None))
    profile: Profile | None = profiles.get(args.profile)
    if profile is None:
        raise NotFound(f"no profile named {args.profile!r} (have: {', '.join(sorted(profiles))})")
    try:
        ds = dcmread(args.file, force=True)
    except OSError as exc:
        raise NotFound(f"cannot read {args.file}: {exc.strerror}") from None
    except Exception as exc:  # pydicom raises many types on bad input
        raise Refused("unparseable", f"{args.file} is not readable DICOM") from exc
    if "PixelData" not in ds:
        raise Refused("no_pixel_data", f"{args.file} has no Pixel Data")
    ts = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
    info = image_info(ds, str(ds.get("SOPClassUID", "")), ts or EXPLICIT_LE)
    plan = compile_plan(profile)
    decision = decide(profile, plan.options, info)

    frame = display_frame(ds)
    image = Image.fromarray(frame).convert("RGB")
    draw = ImageDraw.Draw(image)
    line = max(1, min(image.width, image.height) // 200)
    matched = [
        i for i in matching_masks(profile.masks, info) if mask_rects(profile.masks, [i], info)
    ]
    for i in matched:
        for r in mask_rects(profile.masks, [i], info):
            box = (r.left, r.top, r.left + r.width - 1, r.top + r.height - 1)
            draw.rectangle(box, outline=OUTLINE, width=line)
    Path(args.png).parent.mkdir(parents=True, exist_ok=True)
    image.save(args.png, format="PNG")

    frames = info.number_of_frames or 1
    print(
        f"image: modality {info.modality or '-'}, manufacturer {info.manufacturer or '-'}, "
        f"model {info.model or '-'}, {info.rows} rows x {info.columns} columns, "
        f"{frames} frame(s)"
    )
    for i, mask in enumerate(profile.masks):
        rects = " ".join(f"[{r.left},{r.top} {r.width}x{r.height}]" for r in mask.rects)
        if i in matched:
            status = "matches"
            inside = mask_rects(profile.masks, [i], info)
            if len(inside) != len(mask.rects) or set(inside) != set(mask.rects):
                status += " (rectangles cut to the image)"
        else:
            status = f"does not match: {_mismatch(mask, info)}"
        print(f"mask #{i + 1} ({_criteria(mask)}): {rects}: {status}")
    if profile.masks and not (profile.apply_masks or Option.CLEAN_PIXEL_DATA in plan.options):
        print(
            f"note: profile {profile.name!r} applies no masks "
            "(apply_masks is off and it has no clean_pixel_data)"
        )
    print(f"under profile {profile.name!r} this image is {_POLICY_WORDS[decision.policy]}")
    print(f"wrote {args.png}: first frame, {len(matched)} mask(s) drawn")
    if not matched:
        print(
            f"deidfs: no mask of profile {profile.name!r} matches this image",
            file=sys.stderr,
        )
        return 1
    return 0
