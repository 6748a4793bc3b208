"""Bad command lines and configs: each gets one line on stderr naming the thing and the reason, exit code 2, and
no traceback; nothing is written."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from oftsr.method import Method
from oftsr.nets import build_unet
from pipelines.train.checkpoint import save_checkpoint

pytestmark = pytest.mark.timeout(300)


def oftsr(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    net = build_unet("tiny")
    stage = {"stage": "distill", **Method(crop=64).to_dict()}
    save_checkpoint(root / "student", model=net, ema=net, unet=net.config, state={"images_seen": 0}, stage=stage)
    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(root / "small.png")
    (root / "empty").mkdir()
    (root / "notes.png").write_text("not an image")
    (root / "out").mkdir()
    return root


def cases(root):
    student = str(root / "student")
    up = ("upscale", "--model", student, "-o", str(root / "new"))
    registry = ("upscale", "--model", "models:/nope@champion", "--tracking-uri", f"sqlite:///{root / 'm.db'}")
    return {
        "missing input": ((*up, str(root / "nope.png")), [str(root / "nope.png"), "not found"]),
        "folder without images": ((*up, str(root / "empty")), [str(root / "empty"), "no images"]),
        "not an image": ((*up, str(root / "notes.png")), [str(root / "notes.png"), "not-an-image", "no image could"]),
        "t above 1": ((*up, str(root / "small.png"), "--t", "1.5"), ["1.5", "[0, 1]"]),
        "t NaN": ((*up, str(root / "small.png"), "--t", "nan"), ["nan", "finite"]),
        "unknown --set key": (("teacher", "quickstart", "--dry-run", "--set", "optim.lrr=1"), ["optim.lrr'"]),
        "wrong type": (("teacher", "quickstart", "--dry-run", "--set", "optim.lr=fast"), ["optim.lr", "number"]),
        "invalid value": (("teacher", "quickstart", "--dry-run", "--set", "method.crop=-8"), ["crop"]),
        "unknown recipe": (("run", "ffhq_x8", "--dry-run"), ["ffhq_x8", "unknown recipe"]),
        "model URI not found": (
            (*registry, "-o", str(root / "new"), str(root / "small.png")),
            ["models:/nope@champion", "not found"],
        ),
        "checkpoint not found": (
            ("upscale", str(root / "small.png"), "-o", str(root / "new"), "--model", str(root / "nockpt")),
            [str(root / "nockpt"), "not found"],
        ),
        "output is a file": (
            ("upscale", str(root / "small.png"), "--model", student, "-o", str(root / "small.png")),
            [str(root / "small.png")],
        ),
        "missing spool file": (("tracking", "replay", str(root / "x.jsonl")), [str(root / "x.jsonl")]),
    }


CASE_NAMES = [
    "missing input",
    "folder without images",
    "not an image",
    "t above 1",
    "t NaN",
    "unknown --set key",
    "wrong type",
    "invalid value",
    "unknown recipe",
    "model URI not found",
    "checkpoint not found",
    "output is a file",
    "missing spool file",
]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_a_bad_command_line_gets_one_clear_line_and_exit_code_2(setup, name):
    args, expected = cases(setup)[name]
    proc = oftsr(*args)
    err = proc.stderr.strip()
    assert proc.returncode == 2, (name, proc.returncode, err[-2000:])
    assert "Traceback" not in proc.stderr, err[-2000:]
    last = err.splitlines()[-1]
    assert last.startswith("oftsr ") and ": error: " in last, err
    for part in expected:
        assert part in last, (name, last)
    assert not (setup / "new").exists()  # nothing written
    assert not list((setup / "out").iterdir())


def test_every_case_is_listed():
    assert sorted(CASE_NAMES) == sorted(cases(__import__("pathlib").Path("/r")))
