"""The recipe tree: method parameters declared once, overrides that would be lost refused, one tracking default,
artifacts that record the method and readers that check it (the defects of issue #14, each with its test)."""

import json
import subprocess
import sys

import pytest

from oftsr.method import Method, check_agrees
from pipelines.recipes import pipeline
from pipelines.tree import with_overrides


def test_a_method_parameter_set_once_reaches_every_stage_and_the_evaluation():
    tree = with_overrides(pipeline("quickstart"), {"method.sigma_p": "0.3", "method.crop": "48"}, "run")
    for stage in ("teacher", "trajectories", "distill"):
        cfg = tree.stage(stage)
        assert cfg.method.sigma_p == 0.3 and cfg.method.crop == 48 and cfg.data.crop == 48
    assert tree.evaluate.method.sigma_p == 0.3 and tree.data.crop == 48


@pytest.mark.parametrize(
    ("key", "command", "says"),
    [
        ("teacher.sigma_p", "teacher", "set method.sigma_p"),
        ("distill.loss.t_min", "distill", "set method.t_min"),
        ("data.crop", "run", "set method.crop"),
        ("teacher.data.source", "run", "set data.source"),
        ("distill.tracking.experiment", "run", "set tracking.experiment"),
        ("distill.teacher", "run", "under `oftsr run`"),
        ("trajectories.teacher", "run", "under `oftsr run`"),
        ("distill.cache", "run", "under `oftsr run`"),
        ("teacher.optim.lr", "distill", "runs the distill stage only"),
    ],
)
def test_an_override_that_would_be_lost_or_split_the_stages_is_refused_naming_the_field(key, command, says):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")) as err:
        with_overrides(pipeline("quickstart"), {key: "1"}, command)
    assert says in str(err.value)


@pytest.mark.parametrize("key", ["distill.teacher", "teacher"])
def test_a_stage_command_may_name_its_own_teacher(key):
    tree = with_overrides(pipeline("quickstart"), {key: "models:/oftsr-teacher@champion"}, "distill")
    assert tree.stage("distill").teacher == "models:/oftsr-teacher@champion"


def test_a_bare_field_of_the_stage_is_the_stage_s_own_under_its_command():
    tree = with_overrides(pipeline("quickstart"), {"teacher": "/t", "out": "/cache", "batch": "2"}, "trajectories")
    cfg = tree.stage("trajectories")
    assert (cfg.teacher, cfg.out, cfg.batch) == ("/t", "/cache", 2)
    assert tree.out == pipeline("quickstart").out  # the pipeline's output folder is untouched
    with pytest.raises(ValueError, match=r"method\.crop"):
        with_overrides(pipeline("quickstart"), {"data.crop": "32"}, "trajectories")


def test_mlflow_tracking_uri_is_the_default_of_every_stage_and_shown_by_dry_run(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    tree = pipeline("ffhq_x4")
    assert {tree.stage(s).tracking.tracking_uri for s in ("teacher", "trajectories", "distill")} == {
        "http://127.0.0.1:5999"
    }
    env = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5999", "PATH": "/usr/bin:/bin"}
    for command in ("teacher", "run"):
        proc = subprocess.run(
            [sys.executable, "-m", "pipelines.cli", command, "ffhq_x4", "--dry-run"],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["tracking.tracking_uri"] == "http://127.0.0.1:5999"


def test_a_recorded_method_is_read_back_and_a_record_without_sigma_y_is_refused():
    recorded = Method(sigma_p=0.5, degradation="avgpool", sigma_y=0.05, crop=64).to_dict()
    assert Method.from_record(recorded).sigma_y == 0.05
    old = {k: v for k, v in recorded.items() if k != "sigma_y"}
    with pytest.raises(ValueError, match="sigma_y"):
        Method.from_record(old, "the student x")


def test_a_cache_made_with_other_method_parameters_is_refused_naming_the_field():
    import dataclasses

    from pipelines.train.driver import check_cache_matches

    cfg = dataclasses.replace(pipeline("quickstart").stage("distill"), targets="cached", cache="outputs/cache/x")
    key = {
        "degradation": {"kind": "bicubic", "sf": 4, "sigma_y": 0.0},
        "sigma_p": 0.2,
        "crop": 64,
        "solver": {"t_min": 0.01, "t_max": 0.6},
    }
    check_cache_matches(cfg, {"key": key})  # the quickstart's own cache
    with pytest.raises(ValueError, match=r"sigma_p: 0\.2 here, 0\.3 there"):
        check_cache_matches(cfg, {"key": {**key, "sigma_p": 0.3}})
    with pytest.raises(ValueError, match="t_max"):
        check_cache_matches(cfg, {"key": {**key, "solver": {"t_min": 0.01, "t_max": 0.9}}})
    with pytest.raises(ValueError, match="sigma_y"):
        check_agrees(Method(), {"sigma_y": 0.05}, "a model")
