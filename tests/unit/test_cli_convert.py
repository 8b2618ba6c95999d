"""``itpn-convert`` both ways on a fixture, and the model listing command."""

import os

import torch

from itpn.cli import convert, models
from itpn.compat import from_official, load_checkpoint_file


def test_convert_round_trip(fixtures_dir, tmp_path, capsys):
    src = os.path.join(fixtures_dir, "clip_distill.pt")
    d = torch.load(src, weights_only=False)
    official = tmp_path / "official.pth"
    torch.save(d["checkpoint"], official)
    ours, back = tmp_path / "ours.pth", tmp_path / "back.pth"
    assert convert.main(["to-ours", str(official), str(ours), "--kind", "clip_distill"]) == 0
    sd = load_checkpoint_file(ours)
    assert "encoder.stage1.0.mlp.fc1.weight" in sd and "pyramid.split16.reduction.weight" in sd
    assert convert.main(["to-official", str(ours), str(back), "--kind", "clip_distill"]) == 0
    again = load_checkpoint_file(back)
    assert again.keys() == d["checkpoint"]["model"].keys()
    for k, v in d["checkpoint"]["model"].items():
        torch.testing.assert_close(again[k], v, msg=k)
    m = from_official(str(back), "clip_distill", **d["kwargs"])
    with torch.no_grad():
        out = m(d["x"], d["bool_masked_pos"])
    assert ((out["mfm"] - d["mfm_pred"]).norm() / d["mfm_pred"].norm()) < 1e-5
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_models_listing_runs(capsys):
    assert models.main(["--forward", "itpn_fpn_base_patch16_224", "--batch", "1"]) == 0
    out = capsys.readouterr().out
    assert "itpn_large_patch16_224" in out and "288.5" in out
    assert "-> [(1, 256, 56, 56), (1, 256, 28, 28), (1, 256, 14, 14), (1, 256, 7, 7)]" in out
