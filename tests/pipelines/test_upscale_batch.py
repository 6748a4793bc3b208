"""Batch upscaling (``oftsr upscale``): a moto bucket of good and bad images through the Ray Data pipeline on a local
Ray cluster, and the one-process engine on a folder; the same pixels from both, bad inputs counted by reason,
reruns that skip what is complete, and the report."""

from __future__ import annotations

import dataclasses
import io
import json
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.batch_upscale import REPORT, UpscaleJob, image_seed, list_inputs, output_rel, run
from pipelines.registry import load_model
from tests.helpers import assert_same_pixels, expected_one_step, perturbed_unet, register_student

BUCKET = "upscale-batch"


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` pixels (a decompression bomb's header), with no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


def encoded(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


GOOD = {  # relative path -> (height, width, format): every format the decoder reads, nested folders
    "a.png": (20, 28, "PNG"),
    "b.jpg": (16, 16, "JPEG"),
    "c.webp": (12, 20, "WEBP"),
    "deep/d.tiff": (16, 24, "TIFF"),
    "deep/deeper/e.png": (24, 16, "PNG"),
}


def inputs() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    files = {rel: encoded(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), fmt) for rel, (h, w, fmt) in GOOD.items()}
    good_png = files["a.png"]
    files.update(
        {
            "bomb.png": png_header_only(40000, 40000),
            "notes.png": b"not an image at all",
            "truncated.png": good_png[: len(good_png) // 2],
            "empty.jpg": b"",
        }
    )
    return files


BAD = {"bomb.png": "too-large", "notes.png": "not-an-image", "truncated.png": "corrupt", "empty.jpg": "empty"}


@pytest.fixture(scope="module")
def student_uri(tmp_path_factory):
    torch.manual_seed(0)
    return register_student(tmp_path_factory.mktemp("student"), perturbed_unet(0.02), crop=64)


@pytest.fixture(scope="module")
def bucket(s3_client):
    s3_client.create_bucket(Bucket=BUCKET)
    for rel, data in inputs().items():
        s3_client.put_object(Bucket=BUCKET, Key=f"in/{rel}", Body=data)
    return f"s3://{BUCKET}/in"


def test_names_follow_the_inputs_relative_paths(tmp_path):
    assert output_rel("deep/d.tiff", 0.5) == "deep/d_t0.5.png"
    assert output_rel("a.png", 1.0) == "a_t1.png" and output_rel("noext", 0) == "noext_t0.png"
    for rel, data in inputs().items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    rows = list_inputs((str(tmp_path),))
    assert sorted(r["rel"] for r in rows) == sorted(inputs())  # .webp and .tiff included


def test_a_bucket_upscales_through_ray_data_counting_bad_inputs_and_a_rerun_skips_what_is_done(
    bucket, student_uri, ray_cluster, s3_client, tmp_path
):
    job = UpscaleJob(
        sources=(bucket,),
        dest=f"s3://{BUCKET}/out",
        knobs=(0.0, 1.0),
        model="models:/oftsr-student@candidate",
        tracking_uri=student_uri,
        engine="ray",
        workers=1,
        cpus_per_worker=0.5,
        batch_size=2,
    )
    report = run(job)
    assert report["engine"] == "ray" and report["images_done"] == len(GOOD) and report["outputs_written"] == 10
    assert report["skipped_by_reason"] == {reason: 1 for reason in BAD.values()}
    assert sorted(item.split(": ", 1)[0].rsplit("/", 1)[-1] for item in report["skipped"]) == sorted(BAD)
    keys = {o["Key"] for o in s3_client.list_objects_v2(Bucket=BUCKET, Prefix="out/")["Contents"]}
    assert keys == {f"out/{output_rel(rel, t)}" for rel in GOOD for t in (0.0, 1.0)} | {f"out/{REPORT}"}
    for rel, (h, w, _) in GOOD.items():
        body = s3_client.get_object(Bucket=BUCKET, Key=f"out/{output_rel(rel, 1.0)}")["Body"].read()
        assert Image.open(io.BytesIO(body)).size == (4 * w, 4 * h)
    # the pixels are the one-step output written out from the method (b.jpg's 64x64 output is one tile)
    net, meta = load_model("models:/oftsr-student@candidate", tracking_uri=student_uri)
    lr = np.asarray(Image.open(io.BytesIO(inputs()["b.jpg"])).convert("RGB"))
    for t in (0.0, 1.0):
        body = s3_client.get_object(Bucket=BUCKET, Key=f"out/{output_rel('b.jpg', t)}")["Body"].read()
        want = expected_one_step(net, lr, t, image_seed(0, "b.jpg"), meta)
        assert_same_pixels(np.asarray(Image.open(io.BytesIO(body))), want, f"the Ray Data engine at t = {t}")
    stored = json.loads(s3_client.get_object(Bucket=BUCKET, Key=f"out/{REPORT}")["Body"].read())
    assert stored["images_done"] == len(GOOD) and stored["model"].startswith("models:/oftsr-student/")

    again = run(job)
    assert again["images_done"] == 0 and again["images_already_done"] == len(GOOD)
    assert again["images_skipped"] == len(BAD)  # bad inputs are listed again, and named again

    # the one-process engine on the same files gives the same pixels (each image's noise has its own seed), and a
    # pipeline with another noise would not: the seeds are what make them agree
    local_in = tmp_path / "in"
    for rel, data in inputs().items():
        (local_in / rel).parent.mkdir(parents=True, exist_ok=True)
        (local_in / rel).write_bytes(data)
    local = run(dataclasses.replace(job, sources=(str(local_in),), dest=str(tmp_path / "out"), engine="local"))
    assert local["images_done"] == len(GOOD) and local["skipped_by_reason"] == again["skipped_by_reason"]
    for rel in GOOD:
        remote = s3_client.get_object(Bucket=BUCKET, Key=f"out/{output_rel(rel, 0.0)}")["Body"].read()
        here = (tmp_path / "out" / output_rel(rel, 0.0)).read_bytes()
        a, b = (np.asarray(Image.open(io.BytesIO(x)), dtype=np.int16) for x in (remote, here))
        assert np.abs(a - b).max() <= 1  # up to rounding (another process, other thread counts)
    one = (str(local_in / "a.png"),)
    run(dataclasses.replace(job, sources=one, dest=str(tmp_path / "seed1"), engine="local", seed=1))
    a, b = (
        np.asarray(Image.open(d / output_rel("a.png", 0.0)), dtype=np.int16)
        for d in (tmp_path / "out", tmp_path / "seed1")
    )
    assert np.abs(a - b).mean() > 0.5


def test_the_command_upscales_a_folder_in_one_process_and_fails_only_when_nothing_could_be_done(student_uri, tmp_path):
    folder = tmp_path / "photos"
    for rel, data in inputs().items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pipelines.cli", "upscale", str(folder), "-o", str(out), "--t", "0.5"]
    cmd += ["--model", "models:/oftsr-student@candidate", "--tracking-uri", student_uri]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "local engine" in proc.stdout and "5 images done" in proc.stdout and "4 skipped" in proc.stdout
    assert all((out / output_rel(rel, 0.5)).is_file() for rel in GOOD)
    report = json.loads((out / REPORT).read_text())
    assert report["skipped_by_reason"] == {reason: 1 for reason in BAD.values()}
    assert not list(out.rglob("*.tmp"))  # nothing partial left behind
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0 and "5 already done" in rerun.stdout
    only_bad = subprocess.run(
        [*cmd[:4], str(folder / "notes.png"), *cmd[5:]], capture_output=True, text=True, timeout=300
    )
    assert only_bad.returncode == 2 and "notes.png" in only_bad.stderr and "not-an-image" in only_bad.stderr
    assert "Traceback" not in only_bad.stderr
