"""The weights that ship with the project: checked against their SHA-256, loadable into the quickstart's network,
and recorded with the command that made them."""

from __future__ import annotations

import json
import shutil

import pytest

from pipelines import shipped


def test_the_quickstart_teacher_is_verified_and_fits_the_quickstart_network():
    from oftsr.nets import build_unet, load_weights
    from pipelines.recipes import pipeline

    path = shipped.shipped_weights("quickstart_teacher")
    rec = shipped.record("quickstart_teacher")
    assert shipped.sha256_of(path) == rec["sha256"]
    assert rec["command"].startswith("oftsr local-teacher ")
    tree = pipeline("quickstart")
    assert tree.teacher.pretrained == "shipped://quickstart_teacher"  # the quickstart warm-starts from it, found
    assert shipped.resolve(tree.teacher.pretrained) == path  # on whichever node loads it
    assert rec["recipe"]["preset"] == tree.method.preset and rec["recipe"]["crop"] == tree.method.crop
    assert rec["recipe"]["sigma_p"] == tree.method.sigma_p and tuple(rec["data"]["held_out"]) == ("chelsea", "flower")
    load_weights(build_unet(tree.method.preset, image_size=tree.method.crop), path)  # strict: every key and shape
    m = rec["metrics"]  # what it reached on the held-out photos when it was made
    assert m["st_lpips_teacher"] < m["st_lpips_bicubic"]


@pytest.fixture
def assets(tmp_path, monkeypatch):
    folder = tmp_path / "assets"
    shutil.copytree(shipped.ASSETS, folder)
    monkeypatch.setattr(shipped, "ASSETS", folder)
    return folder


def test_damaged_or_missing_weights_are_refused_naming_the_file(assets):
    rec = shipped.record("quickstart_teacher")
    weights = assets / rec["file"]
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"quickstart_teacher\.safetensors: SHA-256 .* does not match"):
        shipped.shipped_weights("quickstart_teacher")
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="are missing"):
        shipped.shipped_weights("quickstart_teacher")
    with pytest.raises(FileNotFoundError, match="no shipped weights named 'nope'"):
        shipped.shipped_weights("nope")


def test_ship_writes_the_weights_and_a_record_that_verifies(assets, tmp_path):
    from oftsr.nets import build_unet, save_weights

    trained = tmp_path / "trained"
    net = build_unet("tiny", image_size=32)
    save_weights(net, trained / "ema.safetensors")
    recipe = {"preset": "tiny", "crop": 32, "sigma_p": 0.2, "held_out": ["chelsea"]}
    (trained / "config.json").write_text(json.dumps({"recipe": recipe, "unet": net.config.to_dict()}))
    (trained / "metrics.json").write_text(json.dumps({"st_lpips_teacher": 0.1}))
    rec = shipped.ship("made", trained, "oftsr local-teacher --steps 1")
    assert shipped.shipped_weights("made") == str(assets / "made.safetensors")
    assert shipped.record("made") == rec and rec["command"] == "oftsr local-teacher --steps 1"
    assert rec["sha256"] == shipped.sha256_of(trained / "ema.safetensors")
