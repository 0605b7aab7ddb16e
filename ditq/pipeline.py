"""How an exported model samples: one typed record, stored in the model file (``ditq.pipeline``)."""

from __future__ import annotations

from dataclasses import dataclass

from ditq.errors import DitqError, shown


@dataclass(frozen=True)
class ClassConditioning:
    """Class-label conditioning: labels ``0..num_classes-1``; ``null_label`` is the unconditional input
    classifier-free guidance pairs every conditional one with (DiT: ``num_classes``)."""

    num_classes: int
    null_label: int

    def __post_init__(self) -> None:
        for name in ("num_classes", "null_label"):
            v = getattr(self, name)
            if type(v) is not int or v < 0:
                raise DitqError(f"conditioning {name} must be a non-negative integer, got {shown(v)}")
