import pytest

from pipelines.tracking import TrackingUnavailable, check_reachable, client, start_or_resume_run


def test_runs_resume_by_key_nest_under_a_parent_and_keep_their_params(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    c = client(uri)
    parent = c.create_run(c.create_experiment("oftsr")).info.run_id

    def start(lr):
        return start_or_resume_run(
            uri,
            "oftsr",
            key="k1",
            run_name="teacher:a",
            params={"lr": lr},
            tags={"oftsr.stage": "teacher"},
            parent_run_id=parent,
        )

    run_id, resumed = start(1e-3)
    assert not resumed
    again, resumed = start(2e-3)
    assert resumed and again == run_id
    run = c.get_run(run_id)
    assert run.data.params == {"lr": "0.001"} and run.data.tags["mlflow.parentRunId"] == parent


def test_an_unreachable_tracking_server_is_reported_before_any_work():
    with pytest.raises(TrackingUnavailable, match=r"http://127\.0\.0\.1:9/"):
        check_reachable("http://127.0.0.1:9/")


def test_a_sqlite_store_keeps_its_artifacts_beside_the_database(tmp_path, monkeypatch):
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # MLflow's default would put them in ./mlruns of this folder
    uri = f"sqlite:///{tmp_path / 'store' / 'm.db'}"
    (tmp_path / "store").mkdir()
    run_id, _ = start_or_resume_run(uri, "oftsr", key="k", run_name="r", params={}, tags={})
    (tmp_path / "a.txt").write_text("x")
    client(uri).log_artifact(run_id, str(tmp_path / "a.txt"))
    assert list((tmp_path / "store" / "mlruns").rglob("a.txt")) and not (elsewhere / "mlruns").exists()
