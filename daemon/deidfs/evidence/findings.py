"""What verify finds: the kinds of finding, a finding, a kept identifier, a verification.

A finding names a kind, a tag and keyword, and the file as a keyed token of its path (the
form in which logs name files), never a value or a path; a kept identifier is an attribute
the profile serves with its original value where PS3.15 Basic removes or replaces it. Each
turns itself into the JSON ``deidfs verify --json`` prints.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from deidfs.deid.tags import format_tag, keyword_of


class FindingKind(Enum):
    """What is wrong with a served file."""

    VALUE_IN_HEADER = "value_in_header"  #: original value in served bytes outside pixel data
    VALUE_IN_PIXEL_DATA = "value_in_pixel_data"  #: original value inside served pixel data
    VALUE_IN_PATH = "value_in_path"  #: original value in the served path
    VALUE_RETAINED = "value_retained"  #: top-level attribute served with its original value
    VALUE_IN_OTHER_FILE = "value_in_other_file"  #: original value in a file that is no view
    #: a served value that cannot be the attribute its tag names (VR, length, repertoire,
    #: enumerated values; or a command or file meta element inside the data set): the
    #: engine never serves one, whatever the profile keeps
    VALUE_UNTRUSTED = "value_untrusted"
    UID_NOT_REMAPPED = "uid_not_remapped"
    UID_INCONSISTENT = "uid_inconsistent"  #: one original UID served as several
    UID_COLLISION = "uid_collision"  #: several original UIDs served as one
    REFERENCE_UNRESOLVED = "reference_unresolved"
    PIXEL_DATA_DIFFERS = "pixel_data_differs"
    NO_ORIGINAL = "no_original"  #: a served DICOM file no original of the folder renders to
    UNREADABLE = "unreadable"  #: a served file that cannot be read or parsed


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem, without PHI: kind, attribute, and a keyed token of the file's path.

    The token is that of the original's path for served files that have one (as in the
    daemon's logs), else that of the served path relative to the tree.
    """

    kind: FindingKind
    file: str
    tag: str = ""  #: ``(gggg,eeee)``, ``""`` for a finding about the whole file
    keyword: str = ""
    #: why, where the kind has reasons: a key of :data:`deidfs.deid.trust.REASONS`, or
    #: ``misplaced`` (a command or file meta element inside the data set)
    reason: str = ""

    @classmethod
    def of(cls, kind: FindingKind, file: str, tag: int | None = None, reason: str = "") -> Finding:
        """A finding about ``tag`` (or the whole file) of the file whose token is ``file``."""
        if tag is None:
            return cls(kind, file, reason=reason)
        return cls(kind, file, format_tag(tag), keyword_of(tag), reason)

    def sort_key(self) -> tuple[str, str, str]:
        """Kind, file, tag: the order findings are listed in."""
        return (self.kind.value, self.file, self.tag)


@dataclass(frozen=True, slots=True)
class KeptIdentifier:
    """An attribute served with its original value because the profile keeps it, where
    PS3.15 Basic removes or replaces it (the second class of result, next to findings).

    Never a value: the attribute, what keeps it, and in how many served files.
    """

    tag: str  #: ``(gggg,eeee)``
    keyword: str  #: ``""`` for private attributes
    #: ``custom rule``, ``disabled``, ``option retain_uids``; ``... on (gggg,eeee)`` when a
    #: rule or option on an enclosing sequence keeps it
    source: str
    files: int  #: served files holding it with a value
    direct: str  #: the :class:`~deidfs.deid.identifiers.DirectKind` value, ``""`` if none
    accepted: bool  #: listed in the profile's ``accepted``

    @property
    def fails(self) -> bool:
        """A direct identifier the profile does not list as accepted."""
        return bool(self.direct) and not self.accepted

    def sort_key(self) -> tuple[str, str]:
        return (self.tag, self.source)


@dataclass(frozen=True, slots=True)
class Verification:
    """The outcome of :func:`verify_tree`.

    Two classes of result: ``findings``, where the served bytes are not what the profile
    says (a leak: an original value served where the profile does not keep it; a value
    that cannot be the attribute its tag names; UIDs, references, pixel data), and
    ``kept``, identifiers served because the profile keeps them.
    """

    folder: str
    profile: str
    served_files: int  #: regular files in the served tree
    matched: int  #: served files checked against their original
    not_served: int  #: originals the profile serves that the tree does not hold
    withheld: int  #: originals the profile withholds
    other_files: int  #: non-DICOM files of the tree (searched for original values)
    values_searched: int  #: distinct original values searched, over all files
    uids_checked: int
    references_checked: int
    pixel_checked: int
    pixel_skipped: int  #: images under a pixel rule, not compared
    findings: tuple[Finding, ...]
    kept: tuple[KeptIdentifier, ...] = ()

    @property
    def failing_kept(self) -> tuple[KeptIdentifier, ...]:
        """Kept direct identifiers the profile does not accept."""
        return tuple(k for k in self.kept if k.fails)

    @property
    def ok(self) -> bool:
        """True when there is no finding and every kept direct identifier is accepted."""
        return not self.findings and not self.failing_kept
