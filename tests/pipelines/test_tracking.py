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
