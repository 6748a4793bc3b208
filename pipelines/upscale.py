"""``oftsr upscale``: files or folders of PNG/JPEG in, 4x PNGs out, at one or several knob values."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from oftsr.conventions import image_to_uint8, uint8_to_image
from oftsr.engine import fast_student
from oftsr.infer import TRAINED_RANGE, check_knob, upscale
from pipelines.data.decode import decode_image

EXTENSIONS = (".png", ".jpg", ".jpeg")


def collect_inputs(inputs: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            try:
                found = sorted(f for f in p.iterdir() if f.suffix.lower() in EXTENSIONS)
            except PermissionError as err:
                raise PermissionError(f"cannot read folder {p}: {err.strerror}") from err
            if not found:
                raise FileNotFoundError(f"no PNG or JPEG files in {p}")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"input not found: {p}")
    return files


def output_path(out_dir: Path, src: Path, sf: int, t: float) -> Path:
    return out_dir / f"{src.stem}_x{sf}_t{t:.2f}.png"


def run_upscale(
    inputs: list[str],
    out_dir: str,
    knobs: list[float],
    *,
    model: str,
    tracking_uri: str | None = None,
    tile: int | None = None,
    force: bool = False,
    device: str = "cpu",
    seed: int = 0,
    log=print,
) -> list[Path]:
    for t in knobs:
        check_knob(t)
    files = collect_inputs(inputs)
    out = Path(out_dir)
    from pipelines.registry import load_model

    net, meta = load_model(model, tracking_uri=tracking_uri)
    if meta.get("kind") != "student":
        raise ValueError(f"{model} is a {meta.get('kind')} model; upscale needs the one-step student")
    sf = int(meta["sf"])
    targets = [(src, t, output_path(out, src, sf, t)) for src in files for t in knobs]
    existing = [str(p) for _, _, p in targets if p.exists()]
    if existing and not force:
        raise FileExistsError(f"{existing[0]} exists ({len(existing)} outputs would be overwritten); use --force")
    net = fast_student(net, device)  # CUDA: bf16, compiled, CUDA graphs; CPU: all cores, channels-last
    tile = tile or int(meta.get("crop", 256))
    written = []
    for src in files:
        lr = uint8_to_image(torch.from_numpy(np.array(decode_image(src.read_bytes(), str(src)))).permute(2, 0, 1))[None]
        for t in knobs:
            gen = torch.Generator(device=device).manual_seed(seed)
            hr = upscale(
                net,
                lr.to(device),
                t,
                sigma_p=float(meta["sigma_p"]),
                sf=sf,
                kind=meta["degradation"],
                tile=tile,
                overlap=tile // 4,
                generator=gen,
                trained=(float(meta.get("t_min", TRAINED_RANGE[0])), float(meta.get("t_max", TRAINED_RANGE[1]))),
            )
            dst = output_path(out, src, sf, t)
            out.mkdir(parents=True, exist_ok=True)  # only once there is something to write
            tmp = dst.with_suffix(".tmp.png")
            Image.fromarray(image_to_uint8(hr[0]).permute(1, 2, 0).cpu().numpy()).save(tmp)
            os.replace(tmp, dst)
            written.append(dst)
            log(f"{src} -> {dst} ({lr.shape[-1]}x{lr.shape[-2]} -> {hr.shape[-1]}x{hr.shape[-2]}, t={t})")
    return written
