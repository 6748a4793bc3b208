"""``oftsr import``: official checkpoints (stand-ins of the official format, a reduced-size network) into our
checkpoint format and the registry, and their uses: ``oftsr upscale``, the pyfunc model (models-from-code:
nothing unpickled), a distillation's teacher. The network equivalence itself is proven in
``tests/core/test_official.py``."""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import sys

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from oftsr.nets import UNet, preset_config
from pipelines.importer import import_checkpoint
from tests.helpers import perturbed_unet

TEACHER_FILE = "sr_bicubic-sf4-guided_unet-sigma0.1-bs32-loss_l1-lr0.0001-FFHQ-checkpoint_10.pth"
STUDENT_FILE = (
    "sr_bicubic-sf4-guided_unet-sigma0.1-bs32-loss_l1-lr1e-05-distil-v_boot-solver_rk2_0.5-dt0.05-w_distil_1.0-"
    "w_bound_0.1-w_align_0.01-FFHQ_DIS-checkpoint_2.pth"
)
#: the ffhq_x4 recipe's network, reduced: five levels of 32 channels (the lowest at 16x16 for 256x256 crops)
STAND_IN = {"model_channels": 32, "channel_mult": (1, 1, 1, 1, 1), "num_head_channels": 32}


def official_file(path, seed: int) -> UNet:
    """A file as the official code saves its released checkpoints (EMA only, ``shadow_params`` in parameter order)
    holding a random stand-in network; returns that network."""
    torch.manual_seed(seed)
    net = perturbed_unet(0.02, "ffhq", image_size=256, **STAND_IN)
    shadow = [p.detach().clone() for p in net.parameters()]
    torch.save({"ema": {"decay": 0.9999, "num_updates": 7, "shadow_params": shadow}, "step": 70_000}, path)
    return net


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("import")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    nets, results = {}, {}
    for kind, name in (("teacher", TEACHER_FILE), ("student", STUDENT_FILE)):
        nets[kind] = official_file(root / name, seed=1 if kind == "teacher" else 2)
        results[kind] = import_checkpoint(
            root / name, kind=kind, out=root / f"ckpt-{kind}", tracking_uri=uri, preset_overrides=STAND_IN, log=print
        )
    return root, uri, nets, results


def test_an_imported_model_is_registered_with_its_source_and_loads_without_unpickling(imported, tmp_path, monkeypatch):
    root, uri, _, results = imported
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    for kind, name in (("teacher", TEACHER_FILE), ("student", STUDENT_FILE)):
        mv = client.get_model_version_by_alias(f"oftsr-{kind}", "official")
        assert str(mv.version) == results[kind]["version"]
        assert mv.tags["oftsr.source_file"] == name
        assert len(mv.tags["oftsr.source_sha256"]) == 64 and mv.tags["oftsr.source_weights"] == "ema"
        assert (mv.tags["oftsr.recipe"], mv.tags["oftsr.sigma_p"], mv.tags["oftsr.kind"]) == ("ffhq_x4", "0.1", kind)
        # our checkpoint format, written beside: the same weights
        stage = json.loads((root / f"ckpt-{kind}" / "stage.json").read_text())
        assert stage["stage"] == ("distill" if kind == "student" else "teacher") and stage["source_step"] == 70_000
    # importing the same file again reuses its version
    again = import_checkpoint(
        root / STUDENT_FILE, kind="student", out=tmp_path / "again", tracking_uri=uri, preset_overrides=STAND_IN
    )
    assert again["reused"] and again["version"] == results["student"]["version"]

    # models-from-code: the registered artifacts hold code, weights and JSON, no pickle
    local = mlflow.artifacts.download_artifacts(
        artifact_uri="models:/oftsr-student@official", dst_path=str(tmp_path / "dl"), tracking_uri=uri
    )
    files = [p.name for p in (tmp_path / "dl").rglob("*") if p.is_file()]
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))], files
    mlmodel = (tmp_path / "dl" / "MLmodel").read_text()
    assert "model_code_path" in mlmodel and "python_model.pkl" not in mlmodel, local
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    model = mlflow.pyfunc.load_model("models:/oftsr-student@official")
    lr = np.random.default_rng(0).integers(0, 256, size=(1, 32, 32, 3), dtype=np.uint8)
    hr = model.predict(lr, params={"t": 1.0, "seed": 4})
    assert hr.shape == (1, 128, 128, 3) and hr.dtype == np.uint8
    # its pixels: the one-step output written out from the method, the start noise drawn from the seed
    from pipelines.registry import load_model
    from tests.helpers import assert_same_pixels, expected_one_step

    net, meta = load_model("models:/oftsr-student@official", tracking_uri=uri)
    assert_same_pixels(hr[0], expected_one_step(net, lr[0], 1.0, 4, meta), "the pyfunc model at t = 1")


def test_upscale_with_the_imported_student(imported, tmp_path):
    _, uri, _, _ = imported
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    cmd = [sys.executable, "-m", "pipelines.cli", "upscale", str(tmp_path / "a.png"), "-o", str(tmp_path / "out")]
    cmd += ["--t", "0", "1", "--model", "models:/oftsr-student@official", "--tracking-uri", uri]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    outs = sorted((tmp_path / "out").glob("*.png"))
    assert [Image.open(p).size for p in outs] == [(160, 96), (160, 96)]
    assert np.abs(np.asarray(Image.open(outs[0]), float) - np.asarray(Image.open(outs[1]), float)).mean() > 0


def test_a_distillation_takes_the_imported_teacher_from_the_registry(imported):
    from pipelines.recipes import recipe
    from pipelines.tracking import TrackingConfig
    from pipelines.train.driver import pin_registered_teacher
    from pipelines.train.loop import _networks

    _, uri, nets, results = imported
    cfg = recipe("ffhq_x4", "distill")
    cfg = dataclasses.replace(
        cfg, teacher="models:/oftsr-teacher@official", tracking=TrackingConfig(tracking_uri=uri), targets="online"
    )
    pinned = pin_registered_teacher(cfg)
    assert pinned == f"models:/oftsr-teacher/{results['teacher']['version']}"
    student, teacher = _networks(dataclasses.replace(cfg, teacher=pinned))
    want = dict(nets["teacher"].named_parameters())
    for name, p in teacher.named_parameters():
        torch.testing.assert_close(p, want[name])
    assert student.config == teacher.config == preset_config("ffhq", image_size=256, **STAND_IN)
    # a distillation with other method parameters refuses it, naming the field; a student is not a teacher
    other = dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, sigma_p=0.2))
    with pytest.raises(ValueError, match=r"sigma_p: 0.2 here, '0.1' there"):
        pin_registered_teacher(other)
    with pytest.raises(ValueError, match="is a student model, not a teacher"):
        pin_registered_teacher(dataclasses.replace(cfg, teacher="models:/oftsr-student@official"))


def test_import_refuses_contradictions_and_files_that_do_not_fit_registering_nothing(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    official_file(tmp_path / TEACHER_FILE, seed=3)
    (tmp_path / "renamed").mkdir()
    official_file(tmp_path / "renamed" / STUDENT_FILE, seed=3)

    def run(*args):
        cmd = [sys.executable, "-m", "pipelines.cli", "import", *map(str, args), "--tracking-uri", uri]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)

    cases = [
        ((tmp_path / TEACHER_FILE, "--as", "teacher", "--recipe", "div2k_x4"), "the file name says recipe ffhq_x4"),
        ((tmp_path / "renamed" / STUDENT_FILE, "--as", "teacher"), "says it is a student, but it is imported --as"),
        # the stand-in's weights are not the ffhq network's: refused with the first tensor that differs
        ((tmp_path / TEACHER_FILE, "--as", "teacher"), "'ema' holds"),
        ((tmp_path / TEACHER_FILE, "--as", "teacher", "--raw"), "no 'model' state dict"),
    ]
    for args, message in cases:
        proc = run(*args)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr[-1500:])
        assert "Traceback" not in proc.stderr
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert client.search_registered_models() == []
    assert not (tmp_path / "outputs" / "imported").exists() or not any((tmp_path / "outputs" / "imported").iterdir())


def test_the_paper_protocol_evaluates_the_listed_images_and_names_the_missing(imported, tmp_path):
    from oftsr.samples import export_sample_photos

    _, uri, _, _ = imported
    photos = sorted(p for p in export_sample_photos(tmp_path / "photos") if min(Image.open(p).size) >= 256)
    source = tmp_path / "ffhq_val"
    source.mkdir()
    for photo, name in zip(photos[:2], ("69007.png", "69997.png"), strict=True):
        Image.open(photo).convert("RGB").save(source / name)
    (source / "69017.png").write_bytes(b"not a png")  # listed but unusable: named, not fatal
    (source / "00001.png").write_bytes(b"not listed: never read")
    out = tmp_path / "report"
    base = [sys.executable, "-m", "pipelines.cli", "evaluate", "--protocol", "paper", "--source", str(source)]
    base += ["--student", "models:/oftsr-student@official", "--tracking-uri", uri, "-o", str(out)]
    proc = subprocess.run([*base, "--task", "ffhq"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "paper_ffhq.json").read_text())
    assert report["images"] == ["69007.png", "69997.png"]
    assert len(report["missing"]) == 97 and "69027.png" in report["missing"]
    assert [u.split(":")[0] for u in report["unusable"]] == ["69017.png"]
    rows = {(r["method"], r["t"]): r for r in report["rows"]}
    assert set(rows) == {("bicubic", None), ("student", 0.0), ("student", 1.0)}
    assert report["settings"]["one_step_scale"] == pytest.approx(0.999) and report["settings"]["clamp"] is False
    assert report["settings"]["method"]["crop"] == 256 and report["settings"]["seed"] == 42
    assert "Published" in proc.stdout and "Missing from" in proc.stdout
    # the student was imported for ffhq_x4 (sigma_p 0.1): DIV2K's protocol (sigma_p 0.2) refuses it
    wrong = subprocess.run([*base, "--task", "div2k"], capture_output=True, text=True, timeout=600)
    assert wrong.returncode == 2 and "sigma_p: 0.2 here, 0.1 there" in wrong.stderr, wrong.stderr[-1500:]


def test_the_service_runs_from_the_imported_student(imported):
    """``oftsr serve``'s replica logic on the imported student."""
    from pipelines.serve import UpscaleService

    _, uri, _, _ = imported
    service = UpscaleService("models:/oftsr-student@official", uri)
    lr = np.random.default_rng(2).integers(0, 256, (16, 20, 3), dtype=np.uint8)
    (out,) = service.upscale_batch([(lr, 1.0, 7)])
    assert Image.open(io.BytesIO(out)).size == (80, 64)


@pytest.mark.slow  # 2 min 19 s for four crops: the in-process test above proves the pinning and the weights
def test_a_distill_stage_runs_from_the_imported_teacher(imported, tmp_path):
    """``oftsr distill ffhq_x4`` with the imported teacher from the registry (online targets; Ray Train on a local
    cluster; four 256x256 crops)."""
    from oftsr.samples import export_sample_photos

    _, uri, _, results = imported
    photos = tmp_path / "photos"
    for p in export_sample_photos(tmp_path / "all"):
        if min(Image.open(p).size) >= 256:
            photos.mkdir(exist_ok=True)
            p.rename(photos / p.name)
    sets = {
        "distill.teacher": "models:/oftsr-teacher@official",
        "data.source": str(photos),
        "data.dtype": "float32",
        "data.batch_size": 2,
        "data.concurrency": 1,
        "tracking.tracking_uri": uri,
        "storage_path": str(tmp_path / "ray"),
        "total_images": 4,
        "batch_per_worker": 2,
        "workers": 1,
        "use_gpu": "false",
        "cpus_per_worker": 0.5,
        "checkpoint_every_images": 4,
        "log_every_images": 2,
        "optim.warmup_images": 0,
    }
    args = [sys.executable, "-m", "pipelines.cli", "distill", "ffhq_x4"]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpts = sorted((tmp_path / "ray").rglob("checkpoint_*/stage.json"))
    assert ckpts, list((tmp_path / "ray").rglob("*"))[:20]
    stage = json.loads(ckpts[-1].read_text())
    assert (stage["stage"], stage["sigma_p"], stage["preset"], stage["images_seen"]) == ("distill", 0.1, "ffhq", 4)
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.`oftsr.stage` = 'distill'")
    pinned = f"models:/oftsr-teacher/{results['teacher']['version']}"  # the alias resolved once, for every attempt
    assert [r.info.status for r in runs] == ["FINISHED"] and pinned in runs[0].data.params.values()
