import json
import subprocess
import sys

from PIL import Image


def run_cli(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def test_local_teacher_dry_run_prints_the_config():
    proc = run_cli("local-teacher", "--dry-run", "--steps", "7")
    assert proc.returncode == 0 and "steps=7" in proc.stdout


def test_local_teacher_trains_and_writes_its_outputs(tmp_path):
    out = tmp_path / "qs"
    proc = run_cli(
        "local-teacher", "--out", str(out), "--photos", str(tmp_path / "photos"), "--steps", "30", "--batch", "4"
    )
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_images"] == 120 and metrics["teacher_nfe"] == 20
    for name in ("teacher.safetensors", "ema.safetensors", "config.json"):
        assert (out / name).is_file()
    with Image.open(out / "comparison.png") as im:
        assert im.size == (4 * 64, 6 * 64)


def test_bad_arguments_give_a_one_line_error_and_nonzero_exit():
    proc = run_cli("local-teacher", "--steps", "0")
    assert proc.returncode == 2 and "error" in proc.stderr and "Traceback" not in proc.stderr
