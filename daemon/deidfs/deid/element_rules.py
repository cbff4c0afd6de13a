"""What the engine decides for one element, and whether it trusts it.

:func:`element_decision` is the plan's decision for an element at its level (group 0000
and 0002 elements never belong to a data set: :data:`MISPLACED_GROUP`; text the table does
not list is dummied or cleaned inside a D or C sequence), remembered per plan;
:func:`distrust` says why a kept element cannot be the attribute its tag names; the
sequences whose items are served (:data:`ITEMS_SERVED`) and how hard their items are
scrubbed (:func:`item_scrub`). The engine and the verifier share these rules. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydicom.dataelem import DataElement, RawDataElement

from deidfs.deid.attribute_types import TOP_LEVEL
from deidfs.deid.dictionary import VALUE_SIZES
from deidfs.deid.engine_values import _text_bytes, _value_length, _vr_of
from deidfs.deid.plan import Decision, Op, Plan, Source
from deidfs.deid.standard import Action
from deidfs.deid.trust import STRUCTURAL, doubt

#: Text the table does not list, inside a sequence whose row says D or C: a dummy replaces
#: the whole value of a D sequence (PS3.15 E.1.1), and its value is its items; C cleans it.
_SCRUB_VRS = frozenset({"AE", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})


_SCRUB = {
    Op.DUMMY: Decision(Op.DUMMY, Action.DUMMY, Source.DEFAULT, note="text in a D sequence"),
    Op.CLEAN: Decision(Op.CLEAN, Action.CLEAN, Source.DEFAULT, note="text in a C sequence"),
}


#: Operations that serve an element's value as it is, and that take it away.
_VALUE_KEPT = frozenset({Op.KEEP, Op.VERBATIM})


_VALUE_DROPPED = frozenset({Op.REMOVE, Op.EMPTY})


#: Decisions of recently used plans by tag: :meth:`Plan.decide` tries every group pattern
#: and the data dictionary for each tag the table does not list, on every element of every
#: file. Keyed by the plan object's id, and checked by identity, so a plan is never mistaken
#: for another; bounded.
_DECISIONS: dict[int, tuple[Plan, dict[int, Decision]]] = {}


_MAX_CACHED_PLANS = 8


_MAX_CACHED_TAGS = 1 << 16


#: Operations under which a sequence's items are served: VERBATIM as they are, the others
#: de-identified item by item with the same plan (:func:`item_scrub` says how hard).
ITEMS_SERVED = frozenset({Op.KEEP, Op.VERBATIM, Op.DUMMY, Op.CLEAN, Op.UID, Op.PSEUDONYM})


def item_scrub(scrub: Op | None, op: Op) -> Op | None:
    """The scrub of the items of a sequence that ``op`` serves, inside a level scrubbed by
    ``scrub`` (None: none): a D or C sequence dummies or cleans the text of its items that
    the table does not list; D inside C scrubs harder, never softer."""
    if op in (Op.DUMMY, Op.CLEAN) and scrub is not Op.DUMMY:
        return op
    return scrub


def _decide(plan: Plan, tag: int) -> Decision:
    """``plan.decide(tag)``, remembered."""
    entry = _DECISIONS.get(id(plan))
    if entry is None or entry[0] is not plan:
        if len(_DECISIONS) >= _MAX_CACHED_PLANS:
            _DECISIONS.clear()
        entry = _DECISIONS[id(plan)] = (plan, {})
    cache = entry[1]
    decision = cache.get(tag)
    if decision is None:
        decision = plan.decide(tag)
        if len(cache) < _MAX_CACHED_TAGS:
            cache[tag] = decision
    return decision


#: The decision for an element of group 0000 or 0002 inside a data set or an item.
MISPLACED_GROUP = Decision(
    Op.REMOVE,
    Action.REMOVE,
    Source.DEFAULT,
    note="command and file meta elements never belong to a data set",
)


def element_decision(
    plan: Plan,
    tag: int,
    raw: RawDataElement | DataElement,
    scrub: Op | None = None,
    places: Mapping[tuple[int, int], int] | None = None,
    parent: int = TOP_LEVEL,
) -> Decision:
    """What the engine decides for the public element ``tag`` (``raw`` as read) at a level
    of the data set: :data:`MISPLACED_GROUP` for command and file meta elements (they belong
    to a message or the file meta group, never to a data set or an item: whatever they hold
    goes), the plan's decision otherwise, with the text the table does not list dummied or
    cleaned inside a D or C sequence (``scrub``). Whether the element is trusted to be what
    its tag says is :func:`distrust`'s question, asked once the decision keeps it.

    A decision that depends on the attribute's Type (X codes, :meth:`Decision.at`) is taken
    where it occurs: in the items of the sequence ``parent`` (:data:`TOP_LEVEL`: the data
    set itself), in the IOD whose :func:`~deidfs.deid.attribute_types.placements` are
    ``places`` (None: an IOD the table does not know)."""
    if tag >> 16 in (0x0000, 0x0002):
        return MISPLACED_GROUP
    decision = _decide(plan, tag)
    if decision.by_type:
        decision = decision.at((places or {}).get((parent, tag)))
    if (
        scrub is not None
        and decision.op is Op.KEEP
        and decision.source is Source.DEFAULT
        and _vr_of(raw, tag) in _SCRUB_VRS
    ):
        return _SCRUB[scrub]
    return decision


def distrust(
    tag: int, decision: Decision, raw: RawDataElement | DataElement, *, implicit: bool
) -> str | None:
    """Why the engine does not serve the public element ``tag`` (``raw`` as read; judged by
    the dictionary's VR in an ``implicit`` VR encoding) as ``decision`` says: a key of
    :data:`deidfs.deid.trust.REASONS` when ``decision`` would serve its value (keep, or a
    :data:`~deidfs.deid.trust.STRUCTURAL` attribute not removed or emptied) and
    :func:`~deidfs.deid.trust.doubt` finds it cannot be the attribute its tag names. The
    engine then removes it, or withholds the file for a structural attribute. None when the
    element is served as decided (private elements are judged by their own rules)."""
    op = decision.op
    if tag >> 16 & 1 or not (op in _VALUE_KEPT or (tag in STRUCTURAL and op not in _VALUE_DROPPED)):
        return None
    vr = None if implicit or not raw.VR else str(raw.VR)
    if isinstance(raw, RawDataElement):
        value = raw.value if isinstance(raw.value, bytes) else b""
    elif vr in VALUE_SIZES or (vr is None and raw.VR in VALUE_SIZES):
        value = bytes(_value_length(raw, str(raw.VR)))  # converted: judged by length
    elif raw.VR == "SQ":
        value = b""
    else:
        value = _text_bytes(raw)
    why = doubt(tag, vr, value)
    if why == "length" and _vr_of(raw, tag) in VALUE_SIZES:
        return None  # a number that took in what follows: refused as bad_value instead
    return why
