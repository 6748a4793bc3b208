"""``oftsr import``: an official OFTSR checkpoint (teacher or one-step student) into our checkpoint format and the
MLflow registry (alias ``official``).

The method's parameters come from the recipe (``--recipe``) and from what the file name says
(:func:`oftsr.nets.official.method_from_checkpoint_name`); a contradiction between them is refused. The whole file
is read and mapped onto the recipe's network before anything is written: a file that does not fit is refused with
what is wrong, and nothing is registered.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from oftsr.method import Method, disagreements
from oftsr.nets import UNet, preset_config
from oftsr.nets.official import method_from_checkpoint_name, official_state_dict, read_official_checkpoint
from pipelines.shipped import sha256_of

OFFICIAL_ALIAS = "official"


def resolve_method(path: Path, kind: str, recipe: str | None) -> tuple[str, Method]:
    """``(recipe, method)`` for the checkpoint at ``path``: the recipe named (or the one the file name implies), its
    method checked against what the file name says."""
    from pipelines.recipes import pipeline

    named = method_from_checkpoint_name(path.name)
    if named.get("kind") and named["kind"] != kind:
        raise ValueError(f"{path.name}: the file name says it is a {named['kind']}, but it is imported --as {kind}")
    if recipe is None:
        recipe = named.get("recipe")
        if recipe is None:
            raise ValueError(f"{path.name}: the file name does not say which task it is; name the recipe with --recipe")
    elif named.get("recipe") and named["recipe"] != recipe:
        raise ValueError(f"{path.name}: the file name says recipe {named['recipe']}, --recipe says {recipe}")
    method = pipeline(recipe).method
    bad = disagreements(method, named, ("sf", "degradation", "sigma_y", "sigma_p"))
    if bad:
        raise ValueError(f"{path.name}: the file name contradicts recipe {recipe}: {'; '.join(bad)}")
    return recipe, method


def import_checkpoint(
    path: str | os.PathLike,
    *,
    kind: str,
    recipe: str | None = None,
    raw: bool = False,
    out: str | os.PathLike | None = None,
    tracking_uri: str,
    name: str | None = None,
    preset_overrides: dict[str, Any] | None = None,
    log=print,
) -> dict[str, Any]:
    """Import ``path`` as a ``kind`` (``teacher`` or ``student``): write our checkpoint into ``out`` (default
    ``outputs/imported/<file stem>``) and register it as ``name`` (``oftsr-teacher`` / ``oftsr-student``) with the
    alias ``official``. Importing the same file again reuses its registered version.

    ``preset_overrides`` change the recipe's network (tests import reduced-size stand-ins of the official one)."""
    from pipelines.train.checkpoint import save_checkpoint

    if kind not in ("teacher", "student"):
        raise ValueError(f"--as must be teacher or student, got {kind!r}")
    path = Path(path)
    recipe, method = resolve_method(path, kind, recipe)
    unet_cfg = preset_config(method.preset, image_size=method.crop, **(preset_overrides or {}))
    net = UNet(unet_cfg)
    checkpoint = read_official_checkpoint(path)
    state = official_state_dict(checkpoint, net, raw=raw, where=str(path))
    net.load_state_dict(state)
    digest = sha256_of(path)
    step = checkpoint.get("step")
    stage = {
        "stage": "distill" if kind == "student" else "teacher",
        **method.to_dict(),
        "recipe": recipe,
        "source_file": path.name,
        "source_sha256": digest,
        "source_weights": "model" if raw else "ema",
        "source_step": int(step) if isinstance(step, int) else None,
    }
    folder = Path(out) if out else Path("outputs/imported") / path.name.removesuffix(".pth")
    tmp = folder.with_name(folder.name + ".partial")
    save_checkpoint(tmp, model=net, ema=net, unet=unet_cfg, state={"images_seen": 0}, stage=stage)
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    os.replace(tmp, folder)
    log(f"import: {path.name} -> {folder} ({kind}, recipe {recipe}, {stage['source_weights']} weights)")
    registered = register_imported(net, stage, kind=kind, tracking_uri=tracking_uri, name=name, log=log)
    return {"checkpoint": str(folder), "recipe": recipe, "method": dataclasses.asdict(method), **registered}


def register_imported(
    net: UNet, stage: dict[str, Any], *, kind: str, tracking_uri: str, name: str | None, log=print
) -> dict[str, Any]:
    """Register an imported network under the alias ``official`` (the version already registered from the same
    file and weights is reused)."""
    import mlflow

    from pipelines.registry import log_and_register
    from pipelines.tracking import client

    name = name or f"oftsr-{kind}"
    c = client(tracking_uri)
    meta = {k: v for k, v in stage.items() if k != "stage" and v is not None}
    meta.update(kind=kind, knob_min=0.0, knob_max=1.0, nfe=1 if kind == "student" else 0)
    found = []
    if _exists(c, name):
        found = [
            v
            for v in c.search_model_versions(f"name = '{name}'")
            if v.tags.get("oftsr.source_sha256") == stage["source_sha256"]
            and v.tags.get("oftsr.source_weights") == stage["source_weights"]
        ]
    if found:
        version = str(found[0].version)
        c.set_registered_model_alias(name, OFFICIAL_ALIAS, version)
        log(f"register: {name} version {version} (already imported from this file; alias {OFFICIAL_ALIAS})")
        return {"name": name, "version": version, "reused": True, "uri": f"models:/{name}@{OFFICIAL_ALIAS}"}
    mlflow.set_tracking_uri(tracking_uri)
    experiment = c.get_experiment_by_name("oftsr-import")
    experiment_id = experiment.experiment_id if experiment else c.create_experiment("oftsr-import")
    run = c.create_run(experiment_id, run_name=f"import-{kind}", tags={"oftsr.source_file": stage["source_file"]})
    try:
        info = log_and_register(
            tracking_uri=tracking_uri,
            run_id=run.info.run_id,
            name=name,
            net=net,
            meta=meta,
            aliases=(OFFICIAL_ALIAS,),
        )
    except BaseException:
        c.set_terminated(run.info.run_id, status="FAILED")
        raise
    c.set_terminated(run.info.run_id)
    log(f"register: {name} version {info['version']} (alias {OFFICIAL_ALIAS})")
    return {"name": name, "version": info["version"], "reused": False, "uri": f"models:/{name}@{OFFICIAL_ALIAS}"}


def _exists(c, name: str) -> bool:
    try:
        c.get_registered_model(name)
        return True
    except Exception:
        return False


__all__ = ["OFFICIAL_ALIAS", "import_checkpoint", "resolve_method"]
