"""The pixel-MIM TensorBoard grid puts the original back where nothing is masked."""

import torch

from itpn.engine.visual import mim_grid, unpatchify
from itpn.objectives.pixel_mim import patchify


def test_unpatchify_inverts_patchify():
    x = torch.randn(2, 3, 32, 48)
    torch.testing.assert_close(unpatchify(patchify(x, 16), 16, (2, 3)), x)


def test_grid_rows():
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    x = torch.rand(2, 3, 32, 32) * 0.5  # normalised images whose de-normalisation stays in [0, 1]
    mask = torch.tensor([[True, False, False, True], [False, False, False, False]])
    pred = patchify(x, 16)  # a perfect (un-normalised) reconstruction
    g = mim_grid(x, pred, mask, 16, mean, std, norm_pix=False, n=2)
    assert g.shape == (3, 2 * 34 + 2, 3 * 34 + 2)
    tile = lambda r, c: g[:, 2 + r * 34: 2 + r * 34 + 32, 2 + c * 34: 2 + c * 34 + 32]  # noqa: E731
    original = x[0] * 0.25 + 0.5
    torch.testing.assert_close(tile(0, 2), original)
    torch.testing.assert_close(tile(0, 1), original)  # perfect reconstruction pasted back
    assert tile(0, 0)[:, :16, :16].sub(0.5).abs().max() < 1e-6  # masked patch shown as the mean colour
