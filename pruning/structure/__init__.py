"""What a decoder-only causal LM offers to prune: linear weights, MLP neurons, attention groups, layers.

Each supported architecture family is declared by one :class:`FamilySpec` table: where the decoder layers live
and which projections make up attention and the MLP. Criteria, masks and surgery never walk attribute chains of
their own; they read the :class:`ModelStructure` built from the table. Adding a family is one
:func:`register_family` call.
"""

from .families import (
    FAMILIES,
    FamilySpec,
    UnsupportedModelError,
    config_value,
    family_of,
    get_submodule,
    register_family,
)
from .members import GroupKind, GroupSet, Member
from .model import LayerInfo, ModelStructure, named_parameters

__all__ = [
    "FAMILIES",
    "FamilySpec",
    "GroupKind",
    "GroupSet",
    "LayerInfo",
    "Member",
    "ModelStructure",
    "UnsupportedModelError",
    "config_value",
    "family_of",
    "get_submodule",
    "named_parameters",
    "register_family",
]
