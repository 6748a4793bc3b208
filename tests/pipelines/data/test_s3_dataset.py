"""The data plane against a real S3-compatible server (moto) and a real local Ray cluster."""

import subprocess
import sys

import numpy as np
import pytest

from pipelines.data.config import DataConfig
from pipelines.data.manifest import list_images, manifest_hash, read_manifest
from tests.pipelines.data.images import bad, photos, unusual_good

BUCKET = "oftsr-data"
pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def bucket(s3_client):
    s3_client.create_bucket(Bucket=BUCKET)
    objects = {
        **photos(),
        **{f"odd/{k}": v for k, v in unusual_good().items()},
        **{f"bad/{k}": v for k, (v, _) in bad().items()},
        "notes/readme.txt": b"not listed",
    }
    for key, data in objects.items():
        s3_client.put_object(Bucket=BUCKET, Key=key, Body=data)
    return f"s3://{BUCKET}"


def test_listing_finds_every_image_key_in_parallel(bucket):
    rows = list_images(bucket)
    expected = len(photos()) + len(unusual_good()) + len(bad())
    assert len(rows) == expected
    assert all(r["key"].startswith(f"s3://{BUCKET}/") for r in rows)
    assert {r["key"] for r in rows if r["size"] == 0} == {f"s3://{BUCKET}/bad/zero.png"}


def test_manifest_command_writes_a_parquet_manifest(bucket, tmp_path, s3_endpoint):
    out = tmp_path / "manifest.parquet"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.cli",
            "manifest",
            bucket,
            "-o",
            str(out),
            "--storage-option",
            f"endpoint_url={s3_endpoint}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    rows = read_manifest(str(out))
    assert manifest_hash(rows) == manifest_hash(list_images(bucket)) and "images" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "manifest", f"s3://{BUCKET}/none", "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "s3://oftsr-data/none" in proc.stderr and "Traceback" not in proc.stderr


def test_training_crops_stream_from_s3_with_skips_reported(bucket, ray_cluster):
    from pipelines.data.dataset import format_summary, training_dataset

    cfg = DataConfig(
        source=bucket, crop=64, crops_per_image=2, dtype="float16", keep_lr=True, batch_size=4, max_bad_fraction=0.5
    )
    ds, ledger = training_dataset(cfg)
    rows = ds.take_all()
    good = len(photos()) + len(unusual_good())
    assert len(rows) == 2 * good
    hr = np.stack([r["hr"] for r in rows])
    assert hr.shape == (2 * good, 3, 64, 64) and hr.dtype == np.float16
    assert hr.min() >= -1 and hr.max() <= 1
    assert rows[0]["lr"].shape == (3, 16, 16)
    summary = ledger.summary()
    assert summary["seen"] == good + len(bad())
    assert sorted((i["key"], i["reason"]) for i in summary["items"]) == sorted(
        (f"s3://{BUCKET}/bad/{k}", r) for k, (_, r) in bad().items()
    )
    text = format_summary(summary)
    assert "4 skipped" in text and f"s3://{BUCKET}/bad/truncated.png: corrupt" in text


def test_manifest_input_and_evaluation_crops_are_deterministic(bucket, ray_cluster, tmp_path):
    from pipelines.data.dataset import evaluation_dataset
    from pipelines.data.manifest import write_manifest

    rows = [r for r in list_images(bucket) if "/photos/" in r["key"]]
    manifest = write_manifest(rows, str(tmp_path / "m.parquet"))
    cfg = DataConfig(manifest=manifest, crop=64, sigma_y=0.05, keep_lr=True)
    a = evaluation_dataset(cfg)[0].take_all()
    b = evaluation_dataset(cfg)[0].take_all()
    assert [r["key"] for r in a] == sorted(r["key"] for r in rows)
    assert all(np.array_equal(x["lr"], y["lr"]) for x, y in zip(a, b, strict=True))


def test_too_many_bad_objects_stop_the_stage_with_a_clear_error(bucket, ray_cluster):
    from pipelines.data.dataset import training_dataset

    cfg = DataConfig(source=f"{bucket}/bad", crop=64, max_bad_fraction=0.1, min_seen_for_fraction=2, batch_size=2)
    ds, _ = training_dataset(cfg)
    with pytest.raises(Exception, match="max_bad_fraction"):
        ds.take_all()
