"""What the fast path remembers per plan.

:class:`_Tables` holds, for one compiled plan, why no file of it can take the fast path
(pixel rules, age caps), the decisions by tag, the short action by tag and by the six bytes
of an element header (the hot path), emptied elements, re-encoded image attributes, the VRs
read for UN, and the attributes the engine adds after its walk, encoded
(:func:`_added_attributes`). Tables of recently used plans are kept, bounded. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deidfs import __version__
from deidfs.deid.fast_values import _ascii, _element, _padded, _sequence
from deidfs.deid.fast_wire import Decline
from deidfs.deid.plan import Decision, Plan
from deidfs.deid.standard import Option, method_codes
from deidfs.deid.trust import ValueCheck


@dataclass(slots=True)
class _Tables:
    plan: Plan
    decline: str  #: why no file of this plan can take the fast path ("" if it can)
    decisions: dict[int, Decision]
    fast_ops: dict[int, int]  #: tag -> _KEEP, _REMOVE, _EMPTY or _OTHER (_Actions.fast_op)
    #: The 6 bytes of an element header (tag, VR) -> (tag, short action, header length,
    #: the VR, or the emptied element): the hot path of _Run.dataset.
    #: 6 header bytes -> (tag, fast op, header length, payload, value check of a kept one)
    heads: dict[bytes, tuple[int, int, int, Any, ValueCheck | None]]
    empties: dict[int, tuple[str, bytes]]  #: tag -> (VR, the element emptied)
    #: (tag, VR, raw value) -> the element re-encoded (None: declined); see image_attribute
    image_values: dict[tuple[int, str, bytes], bytes | None]
    identifiers: dict[int, bool]  #: tag -> its keyword names an identifier (engine._dummy)
    un_vrs: dict[int, str]  #: tag -> VR read for UN (see _Actions.un_vr; "": declined)
    added: dict[bool, tuple[tuple[int, bytes], ...]]  #: burned in -> added attributes
    private_exact: bool  #: custom rules or disabled entries name private tags
    safe_private: bool


_TABLES: dict[int, _Tables] = {}


_MAX_PLANS = 8


_MAX_TAGS = 1 << 16


#: Values remembered (image attributes, file meta UIDs): few and short, whatever a source holds.
_MAX_CACHED_VALUES = 4096


_MAX_CACHED_VALUE = 128


def _tables(plan: Plan) -> _Tables:
    found = _TABLES.get(id(plan))
    if found is not None and found.plan is plan:
        return found
    if len(_TABLES) >= _MAX_PLANS:
        _TABLES.clear()
    tables = _build_tables(plan)
    _TABLES[id(plan)] = tables
    return tables


def _plan_decline(plan: Plan) -> str:
    profile = plan.profile
    if Option.CLEAN_PIXEL_DATA in plan.options or profile.apply_masks or profile.masks:
        return "pixel_rules"  # pixel decisions are the reference path's
    if profile.max_age is not None:
        return "age_cap"
    return ""


def _build_tables(plan: Plan) -> _Tables:
    decline = _plan_decline(plan)
    added: dict[bool, tuple[tuple[int, bytes], ...]] = {}
    if not decline:
        try:
            added = {burned: _added_attributes(plan, burned) for burned in (False, True)}
        except Decline as exc:
            decline = exc.reason
    return _Tables(
        plan=plan,
        decline=decline,
        decisions={},
        fast_ops={},
        heads={},
        empties={},
        image_values={},
        identifiers={},
        un_vrs={},
        added=added,
        private_exact=any(tag >> 16 & 1 for tag in plan.exact),
        safe_private=Option.RETAIN_SAFE_PRIVATE in plan.options,
    )


def _added_attributes(plan: Plan, burned_in: bool) -> tuple[tuple[int, bytes], ...]:
    """The attributes engine.deidentify sets after its walk, encoded (PS3.15 E.1.1)."""
    removed = b"NO" if burned_in else b"YES"  # no mask redacts anything here
    method = f"deidfs {__version__} {plan.profile.name}"[:64]
    items = []
    for code in method_codes(plan.options):
        items.append(
            _element(0x00080100, "SH", _padded(_ascii(code.value)))
            + _element(0x00080102, "SH", _padded(_ascii(code.scheme)))
            + _element(0x00080104, "LO", _padded(_ascii(code.meaning)))
        )
    if Option.RETAIN_LONGITUDINAL_FULL_DATES in plan.options:
        longitudinal = b"UNMODIFIED"
    elif Option.RETAIN_LONGITUDINAL_MODIFIED_DATES in plan.options:
        longitudinal = b"MODIFIED"
    else:
        longitudinal = b"REMOVED"
    return (
        (0x00120062, _element(0x00120062, "CS", _padded(removed))),
        (0x00120063, _element(0x00120063, "LO", _padded(_ascii(method)))),
        (0x00120064, _sequence(0x00120064, items)),
        (0x00280303, _element(0x00280303, "CS", _padded(longitudinal))),
    )
