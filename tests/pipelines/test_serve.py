"""``oftsr serve``: a real Ray Serve application on a local Ray cluster, answering concurrent HTTP requests on
127.0.0.1 (batched), refusing bad ones with a 4xx that names the problem, surviving a replica's death; and the knob
page driven in a real headless browser (Debian's chromium)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import struct
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from oftsr.nets import UNet, load_weights, preset_config
from pipelines.shipped import shipped_weights
from tests.browser import Browser, chromium
from tests.conftest import free_port
from tests.helpers import register_student

SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "images" / "knob_page.png"


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def request(url: str, data: bytes | None = None, method: str | None = None) -> tuple[int, bytes, str]:
    req = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"))
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, resp.read(), resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as err:
        return err.code, err.read(), err.headers.get("Content-Type", "")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The tracking URI of a store holding a stand-in student that makes pictures (the README shows one): the
    shipped tiny teacher's weights."""
    net = UNet(preset_config("tiny", image_size=64))
    load_weights(net, shipped_weights("quickstart_teacher"))
    return register_student(tmp_path_factory.mktemp("serve"), net, crop=64, t_max=0.8)


@pytest.fixture(scope="module")
def service(store, ray_cluster):
    from ray import serve

    from pipelines.serve import build_app

    uri = store
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app("models:/oftsr-student@champion", uri, cpus_per_replica=0.5, max_batch_size=8)
    serve.run(app, name="oftsr", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def test_concurrent_requests_are_batched_and_answered_with_4x_pngs(service):
    rng = np.random.default_rng(0)
    images = [png(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)) for _ in range(16)]
    before = json.loads(request(f"{service}/healthz")[1])
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda body: request(f"{service}/upscale?t=0.5", body), images))
    assert [a[0] for a in answers] == [200] * 16
    assert all(a[2] == "image/png" and Image.open(io.BytesIO(a[1])).size == (96, 64) for a in answers)
    after = json.loads(request(f"{service}/healthz")[1])
    served, calls = after["requests"] - before["requests"], after["model_calls"] - before["model_calls"]
    assert served == 16 and calls < served, (served, calls)  # batched: fewer network calls than requests
    # the same image at the same t gives the same output (its noise comes from its bytes, alone or in a batch, up to
    # rounding); another t another one
    decoded = lambda body: np.asarray(Image.open(io.BytesIO(body)), dtype=np.int16)  # noqa: E731
    again = decoded(request(f"{service}/upscale?t=0.5", images[0])[1])
    assert np.abs(again - decoded(answers[0][1])).max() <= 1
    assert np.abs(decoded(request(f"{service}/upscale?t=1", images[0])[1]) - again).mean() > 0.5


def test_the_service_answers_with_the_one_step_output_of_its_model(service, store):
    """Pixels: the student's one-step output written out from the method, with the request's own seed (its bytes'
    CRC-32), at the requested knob (a 16x16 input: its 64x64 output is one tile)."""
    from pipelines.registry import load_model
    from tests.helpers import assert_same_pixels, expected_one_step

    net, meta = load_model("models:/oftsr-student@champion", tracking_uri=store)
    lr = np.random.default_rng(9).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    lr[..., 2] //= 4  # little blue: a swapped channel order cannot pass
    body = png(lr)
    for t in (0.0, 0.7):
        code, content, _ = request(f"{service}/upscale?t={t}", body)
        assert code == 200
        want = expected_one_step(net, lr, t, zlib.crc32(body), meta)
        assert_same_pixels(np.asarray(Image.open(io.BytesIO(content))), want, f"the service at t = {t}")


def test_bad_requests_get_a_4xx_naming_the_problem_and_the_service_keeps_serving(service):
    good = png(np.full((8, 8, 3), 100, np.uint8))
    ihdr = struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    cases = [
        (f"{service}/upscale?t=0.5", b"", None, 400, "missing body"),
        (f"{service}/upscale?t=0.5", b"hello, not an image", None, 400, "not an image"),
        (f"{service}/upscale?t=0.5", bomb, None, 413, "too many pixels"),
        (f"{service}/upscale?t=1.5", good, None, 400, "outside the trained range [0, 1]"),
        (f"{service}/upscale?t=abc", good, None, 400, "not a number"),
        (f"{service}/nowhere", None, "GET", 404, "no such path"),
        (f"{service}/upscale", None, "GET", 405, "POST"),
    ]
    for url, body, method, status, text in cases:
        code, content, _ = request(url, body, method)
        assert code == status and text in content.decode(), (url, code, content[:200])
    code, content, kind = request(f"{service}/upscale", good)  # no t: the middle of the knob
    assert code == 200 and kind == "image/png"
    page = request(f"{service}/")
    assert page[0] == 200 and b'type="range"' in page[1]
    assert not re.search(rb"""(src|href)=["']?(https?:)?//""", page[1])  # no external assets


def test_a_replica_that_dies_is_replaced_and_requests_succeed_again(service):
    import ray
    from ray.util.state import list_actors

    def replicas() -> list:  # of this cluster, whatever else runs on the machine
        here = ray.get_runtime_context().gcs_address
        alive = list_actors(address=here, filters=[("state", "=", "ALIVE")])
        return [a for a in alive if "oftsr-upscale" in (a.class_name or "")]

    good = png(np.full((8, 8, 3), 50, np.uint8))
    before = replicas()
    assert len(before) == 1, before
    ray.kill(ray.get_actor(before[0].name, namespace="serve"), no_restart=True)
    deadline, code = time.time() + 180, 0
    while time.time() < deadline:
        code = request(f"{service}/upscale?t=0", good)[0]
        if code == 200:
            break
        time.sleep(1)
    assert code == 200
    alive = replicas()
    assert len(alive) == 1 and alive[0].actor_id != before[0].actor_id


@pytest.mark.skipif(
    chromium() is None, reason="no chromium here (make test installs it with apt where it runs as root)"
)
def test_the_knob_page_in_a_real_browser_upscales_a_photo_and_follows_the_slider(service, tmp_path):
    from oftsr.samples import export_sample_photos

    photo = export_sample_photos(tmp_path / "photos")[0]
    small = tmp_path / "photo.png"
    with Image.open(photo) as im:
        im.convert("RGB").resize((64, 48)).save(small)

    async def drive() -> bytes:
        async with Browser() as b:
            await b.goto(f"{service}/")
            await b.set_files("#file", [str(small)])
            await b.wait_for("window.oftsr.rendered >= 1 && document.getElementById('output').naturalWidth > 0")
            first = await b.eval(_PIXELS)
            assert await b.eval("document.getElementById('output').naturalWidth") == 256
            box = await b.eval(
                "(() => { const r = document.getElementById('t').getBoundingClientRect();"
                " return [r.left, r.top, r.width, r.height]; })()"
            )
            left, top, width, height = box
            await b.drag(left + width / 2, top + height / 2, left + width - 1, top + height / 2)  # to realism
            await b.wait_for("window.oftsr.rendered >= 2 && document.getElementById('tcap').textContent === '1.00'")
            second = await b.eval(_PIXELS)
            assert second != first  # the output changed with t
            # debounced: nine slider inputs in one go (one script, so no timer can fire between them) ask once
            moves, requests = await b.eval("window.oftsr.moves"), await b.eval("window.oftsr.requests")
            await b.eval(
                "(() => { const s = document.getElementById('t'); for (let i = 0; i <= 8; i++) {"
                " s.value = String(i / 8); s.dispatchEvent(new Event('input')); } })()"
            )
            await b.wait_for("window.oftsr.rendered >= 3 && document.getElementById('tcap').textContent === '1.00'")
            assert await b.eval("window.oftsr.moves") == moves + 9
            assert await b.eval("window.oftsr.requests") == requests + 1
            assert await b.eval("!document.getElementById('download').hidden")
            return await b.screenshot()

    shot = asyncio.run(asyncio.wait_for(drive(), timeout=240))
    assert Image.open(io.BytesIO(shot)).size[0] > 0
    (tmp_path / "knob_page.png").write_bytes(shot)
    if os.environ.get("OFTSR_UPDATE_SCREENSHOT"):  # the README's picture
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        SCREENSHOT.write_bytes(shot)


# the output image's pixels, summed per channel (through a canvas: what the person sees)
_PIXELS = """(() => {
  const img = document.getElementById('output'), c = document.createElement('canvas');
  c.width = img.naturalWidth; c.height = img.naturalHeight;
  const ctx = c.getContext('2d'); ctx.drawImage(img, 0, 0);
  const d = ctx.getImageData(0, 0, c.width, c.height).data; let s = [0, 0, 0];
  for (let i = 0; i < d.length; i += 4) { s[0] += d[i]; s[1] += d[i + 1]; s[2] += d[i + 2]; }
  return s.join(',');
})()"""
