"""``oftsr serve``: the one-step student behind HTTP with Ray Serve.

* ``POST /upscale?t=0.5`` with the image's bytes as the body: the 4x PNG. Concurrent requests are batched
  (``@serve.batch``): requests of the same size and knob value share one network call (tiles of larger images are
  batched inside the call). Each image's start noise comes from its bytes, so the same image at the same ``t`` gives
  the same PNG from any replica.
* ``GET /healthz``: ``{"status": "ok", "model", "requests", "model_calls"}`` of the replica that answers.
* ``GET /``: the knob page (``pipelines/assets/knob.html``: no build step, no external assets).

A bad request (no body, not an image, too many pixels, ``t`` missing from [0, 1] or not a number) gets a 4xx whose
text names the problem, and the service keeps serving. Replicas (``--replicas``) and accelerators per replica
(``--gpus-per-replica``) are options; Serve restarts a replica that dies.
"""

from __future__ import annotations

import asyncio
import math
import zlib
from pathlib import Path
from typing import Any

import numpy as np

PAGE = Path(__file__).parent / "assets" / "knob.html"
DEFAULT_MAX_PIXELS = 4096 * 4096  # input pixels (the output has sf^2 times more)


class BadRequest(ValueError):
    def __init__(self, status: int, text: str):
        super().__init__(text)
        self.status, self.text = status, text


def parse_knob(raw: str | None) -> float:
    if raw is None or raw == "":
        return 0.5
    try:
        t = float(raw)
    except ValueError:
        raise BadRequest(400, f"t={raw!r} is not a number; give the knob as t in [0, 1]") from None
    if not math.isfinite(t) or not 0.0 <= t <= 1.0:
        raise BadRequest(400, f"t={raw} is outside the trained range [0, 1] (0 fidelity, 1 realism)")
    return t


def decode_body(body: bytes, max_pixels: int) -> np.ndarray:
    from pipelines.data.decode import DecodeError, decode_image

    if not body:
        raise BadRequest(400, "missing body: POST the image's bytes (PNG, JPEG, WebP, TIFF, ...)")
    try:
        return np.ascontiguousarray(decode_image(body, "the request body", max_pixels=max_pixels))
    except DecodeError as err:
        status = 413 if err.reason == "too-large" else 400
        what = {"not-an-image": "is not an image", "corrupt": "is a corrupt image", "too-large": "has too many pixels"}
        raise BadRequest(status, f"the body {what.get(err.reason, err.reason)}: {err.detail}") from None


class UpscaleService:
    """The replica's logic (Ray Serve wraps it in :func:`deployment`); usable without Serve for tests."""

    def __init__(self, model: str, tracking_uri: str | None, tile: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS):
        import torch

        from oftsr.engine import fast_student
        from pipelines.registry import load_model, require_kind

        net, meta = load_model(model, tracking_uri=tracking_uri)
        require_kind(model, meta, "student", "the service needs the one-step student")
        self.model, self.meta, self.max_pixels = model, meta, max_pixels
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.net = fast_student(net, self.device)
        self.tile = tile or int(meta.get("crop", 256))
        self.requests = 0
        self.model_calls = 0

    def upscale_batch(self, items: list[tuple[np.ndarray, float, int]]) -> list[bytes]:
        """PNGs for ``[(lr uint8 (h, w, 3), t, seed)]``: one network call per group of the same size and ``t``."""
        import torch

        from oftsr.conventions import image_to_uint8, uint8_to_image
        from oftsr.flow import noise_from_seed
        from oftsr.infer import TRAINED_RANGE, upscale
        from pipelines.batch_upscale import encode_png

        m, sf = self.meta, int(self.meta["sf"])
        groups: dict[tuple[int, int, float], list[int]] = {}
        for i, (lr, t, _) in enumerate(items):
            groups.setdefault((lr.shape[0], lr.shape[1], t), []).append(i)
        out: list[bytes] = [b""] * len(items)
        for (h, w, t), idx in groups.items():
            x = torch.stack([torch.from_numpy(items[i][0]).permute(2, 0, 1) for i in idx])
            noise = noise_from_seed((3, h * sf, w * sf), [items[i][2] for i in idx], device=self.device)
            hr = upscale(
                self.net,
                uint8_to_image(x).to(self.device),
                t,
                sigma_p=float(m["sigma_p"]),
                sf=sf,
                kind=m["degradation"],
                tile=self.tile,
                overlap=self.tile // 4,
                noise=noise,
                trained=(float(m.get("t_min", TRAINED_RANGE[0])), float(m.get("t_max", TRAINED_RANGE[1]))),
            )
            self.model_calls += 1
            for i, img in zip(idx, image_to_uint8(hr).permute(0, 2, 3, 1).cpu().numpy(), strict=True):
                out[i] = encode_png(img)
        return out

    def parse(self, body: bytes, t_raw: str | None) -> tuple[np.ndarray, float, int]:
        t = parse_knob(t_raw)
        lr = decode_body(body, self.max_pixels)
        return lr, t, zlib.crc32(body)

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.model, "requests": self.requests, "model_calls": self.model_calls}


def deployment(max_batch_size: int = 8, batch_wait_timeout_s: float = 0.05):
    """The Serve deployment class (built when Ray Serve is imported, so that the module imports without it)."""
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

    @serve.deployment(name="oftsr-upscale", max_ongoing_requests=4 * max_batch_size)
    class Upscale(UpscaleService):
        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s)
        async def _batched(self, items: list[tuple[np.ndarray, float, int]]) -> list[bytes]:
            return await asyncio.get_running_loop().run_in_executor(None, self.upscale_batch, items)

        async def __call__(self, request: Request) -> Response:
            path = request.url.path.rstrip("/") or "/"
            if path == "/":
                return HTMLResponse(PAGE.read_text())
            if path == "/healthz":
                return JSONResponse(self.health())
            if path != "/upscale":
                return PlainTextResponse(f"no such path {path}: POST /upscale?t=..., GET /, GET /healthz", 404)
            if request.method != "POST":
                return PlainTextResponse("POST the image's bytes to /upscale?t=...", 405)
            self.requests += 1
            try:
                item = self.parse(await request.body(), request.query_params.get("t"))
            except BadRequest as err:
                return PlainTextResponse(err.text, err.status)
            png = await self._batched(item)
            return Response(png, media_type="image/png")

    return Upscale


def build_app(
    model: str,
    tracking_uri: str | None,
    *,
    replicas: int = 1,
    gpus_per_replica: float = 0.0,
    cpus_per_replica: float = 1.0,
    max_batch_size: int = 8,
    tile: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
):
    """The Serve application of the pinned ``model``."""
    from pipelines.registry import pin_model_uri

    if model.startswith(("models:/", "runs:/")):
        model, _ = pin_model_uri(model, tracking_uri=tracking_uri)  # every replica serves the same version
    options = {"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica}
    return (
        deployment(max_batch_size)
        .options(num_replicas=replicas, ray_actor_options=options)
        .bind(model, tracking_uri, tile, max_pixels)
    )


def serve_forever(app, *, host: str, port: int, log=print) -> None:
    """Run ``app`` on ``host:port`` until interrupted."""
    import time

    from ray import serve

    from pipelines.raycluster import ensure_ray

    ensure_ray()
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name="oftsr", route_prefix="/")
    log(f"serving on http://{host}:{port}/ (the knob page), POST /upscale?t=0.5, GET /healthz; Ctrl-C stops")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


__all__ = ["BadRequest", "UpscaleService", "build_app", "decode_body", "deployment", "parse_knob", "serve_forever"]
