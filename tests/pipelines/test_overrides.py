import pytest

from pipelines.overrides import apply_overrides, flatten, parse_sets
from pipelines.recipes import RECIPES, recipe


def test_overrides_convert_types_and_revalidate():
    cfg = apply_overrides(
        recipe("quickstart", "teacher"),
        parse_sets(
            [
                "optim.lr=3e-4",
                "workers=4",
                "use_gpu=true",
                "data.crop=128",
                "optim.betas=[0.9, 0.99]",
                "tracking.parent_run_id=abc",
                "pretrained=none",
            ]
        ),
    )
    assert cfg.optim.lr == 3e-4 and cfg.workers == 4 and cfg.use_gpu is True and cfg.data.crop == 128
    assert cfg.optim.betas == (0.9, 0.99) and cfg.tracking.parent_run_id == "abc" and cfg.pretrained is None


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        ("optim.lrr=1", r"unknown config key 'optim\.lrr'"),
        ("nope=1", "unknown config key 'nope'"),
        ("workers=two", "workers: expected an integer"),
        ("use_gpu=maybe", "use_gpu: expected a boolean"),
        ("precision=fp8", r"precision: expected one of \['auto', 'fp32', 'bf16'\]"),
        ("optim=1", "is a group"),
        ("data.crop=30", r"DataConfig\.crop must be a positive multiple"),
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
    assert flat["optim.lr"] == 1e-4 and flat["loss.dt"] == 0.05 and flat["data.crop"] == 64
    assert all("." in k or not isinstance(v, dict) for k, v in flat.items())


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_builds_both_stages(name):
    for stage in ("teacher", "distill"):
        cfg = recipe(name, stage)
        assert cfg.stage == stage and cfg.total_images % cfg.workers == 0
    assert recipe("ffhq_x4", "teacher").sigma_p == 0.1 and recipe("ffhq_x4_noisy", "teacher").data.sigma_y == 0.05
    with pytest.raises(ValueError, match="unknown recipe"):
        recipe("ffhq_x8", "teacher")


def test_distill_needs_a_teacher():
    with pytest.raises(ValueError, match="teacher"):
        apply_overrides(recipe("quickstart", "distill"), {"teacher": "none"})
