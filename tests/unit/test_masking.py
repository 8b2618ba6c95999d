"""Mask generators: exact counts, the 75-of-196 scaling rule, block shape, determinism."""

import numpy as np
import pytest

from itpn.objectives.masking import MaskGenerator, block_mask, num_masked_random, random_mask, scaled_num_masked


@pytest.mark.parametrize("grid,ratio", [(14, 0.75), (16, 0.75), (14, 0.6), (7, 0.5), (14, 0.0), (14, 1.0)])
def test_random_mask_count_follows_mae(grid, ratio):
    L = grid * grid
    expected = L - int(L * (1 - ratio))  # MAE: len_keep = int(L * (1 - ratio))
    rng = np.random.default_rng(0)
    for _ in range(20):
        m = random_mask(grid, ratio, rng)
        assert m.shape == (L,) and m.dtype == bool
        assert m.sum() == expected
    assert num_masked_random(196, 0.75) == 147
    assert num_masked_random(196, 0.6) == 118  # not int(196 * 0.6) = 117


def test_random_mask_is_uniform_over_patches():
    rng = np.random.default_rng(1)
    freq = np.mean([random_mask(14, 0.75, rng) for _ in range(2000)], axis=0)
    assert abs(freq.mean() - 0.75) < 1e-9
    assert freq.min() > 0.68 and freq.max() < 0.82


@pytest.mark.parametrize("grid,num", [(14, 75), (16, 98), (14, 0), (14, 196), (14, 150), (8, 20), (4, 3)])
def test_block_mask_count_is_exact(grid, num):
    rng = np.random.default_rng(2)
    for _ in range(50):
        m = block_mask(grid, num, rng)
        assert m.shape == (grid * grid,) and m.sum() == num


def test_block_mask_is_blocky():
    # Masked patches cluster: most have a masked 4-neighbour, unlike a random mask.
    rng = np.random.default_rng(3)

    def neighbour_fraction(m):
        g = m.reshape(14, 14)
        nb = np.zeros_like(g)
        nb[1:] |= g[:-1]
        nb[:-1] |= g[1:]
        nb[:, 1:] |= g[:, :-1]
        nb[:, :-1] |= g[:, 1:]
        return (nb & g).sum() / g.sum()

    block = np.mean([neighbour_fraction(block_mask(14, 75, rng)) for _ in range(100)])
    rand = np.mean([neighbour_fraction(random_mask(14, 75 / 196, rng)) for _ in range(100)])
    assert block > 0.95 and rand < 0.9


def test_block_mask_rejects_bad_counts():
    with pytest.raises(ValueError):
        block_mask(14, 197, np.random.default_rng(0))


def test_scaling_rule():
    assert scaled_num_masked(75, 14) == 75
    assert scaled_num_masked(75, 16) == 98          # round(75 / 196 * 256)
    gen = MaskGenerator("block", 16, num_masked=75)
    assert gen.num_masked == 98 and gen(np.random.default_rng(0)).sum() == 98
    assert MaskGenerator("block", 14, ratio=0.5).num_masked == 98
    assert MaskGenerator("random", 16, ratio=0.75).num_masked == 192
    assert MaskGenerator("random", 14, num_masked=75).num_masked == 75


def test_generator_is_deterministic_per_rng():
    gen = MaskGenerator("block", 14, num_masked=75)
    a = gen(np.random.default_rng([7, 1, 2]))
    b = gen(np.random.default_rng([7, 1, 2]))
    c = gen(np.random.default_rng([7, 1, 3]))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_generator_argument_errors():
    with pytest.raises(ValueError):
        MaskGenerator("grid", 14, ratio=0.5)
    with pytest.raises(ValueError):
        MaskGenerator("random", 14)
    with pytest.raises(ValueError):
        MaskGenerator("random", 14, ratio=0.5, num_masked=3)
