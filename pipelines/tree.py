"""The recipe tree: one typed config per pipeline (configuration as code, as torchtitan does).

The method's parameters (:class:`oftsr.method.Method`: scale, degradation, sigma_y, sigma_p, crop, knob range,
network preset), the training images (``data``) and the tracking server are declared once, at the top; every stage
reads them from there (:meth:`PipelineConfig.stage`). A stage section holds its own fields; the copies that the
stage's runtime config carries (``teacher.data``, ``distill.method``, ``trajectories.tracking``, ...) are derived
when the tree is built, and so are the paths from one stage to the next (the distillation's and the cache's teacher
is the teacher stage's run folder unless a stage command is given another).

``oftsr teacher|trajectories|distill|run RECIPE --set KEY=VALUE`` all take this tree (under a stage command, that
stage's own fields may be given without the stage's prefix: ``oftsr teacher quickstart --set optim.lr=3e-4``).
:func:`refused` says why an
override is not taken: one that would be overwritten by the derivation or at run time, or that would make two
stages disagree, names the field to set instead.
"""

from __future__ import annotations

import dataclasses

from oftsr.evaluation import EvalSettings
from oftsr.method import Method
from pipelines.cache.config import TrajectoryConfig
from pipelines.data.config import DataConfig
from pipelines.tracking import TrackingConfig
from pipelines.train.config import StageConfig

#: The data plane's copies of method parameters.
METHOD_DATA_FIELDS = ("crop", "sf", "degradation", "sigma_y")
STAGES = ("teacher", "trajectories", "distill")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig(EvalSettings):
    """Held-out evaluation: deterministic crops (``method.crop``) of the images under ``source``, and the protocol
    of :class:`oftsr.evaluation.EvalSettings`."""

    source: str
    crops_per_image: int = 8
    max_images: int = 100

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.crops_per_image < 1 or self.max_images < 1:
            raise ValueError("evaluate.crops_per_image and evaluate.max_images must be >= 1")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """One pipeline: teacher -> (trajectories) -> distill -> evaluate -> register."""

    name: str
    method: Method
    data: DataConfig
    teacher: StageConfig
    trajectories: TrajectoryConfig
    distill: StageConfig
    evaluate: EvalConfig
    out: str = "outputs/pipeline"
    register: bool = True
    teacher_model: str = "oftsr-teacher"
    student_model: str = "oftsr-student"
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        data = dataclasses.replace(self.data, **{f: getattr(self.method, f) for f in METHOD_DATA_FIELDS})
        set_("data", data)
        shared = {"method": self.method, "data": data, "tracking": self.tracking}
        for name in STAGES:
            set_(name, dataclasses.replace(getattr(self, name), **shared))
        set_("evaluate", dataclasses.replace(self.evaluate, method=self.method, realesrgan=data.realesrgan))

    def stage(self, name: str) -> StageConfig | TrajectoryConfig:
        """The runtime config of stage ``name``: the tree's method, data and tracking, and its teacher (unless the
        section names one) the teacher stage's run folder."""
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
        cfg = getattr(self, name)
        if name != "teacher" and not cfg.teacher:
            teacher = self.distill.teacher or f"{self.teacher.storage_path.rstrip('/')}/{self.teacher.run_name}"
            cfg = dataclasses.replace(cfg, teacher=teacher)
        return cfg

    def shown(self) -> dict:
        """The tree as ``--dry-run`` prints it and MLflow records it: every field once (the stages' derived copies of
        the method, data and tracking are not repeated)."""
        from pipelines.overrides import flatten

        copies = (
            *(f"{s}.{g}." for s in STAGES for g in ("method", "data", "tracking")),
            "evaluate.method.",
            "evaluate.realesrgan.",
        )
        data_copies = {f"data.{f}" for f in METHOD_DATA_FIELDS}
        return {k: v for k, v in flatten(self).items() if not k.startswith(copies) and k not in data_copies}


def refused(key: str, command: str) -> str | None:
    """Why the override ``key`` is not taken under ``oftsr COMMAND`` (``run`` or a stage name), else ``None``."""
    head, _, rest = key.partition(".")
    field = rest.partition(".")[0]
    if head == "data" and rest in METHOD_DATA_FIELDS:
        return f"{key} is a method parameter shared by every stage: set method.{rest}"
    if head == "evaluate" and field == "method":
        return f"{key}: evaluation uses the tree's method: set method.{rest.partition('.')[2] or '<field>'}"
    if head == "evaluate" and field == "realesrgan":
        return f"{key}: evaluation degrades with the data plane's chain: set data.{rest}"
    method_fields = {f.name for f in dataclasses.fields(Method)}
    if head in STAGES and (field in method_fields or rest in ("loss.t_min", "loss.t_max")):
        return f"{key} is a method parameter shared by every stage: set method.{rest.rpartition('.')[2]}"
    if head in STAGES:
        if field in ("method", "data", "tracking"):
            inner = rest.partition(".")[2] or "<field>"
            target = f"method.{inner}" if field == "method" or inner in METHOD_DATA_FIELDS else f"{field}.{inner}"
            return f"{key}: every stage reads {field} from the top of the tree: set {target}"
        if command == "run" and (head, field) in (("distill", "teacher"), ("trajectories", "teacher")):
            return f"{key}: under `oftsr run` the teacher stage's checkpoint is used (set it with `oftsr {head}`)"
        if command == "run" and (head, field) == ("distill", "cache"):
            return f"{key}: under `oftsr run` the trajectory stage's cache is used (set it with `oftsr distill`)"
    if command != "run" and head in STAGES and head != command:
        return f"{key}: `oftsr {command}` runs the {command} stage only; {head}.* has no effect here"
    return None


def with_overrides(tree: PipelineConfig, sets: dict[str, str], command: str) -> PipelineConfig:
    """``tree`` with ``--set`` overrides under ``oftsr COMMAND``; refuses, naming each, the keys :func:`refused`
    names, before any is applied."""
    from pipelines.overrides import apply_overrides

    top = {f.name for f in dataclasses.fields(PipelineConfig)}
    if command in STAGES:  # `oftsr teacher --set optim.lr=...`: a stage's own field needs no prefix
        own = {f.name for f in dataclasses.fields(getattr(tree, command))}

        def prefixed(key: str) -> str:
            if key in own:  # a bare field of the stage is its own (`teacher`, `out`), not the tree's section
                return f"{command}.{key}"
            return key if key.partition(".")[0] in top else f"{command}.{key}"

        sets = {prefixed(k): v for k, v in sets.items()}
    reasons = [r for r in (refused(k, command) for k in sets) if r]
    if reasons:
        raise ValueError("; ".join(reasons))
    return apply_overrides(tree, sets)
