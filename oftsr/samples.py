"""Real photos that ship inside installed wheels, exported as PNGs for the embedded default (nothing downloaded).

The files are located without importing their packages (scikit-image, matplotlib, scikit-learn). Each export
writes ``LICENSES.md`` beside the PNGs with every photo's source and licence.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path

from PIL import Image


@dataclasses.dataclass(frozen=True)
class SamplePhoto:
    name: str
    package: str
    path: str  # relative to the package's folder
    licence: str


SAMPLE_PHOTOS: tuple[SamplePhoto, ...] = (
    SamplePhoto("astronaut", "skimage", "data/astronaut.png", "NASA photo of Eileen Collins; public domain"),
    SamplePhoto("chelsea", "skimage", "data/chelsea.png", "CC0, Stefan van der Walt"),
    SamplePhoto("coffee", "skimage", "data/coffee.png", "courtesy of Pikolo Espresso Bar; CC0 (scikit-image)"),
    SamplePhoto("rocket", "skimage", "data/rocket.jpg", "SpaceX launch photo of DSCOVR; CC0 (public domain)"),
    SamplePhoto(
        "motorcycle",
        "skimage",
        "data/motorcycle_left.png",
        "Middlebury stereo data set 2014 (Scharstein et al.); free for research use",
    ),
    SamplePhoto("hubble", "skimage", "data/hubble_deep_field.jpg", "NASA Hubble eXtreme Deep Field; public domain"),
    SamplePhoto(
        "grace_hopper",
        "matplotlib",
        "mpl-data/sample_data/grace_hopper.jpg",
        "US Navy photo of Grace Hopper; public domain",
    ),
    SamplePhoto("china", "sklearn", "datasets/images/china.jpg", "CC BY 2.0, danielbuechele (Flickr)"),
    SamplePhoto("flower", "sklearn", "datasets/images/flower.jpg", "CC BY 2.0, vultilion (Flickr)"),
)


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def available_photos() -> list[tuple[SamplePhoto, Path]]:
    """The sample photos whose package is installed, with their file paths."""
    found = []
    for photo in SAMPLE_PHOTOS:
        root = _package_dir(photo.package)
        if root is not None and (root / photo.path).is_file():
            found.append((photo, root / photo.path))
    return found


def export_sample_photos(folder: str | os.PathLike, *, min_count: int = 4) -> list[Path]:
    """Write the available photos as RGB PNGs into ``folder`` (kept if already there) plus ``LICENSES.md``.

    Raises ``RuntimeError`` naming the packages to install when fewer than ``min_count`` photos are found.
    """
    folder = Path(folder)
    photos = available_photos()
    if len(photos) < min_count:
        raise RuntimeError(
            f"only {len(photos)} sample photos found; install scikit-image, matplotlib and scikit-learn "
            f"(they ship the photos) to export at least {min_count}"
        )
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for photo, src in photos:
        dst = folder / f"{photo.name}.png"
        if not dst.is_file():
            tmp = dst.with_suffix(".png.tmp")
            with Image.open(src) as im:
                im.convert("RGB").save(tmp, format="PNG")
            os.replace(tmp, dst)
        written.append(dst)
    lines = [
        "# Sample photos",
        "",
        "Exported from installed wheels by `oftsr.samples`.",
        "",
        "| file | source | licence |",
        "|---|---|---|",
    ]
    lines += [f"| {p.name}.png | {p.package}/{p.path} | {p.licence} |" for p, _ in photos]
    (folder / "LICENSES.md").write_text("\n".join(lines) + "\n")
    return written


HELD_OUT: tuple[str, ...] = ("chelsea", "flower")


def export_sample_split(root: str | os.PathLike, held_out: tuple[str, ...] = HELD_OUT) -> tuple[Path, Path]:
    """Export the photos into ``root/train`` and ``root/heldout`` (``held_out`` names); returns both folders."""
    root = Path(root)
    export_sample_photos(root / "all")
    folders = (root / "train", root / "heldout")
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    for src in sorted((root / "all").glob("*.png")):
        dst = folders[1 if src.stem in held_out else 0] / src.name
        if not dst.exists():
            dst.write_bytes(src.read_bytes())
    (root / "train" / "LICENSES.md").write_text((root / "all" / "LICENSES.md").read_text())
    (root / "heldout" / "LICENSES.md").write_text((root / "all" / "LICENSES.md").read_text())
    return folders
