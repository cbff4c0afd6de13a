"""What de-identifying one instance produces, shared by the engine
(:mod:`deidfs.deid.engine`) and the fast path (:mod:`deidfs.deid.fastpath`): the
:class:`Report`, the identity deidfs writes into every file it makes, and the SOP classes it
withholds. Nothing here imports pydicom.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from deidfs import __version__
from deidfs.deid.plan import Op
from deidfs.deid.profiles import Rect

#: deidfs's Implementation Class UID (PS3.7 D.3.3.2): a 2.25 UUID-derived UID of its own.
IMPLEMENTATION_CLASS_UID = "2.25.176488052718411917049390183011526716049"
IMPLEMENTATION_VERSION_NAME = ("DEIDFS_" + __version__)[:16]

#: SOP classes whose content is an opaque document the engine cannot clean: withheld.
ENCAPSULATED_DOCUMENT_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF
        "1.2.840.10008.5.1.4.1.1.104.2",  # Encapsulated CDA
        "1.2.840.10008.5.1.4.1.1.104.3",  # Encapsulated STL
        "1.2.840.10008.5.1.4.1.1.104.4",  # Encapsulated OBJ
        "1.2.840.10008.5.1.4.1.1.104.5",  # Encapsulated MTL
    }
)
MEDIA_DIRECTORY_CLASS = "1.2.840.10008.1.3.10"
#: The characters of a UID (PS3.5 9.1): digits and dots.
UID_TEXT = re.compile(r"^[0-9.]+$")


@dataclass(frozen=True, slots=True)
class Report:
    """What the engine did to one instance: counts by operation and PHI-free notes."""

    profile: str
    digest: str
    counts: tuple[tuple[str, int], ...]
    burned_in_annotation: bool
    notes: tuple[str, ...] = ()
    #: Served with pixels unchanged although they may carry burned-in text (no mask matched
    #: and no Clean Pixel Data): see :mod:`deidfs.deid.pixels`.
    burned_in_risk: bool = False
    #: Rectangles (inside the image) to zero in every frame; the renderer does it.
    redactions: tuple[Rect, ...] = ()

    def count(self, op: Op) -> int:
        return dict(self.counts).get(op.value, 0)
