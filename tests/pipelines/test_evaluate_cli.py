import json
import subprocess
import sys

import torch

from oftsr.method import Method
from oftsr.samples import export_sample_split
from tests.helpers import perturbed_unet, save_net_checkpoint


def test_evaluate_writes_the_curve_and_tables_for_checkpoints(tmp_path):
    _, heldout = export_sample_split(tmp_path / "photos")
    for kind in ("teacher", "distill"):
        torch.manual_seed(0)
        net = perturbed_unet(0.01)
        stage = {"stage": kind, **Method(crop=64).to_dict()}
        save_net_checkpoint(tmp_path / kind / "checkpoint_000000000001", net, stage)
    out = tmp_path / "report"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.cli",
            "evaluate",
            "--student",
            str(tmp_path / "distill"),
            "--teacher",
            str(tmp_path / "teacher"),
            "--source",
            str(heldout),
            "-o",
            str(out),
            "--crops-per-image",
            "2",
            "--knobs",
            "0",
            "1",
            "--teacher-steps",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "evaluation.json").read_text())
    assert report["n"] == 4 and {(r["method"], r["t"]) for r in report["rows"]} == {
        ("bicubic", None),
        ("teacher", None),
        ("student", 0.0),
        ("student", 1.0),
    }
    assert (out / "curve.png").stat().st_size > 10_000 and "| student | 1.0 | 1 |" in proc.stdout
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.cli",
            "evaluate",
            "--student",
            str(tmp_path / "nope"),
            "--source",
            str(heldout),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "nope" in bad.stderr and "Traceback" not in bad.stderr
