"""``oftsr evaluate --protocol paper``: the paper's evaluation (:mod:`oftsr.paper`) of a student (and teacher) on the
task's 100 images from a folder or bucket prefix; the report names the images that were missing or unusable and
sets the published numbers beside ours."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from oftsr.conventions import uint8_to_image
from oftsr.evaluation import EvalSettings, evaluate, markdown_table
from oftsr.method import check_agrees
from oftsr.paper import ONE_STEP_SCALE, SEED, TASKS, centre_crop, image_names
from pipelines.data.decode import DecodeError
from pipelines.data.storage import filesystem, join_uri
from pipelines.data.transforms import fetch_image


def paper_images(task: str, source: str, storage_options=None) -> tuple[torch.Tensor, list[str], list[str], list[str]]:
    """``(hr, used, missing, unusable)``: the centre crops ``(N, 3, c, c)`` in [-1, 1] of the task's images found
    under ``source`` (in the official order), their names, the names not found, and ``name: reason`` for the rest."""
    fs, root = filesystem(source, storage_options)
    crop = TASKS[task]["crop"]
    crops, used, missing, unusable = [], [], [], []
    for name in image_names(task):
        path = f"{root.rstrip('/')}/{name}"
        if not fs.exists(path):
            # ImageNet's list says .jpg; the validation set ships .JPEG
            alt = path.rsplit(".", 1)[0] + ".JPEG"
            if name.endswith(".jpg") and fs.exists(alt):
                path = alt
            else:
                missing.append(name)
                continue
        try:
            img = fetch_image(join_uri(source, path), storage_options)
            crops.append(centre_crop(torch.from_numpy(img).permute(2, 0, 1), crop))
            used.append(name)
        except (DecodeError, ValueError) as err:
            unusable.append(f"{name}: {err}")
    if not crops:
        example = image_names(task)[0]
        raise ValueError(f"none of the {task} evaluation images is under {source} (expected e.g. {example})")
    return uint8_to_image(torch.stack(crops)), used, missing, unusable


def paper_evaluation(
    task: str,
    source: str,
    *,
    student: torch.nn.Module,
    student_meta: dict[str, Any],
    teacher: torch.nn.Module | None = None,
    teacher_meta: dict[str, Any] | None = None,
    out: str | Path,
    batch: int = 4,
    device: str = "cpu",
    storage_options=None,
) -> dict[str, Any]:
    """Evaluate on the task's images as the paper does; writes ``paper_<task>.json`` and ``.md`` into ``out``."""
    from pipelines.recipes import pipeline

    if task not in TASKS:
        raise ValueError(f"unknown paper task {task!r}; expected one of {sorted(TASKS)}")
    spec = TASKS[task]
    method = pipeline(spec["recipe"]).method
    fields = ("sf", "degradation", "sigma_y", "sigma_p")
    check_agrees(method, student_meta, f"the student (for task {task})", fields)
    if teacher_meta is not None:
        check_agrees(method, teacher_meta, f"the teacher (for task {task})", fields)
    trained = {k: float(student_meta[k]) for k in ("t_min", "t_max") if k in student_meta}
    method = dataclasses.replace(method, crop=spec["crop"], **trained)
    hr, used, missing, unusable = paper_images(task, source, storage_options)
    settings = EvalSettings(
        method=method,
        knobs=(0.0, 1.0),  # the trained end points t_min and t_max, where the official sampler evaluates
        teacher_method="rk45",
        batch=batch,
        seed=SEED,
        one_step_scale=ONE_STEP_SCALE,
        clamp=False,
        split_above=256,
    )
    report = evaluate(hr, settings, student=student, teacher=teacher, device=device)
    report.update(
        task=task,
        source=source,
        images=used,
        missing=missing,
        unusable=unusable,
        published=spec["published"],
        protocol="paper",
    )
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    slim = {**report, "rows": [{k: v for k, v in r.items() if k != "per_crop"} for r in report["rows"]]}
    (folder / f"paper_{task}.json").write_text(json.dumps(slim, indent=2, default=str))
    lines = [
        f"# Paper protocol: {task} ({len(used)} of 100 images)",
        "",
        markdown_table(report),
        "Published (PSNR / LPIPS / FID[, teacher NFE]): "
        + "; ".join(f"{k}: {' / '.join(str(x) for x in v)}" for k, v in spec["published"].items()),
        "",
    ]
    if missing:
        lines.append(f"Missing from {source} ({len(missing)}): {', '.join(missing)}")
    if unusable:
        lines.append(f"Unusable ({len(unusable)}): {'; '.join(unusable)}")
    if report["perceptual"] != "lpips":
        lines.append("LPIPS (AlexNet) weights are not on this machine: ST-LPIPS stands in (not the paper's metric).")
    (folder / f"paper_{task}.md").write_text("\n".join(lines) + "\n")
    return report


__all__ = ["paper_evaluation", "paper_images"]
