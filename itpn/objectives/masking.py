"""Patch-mask generators for masked image modeling (iTPN paper, section 3.3 and Table 9).

iTPN masks 75% of the patches of the stage-3 grid (14x14 at 224 px, patch 16). Pixel MIM
follows MAE and masks patches uniformly at random; CLIP-supervised MFM follows BEiT and
masks rectangular blocks ("block-wise, 75 of 196 patches").

Both generators take a ``numpy.random.Generator`` so that the data loader can derive one
generator per sample from (seed, epoch, stream, position) and reproduce a mask exactly
after a resume. Masks are bool arrays of shape (grid * grid,), row-major over the grid,
True = masked -- the layout the objectives expect for ``mask`` (B, N).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["random_mask", "block_mask", "num_masked_random", "scaled_num_masked", "MaskGenerator"]


def num_masked_random(num_patches: int, ratio: float) -> int:
    """Masked-patch count of ``random_mask``: ``L - int(L * (1 - ratio))``.

    This is MAE's convention (``len_keep = int(L * (1 - mask_ratio))``), so a loader mask
    and MAE's in-model ``random_masking`` hide the same number of patches.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must be in [0, 1], got {ratio}")
    return num_patches - int(num_patches * (1.0 - ratio))


def scaled_num_masked(num_masked: int, grid: int, ref_grid: int = 14) -> int:
    """Carry a block-mask count given for a ``ref_grid`` grid over to ``grid``.

    The paper's "75 of 196" is for the 14x14 grid; for a 16x16 grid (256 px, patch 16)
    the same masked fraction is ``round(75 / 196 * 256) = 98`` patches.
    """
    if grid == ref_grid:
        return num_masked
    return int(round(num_masked / (ref_grid * ref_grid) * grid * grid))


def random_mask(grid: int, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """MAE-style uniform random mask: exactly ``num_masked_random(grid*grid, ratio)`` True."""
    return _random_mask_count(grid, num_masked_random(grid * grid, ratio), rng)


def _random_mask_count(grid: int, num_masked: int, rng: np.random.Generator) -> np.ndarray:
    num_patches = grid * grid
    mask = np.zeros(num_patches, dtype=bool)
    mask[rng.permutation(num_patches)[:num_masked]] = True
    return mask


def _place_block(mask: np.ndarray, budget: int, min_block: int, log_aspect: tuple[float, float],
                 rng: np.random.Generator, attempts: int = 10) -> int:
    """Try to mask one rectangle that adds between 1 and ``budget`` new patches.

    mask (grid, grid) is updated in place; returns the number of newly masked patches
    (0 when every attempt either did not fit or would overshoot the budget).
    """
    grid_h, grid_w = mask.shape
    # BEiT draws the block area from [min_block, budget]; once the budget drops below
    # min_block that interval is empty, so the small remainder is drawn from [1, budget].
    low = min(min_block, budget)
    for _ in range(attempts):
        area = rng.uniform(low, budget)
        aspect = math.exp(rng.uniform(*log_aspect))
        h = int(round(math.sqrt(area * aspect)))
        w = int(round(math.sqrt(area / aspect)))
        if not (0 < h < grid_h and 0 < w < grid_w):
            continue
        top = int(rng.integers(0, grid_h - h + 1))
        left = int(rng.integers(0, grid_w - w + 1))
        window = mask[top: top + h, left: left + w]
        added = h * w - int(window.sum())
        # A block that would overshoot the budget is rejected rather than clipped, so the
        # count never exceeds num_masked; blocks that add nothing are rejected too.
        if 0 < added <= budget:
            window[...] = True
            return added
    return 0


def _top_up(mask: np.ndarray, missing: int, rng: np.random.Generator) -> None:
    """Mask ``missing`` more patches, preferring unmasked 4-neighbours of masked ones so the
    added patches grow the existing blocks instead of scattering single patches."""
    grid_h, grid_w = mask.shape
    while missing > 0:
        border = np.zeros_like(mask)
        border[1:, :] |= mask[:-1, :]
        border[:-1, :] |= mask[1:, :]
        border[:, 1:] |= mask[:, :-1]
        border[:, :-1] |= mask[:, 1:]
        candidates = np.flatnonzero(border & ~mask)
        if candidates.size == 0:  # empty mask: start anywhere
            candidates = np.flatnonzero(~mask)
        chosen = rng.permutation(candidates)[:missing]
        mask.reshape(-1)[chosen] = True
        missing -= chosen.size


def block_mask(grid: int, num_masked: int, rng: np.random.Generator, min_block: int = 16,
               max_block: int | None = None, aspect: tuple[float, float] = (0.3, 1 / 0.3)) -> np.ndarray:
    """BEiT-style block-wise mask with exactly ``num_masked`` True entries.

    Rectangles of area in [min_block, max_block] patches and aspect ratio in ``aspect``
    (log-uniform) are placed at random until the count is reached. BEiT's generator stops
    early when ten attempts in a row fail to place a block, so it can under-fill; here the
    shortfall is topped up from the rng with patches bordering the masked region, which
    makes the count exact while keeping the mask blocky. Blocks never overshoot (a block
    that would exceed the remaining budget is rejected), so no trimming is needed.
    """
    num_patches = grid * grid
    if not 0 <= num_masked <= num_patches:
        raise ValueError(f"num_masked must be in [0, {num_patches}], got {num_masked}")
    max_block = num_masked if max_block is None else max_block
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    mask = np.zeros((grid, grid), dtype=bool)
    count = 0
    while count < num_masked:
        added = _place_block(mask, min(num_masked - count, max_block), min_block, log_aspect, rng)
        if added == 0:
            break
        count += added
    if count < num_masked:
        _top_up(mask, num_masked - count, rng)
    return mask.reshape(-1)  # (grid*grid,), row-major


class MaskGenerator:
    """Mask factory the data loader calls once per sample: ``mask = gen(rng)``.

    kind="random": ``ratio`` of the patches, counted as in ``num_masked_random`` (or
    ``num_masked`` patches of a ``ref_grid`` grid, scaled as for blocks).
    kind="block": ``num_masked`` patches given for a ``ref_grid`` x ``ref_grid`` grid
    (default 14, i.e. the paper's "75 of 196") and scaled to ``grid`` by
    ``scaled_num_masked`` -- 98 of 256 for a 16x16 grid; alternatively ``ratio``, which
    gives ``round(ratio * grid * grid)`` patches.
    """

    def __init__(self, kind: str, grid: int, ratio: float | None = None, num_masked: int | None = None,
                 ref_grid: int = 14, min_block: int = 16, max_block: int | None = None,
                 aspect: tuple[float, float] = (0.3, 1 / 0.3)):
        if kind not in ("random", "block"):
            raise ValueError(f"mask kind must be 'random' or 'block', got {kind!r}")
        if (ratio is None) == (num_masked is None):
            raise ValueError("give exactly one of ratio and num_masked")
        self.kind = kind
        self.grid = grid
        self.num_patches = grid * grid
        if kind == "random":
            if ratio is None:
                self.num_masked = scaled_num_masked(num_masked, grid, ref_grid)
            else:
                self.num_masked = num_masked_random(self.num_patches, ratio)
            self.ratio = self.num_masked / self.num_patches
        else:
            if num_masked is None:
                num_masked = int(round(ratio * self.num_patches))
            else:
                num_masked = scaled_num_masked(num_masked, grid, ref_grid)
            self.num_masked = num_masked
            self.ratio = num_masked / self.num_patches
        if not 0 <= self.num_masked <= self.num_patches:
            raise ValueError(f"{self.num_masked} masked patches do not fit a {grid}x{grid} grid")
        self.min_block = min_block
        self.max_block = max_block
        self.aspect = aspect

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        if self.kind == "random":
            return _random_mask_count(self.grid, self.num_masked, rng)
        return block_mask(self.grid, self.num_masked, rng, self.min_block, self.max_block, self.aspect)

    def __repr__(self) -> str:
        return (f"MaskGenerator(kind={self.kind!r}, grid={self.grid}, "
                f"num_masked={self.num_masked} of {self.num_patches})")
