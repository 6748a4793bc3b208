"""The MLflow model registry: teacher and student as pyfunc models that rebuild the network from our code.

A registered version holds ``artifacts/weights.safetensors``, ``artifacts/model.json`` (the UNet config and the
model's metadata: kind, method parameters, knob range), ``code/`` (the ``oftsr`` core and ``pipelines``) and the
model's code file (:mod:`pipelines.model_code`, MLflow's models-from-code): nothing pickled, no shapes frozen by an
export. ``load_model("models:/oftsr-student@champion")`` returns our
``UNet`` and its metadata; ``mlflow.pyfunc.load_model`` gives a predictor that upscales uint8 ``(B, h, w, 3)``
arrays. New versions get the alias ``candidate``; ``champion`` moves to a version when it beats the current one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
import torch

import oftsr
import pipelines
from oftsr.nets import UNet, UNetConfig, load_weights, save_weights

SCORE_TAG = "oftsr.score"

# The model's inputs are declared by an explicit signature (variable image sizes), not by type hints on `predict`.
# MLflow suggests adding them when the class below is defined, on every import, under its own "once" filter (which
# no filter of ours can override): that one message is dropped while the class is defined.
_show_warning = warnings.showwarning
warnings.showwarning = lambda message, *args, **kw: (
    None if "Add type hints to the `predict` method" in str(message) else _show_warning(message, *args, **kw)
)


class OftsrModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: ``predict(images uint8 (B, h, w, 3), params={"t", "tile", "seed"}) -> uint8 (B, h sf, w sf, 3)``
    (the teacher ignores ``t`` and samples with ``steps`` midpoint steps)."""

    def load_context(self, context) -> None:
        self.net, self.meta = _build(Path(context.artifacts["weights"]), Path(context.artifacts["config"]))

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        from oftsr.conventions import image_to_uint8, uint8_to_image
        from oftsr.infer import TRAINED_RANGE, sample, upscale

        params = params or {}
        arr = np.asarray(model_input)
        if arr.ndim == 3:
            arr = arr[None]
        lr = uint8_to_image(torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2))
        gen = torch.Generator().manual_seed(int(params.get("seed", 0)))
        m = self.meta
        if m["kind"] == "student":
            tile = int(params.get("tile", 0)) or None
            out = upscale(
                self.net,
                lr,
                float(params.get("t", 0.5)),
                sigma_p=m["sigma_p"],
                sf=m["sf"],
                kind=m["degradation"],
                tile=tile,
                generator=gen,
                trained=(float(m.get("t_min", TRAINED_RANGE[0])), float(m.get("t_max", TRAINED_RANGE[1]))),
            )
        else:
            from oftsr.degrade import upsample

            out = sample(
                self.net,
                upsample(lr, m["sf"], m["degradation"]),
                sigma_p=m["sigma_p"],
                method="midpoint",
                steps=int(params.get("steps", 10)),
                generator=gen,
            ).x
        return image_to_uint8(out).permute(0, 2, 3, 1).numpy()


warnings.showwarning = _show_warning


def _build(weights: Path, config: Path) -> tuple[UNet, dict[str, Any]]:
    info = json.loads(config.read_text())
    net = UNet(UNetConfig.from_dict(info["unet"]))
    load_weights(net, weights, widen=False)
    return net.eval(), info["meta"]


def _signature():
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
        params=ParamSchema(
            [
                ParamSpec("t", "double", 0.5),
                ParamSpec("tile", "long", 0),
                ParamSpec("seed", "long", 0),
                ParamSpec("steps", "long", 10),
            ]
        ),
    )


@contextlib.contextmanager
def _library_output_quiet():
    """MLflow's own console output while a model is logged (its notes on pickling and type hints, artifact progress
    bars, "Successfully registered ..."): hidden unless ``--verbose``; our own line says what was registered."""
    from pipelines.raycluster import verbose

    if verbose():
        yield
        return
    import mlflow.utils.logging_utils as mlflow_logging

    stream = mlflow_logging.MLFLOW_LOGGING_STREAM
    with open(os.devnull, "w") as null, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pyfunc_logger = logging.getLogger("mlflow.pyfunc")
        level = pyfunc_logger.level
        mlflow_logging.MLFLOW_LOGGING_STREAM = null  # where MLflow's eprint writes
        pyfunc_logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            mlflow_logging.MLFLOW_LOGGING_STREAM = stream
            pyfunc_logger.setLevel(level)


def log_and_register(
    *,
    tracking_uri: str,
    run_id: str,
    name: str,
    net: torch.nn.Module,
    meta: dict[str, Any],
    score: float | None = None,
    lower_is_better: bool = True,
    aliases: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Log ``net`` as a pyfunc model in ``run_id``, register it as ``name``, alias it ``candidate`` and, when it
    beats the champion on ``score``, ``champion`` (or, given ``aliases``, exactly those). Returns
    ``{"version", "champion", "uri"}``."""
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    tmp = Path(tempfile.mkdtemp(prefix="oftsr-model-"))
    try:
        save_weights(net, tmp / "weights.safetensors")
        (tmp / "model.json").write_text(json.dumps({"unet": net.config.to_dict(), "meta": meta}, indent=2))
        with mlflow.start_run(run_id=run_id), _library_output_quiet():
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=str(Path(pipelines.__file__).parent / "model_code.py"),
                artifacts={"weights": str(tmp / "weights.safetensors"), "config": str(tmp / "model.json")},
                code_paths=[str(Path(oftsr.__file__).parent), str(Path(pipelines.__file__).parent)],
                pip_requirements=["torch", "safetensors", "numpy", "pillow", "tqdm"],
                signature=_signature(),
                registered_model_name=name,
                metadata={"oftsr": meta},
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    version = str(info.registered_model_version)
    for key, value in {
        **{f"oftsr.{k}": str(v) for k, v in meta.items()},
        **({SCORE_TAG: str(score)} if score is not None else {}),
    }.items():
        client.set_model_version_tag(name, version, key, value)
    if aliases is not None:
        for alias in aliases:
            client.set_registered_model_alias(name, alias, version)
        return {"version": version, "champion": False, "uri": f"models:/{name}/{version}"}
    client.set_registered_model_alias(name, "candidate", version)
    champion = _promote(client, name, version, score, lower_is_better)
    return {"version": version, "champion": champion, "uri": f"models:/{name}/{version}"}


def _promote(client, name: str, version: str, score: float | None, lower_is_better: bool) -> bool:
    try:
        current = client.get_model_version_by_alias(name, "champion")
    except Exception:  # no champion yet
        current = None
    if current is not None and current.version != version:
        best = current.tags.get(SCORE_TAG)
        if score is None or best is None:
            return False
        better = score < float(best) if lower_is_better else score > float(best)
        if not better:
            return False
    client.set_registered_model_alias(name, "champion", version)
    return True


@contextlib.contextmanager
def _downloaded(uri: str, tracking_uri: str | None) -> Iterator[Path]:
    """The model at an MLflow URI, downloaded into a temporary folder that is removed afterwards."""
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    dst = Path(tempfile.mkdtemp(prefix="oftsr-dl-"))
    try:
        yield Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    finally:
        shutil.rmtree(dst, ignore_errors=True)


def _not_found(uri: str, err: BaseException) -> FileNotFoundError:
    reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
    return FileNotFoundError(f"model {uri} not found: {reason}")


def pin_model_uri(uri: str, *, tracking_uri: str | None = None) -> tuple[str, str]:
    """``(pinned URI, version)`` for an MLflow model URI: ``models:/NAME@ALIAS`` becomes ``models:/NAME/N`` (an
    alias moves, a version does not), and the version is the SHA-256 of the model's weights, so the same weights
    give the same content key whatever they are registered as. Errors name the URI."""
    import hashlib

    from pipelines.tracking import client

    pinned = uri
    try:
        if uri.startswith("models:/"):
            name, at, ref = uri[len("models:/") :].partition("@")
            c = client(tracking_uri or mlflow.get_tracking_uri())
            if at:
                mv = c.get_model_version_by_alias(name, ref)
            else:
                name, _, number = name.rpartition("/")
                mv = c.get_model_version(name, number)
            pinned = f"models:/{mv.name}/{mv.version}"
        with _downloaded(pinned, tracking_uri) as local:
            weights = next(local.rglob("weights.safetensors"))
            digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
    except (mlflow.exceptions.MlflowException, OSError, StopIteration) as err:
        raise _not_found(uri, err) from err
    return pinned, digest


def require_kind(uri: str, meta: dict[str, Any], kind: str, why: str) -> None:
    """Refuse a loaded model that is not a ``kind`` (``teacher`` / ``student``), saying ``why`` one is needed."""
    if meta.get("kind") != kind:
        raise ValueError(f"{uri} is a {meta.get('kind')} model; {why}")


def load_model(uri: str, *, tracking_uri: str | None = None) -> tuple[UNet, dict[str, Any]]:
    """Our network and its metadata from ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION`` / ``runs:/...``, a
    downloaded model folder, or a training checkpoint folder (or run folder). Errors name the URI."""
    if uri.startswith(("models:/", "runs:/")):
        try:
            with _downloaded(uri, tracking_uri) as local:
                return load_model(str(local))
        except (mlflow.exceptions.MlflowException, OSError) as err:
            raise _not_found(uri, err) from err
    path = Path(uri)
    if (path / "artifacts" / "model.json").is_file():
        return _build(path / "artifacts" / "weights.safetensors", path / "artifacts" / "model.json")
    if (path / "model.json").is_file():
        return _build(path / "weights.safetensors", path / "model.json")
    from pipelines.train.checkpoint import read_checkpoint

    ckpt = read_checkpoint(uri)
    net = UNet(ckpt["unet"])
    net.load_state_dict(ckpt["ema"])
    stage = ckpt["stage"]
    # everything the checkpoint records (the method's parameters included: evaluate and upscale read them here)
    meta = {k: v for k, v in stage.items() if k != "stage"}
    meta["kind"] = "student" if stage.get("stage") == "distill" else "teacher"
    return net.eval(), meta
