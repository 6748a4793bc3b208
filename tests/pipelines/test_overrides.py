import pytest

from pipelines.overrides import apply_overrides, flatten, parse_sets
from pipelines.recipes import RECIPES, pipeline, recipe


def test_overrides_convert_types_and_revalidate():
    cfg = apply_overrides(
        recipe("quickstart", "teacher"),
        parse_sets(["optim.lr=3e-4", "workers=4", "use_gpu=true", "optim.betas=[0.9, 0.99]", "pretrained=none"]),
    )
    assert cfg.optim.lr == 3e-4 and cfg.workers == 4 and cfg.use_gpu is True
    assert cfg.optim.betas == (0.9, 0.99) and cfg.pretrained is None


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        ("optim.lrr=1", r"unknown config key 'optim\.lrr'"),
        ("nope=1", "unknown config key 'nope'"),
        ("workers=two", "workers: expected an integer"),
        ("use_gpu=maybe", "use_gpu: expected a boolean"),
        ("precision=fp8", r"precision: expected one of \['auto', 'fp32', 'bf16'\]"),
        ("optim=1", "is a group"),
        ("total_images=641", "multiple of workers"),
    ],
)
def test_bad_overrides_name_the_field(pair, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(recipe("quickstart", "teacher"), parse_sets([pair]))


def test_set_needs_key_value_and_flatten_gives_mlflow_params():
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_sets(["lr"])
    flat = flatten(recipe("quickstart", "distill"))
    assert flat["optim.lr"] == 1e-3 and flat["loss.dt"] == 0.05 and flat["method.crop"] == 64
    assert flat["method.t_max"] == 0.6 and flat["targets"] == "cached"
    assert all("." in k or not isinstance(v, dict) for k, v in flat.items())


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_builds_its_stages(name):
    for stage in ("teacher", "distill"):
        cfg = recipe(name, stage)
        assert cfg.stage == stage and cfg.total_images % cfg.workers == 0
    assert recipe(name, "trajectories").teacher == recipe(name, "distill").teacher  # derived from the teacher stage
    assert pipeline("ffhq_x4").method.sigma_p == 0.1 and recipe("ffhq_x4_noisy", "teacher").data.sigma_y == 0.05
    with pytest.raises(ValueError, match="unknown recipe"):
        pipeline("ffhq_x8")
