"""Official-checkpoint compatibility: load released iTPN checkpoints, and write ours in
their key layout (reference doc, section 4)."""

from .convert import (checkpoint_filter_fn, is_official, load_checkpoint_file, official_depths,
                      official_to_ours, ours_to_official, unwrap_state_dict)
from .official import from_official

__all__ = ["checkpoint_filter_fn", "from_official", "is_official", "load_checkpoint_file",
           "official_depths", "official_to_ours", "ours_to_official", "unwrap_state_dict"]
