"""Building blocks shared by the backbone, pyramid, decoder and heads; each defined once."""

from .attention import Attention, attention_impl, relative_position_index, resize_rel_pos_table, set_attention_impl
from .block import Block
from .drop_path import DropPath
from .linear import ScaledLinear
from .mlp import Mlp
from .norm import AUX_LN_EPS, LN_EPS
from .patch import PatchEmbed, PatchMerge, PatchSplit, tokens_to_map

__all__ = [
    "Attention", "attention_impl", "set_attention_impl", "relative_position_index", "resize_rel_pos_table", "Block",
    "DropPath", "ScaledLinear", "Mlp", "AUX_LN_EPS", "LN_EPS", "PatchEmbed", "PatchMerge", "PatchSplit",
    "tokens_to_map",
]
