"""Weights that ship inside this project, each beside a JSON record of its SHA-256 and how it was made.

The quickstart's teacher (``quickstart_teacher``) is the one such file: the ``tiny`` teacher trained beforehand by
this project's own command on the quickstart's training photos (the record holds the exact command, the photos and
the held-out figures it reached), so that the embedded default shows the method working in minutes on a CPU. The
quickstart still runs every stage from it (teacher fine-tune, trajectories, distillation, evaluation, registry).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

ASSETS = Path(__file__).resolve().parent / "assets"


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def record(name: str) -> dict[str, Any]:
    """The provenance record of shipped weights ``name`` (``assets/NAME.json``)."""
    path = ASSETS / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no shipped weights named {name!r}: {path} is missing")
    return json.loads(path.read_text())


def shipped_weights(name: str) -> str:
    """The path of shipped weights ``name``, after checking the file against the SHA-256 in its record."""
    rec = record(name)
    path = ASSETS / rec["file"]
    if not path.is_file():
        raise FileNotFoundError(f"shipped weights {path} are missing (its record {name}.json names it)")
    actual = sha256_of(path)
    if actual != rec["sha256"]:
        raise ValueError(
            f"shipped weights {path}: SHA-256 {actual} does not match the record's {rec['sha256']} "
            "(a damaged checkout or a Git LFS pointer instead of the file?)"
        )
    return str(path)


#: How a config names shipped weights: resolved on whichever node loads them (each has the project: the image, or
#: the job's working_dir), never a path of the driver's machine.
SCHEME = "shipped://"


def shipped_uri(name: str) -> str:
    """``shipped://NAME``, after checking the file here (a damaged checkout fails when the recipe is built)."""
    shipped_weights(name)
    return SCHEME + name


def resolve(path: str) -> str:
    """The local path of ``shipped://NAME`` on this node (checked against its record); other paths unchanged."""
    return shipped_weights(path[len(SCHEME) :]) if path.startswith(SCHEME) else path


def ship(name: str, trained: str | Path, command: str) -> dict[str, Any]:
    """Copy the EMA weights of an ``oftsr local-teacher`` output folder ``trained`` into ``assets/NAME.safetensors``
    and write its record: SHA-256, the command that made it, its data, its held-out figures, the software."""
    import platform
    import shutil

    import torch

    trained = Path(trained)
    config = json.loads((trained / "config.json").read_text())
    metrics = json.loads((trained / "metrics.json").read_text())
    ASSETS.mkdir(parents=True, exist_ok=True)
    target = ASSETS / f"{name}.safetensors"
    tmp = target.with_name(target.name + ".tmp")
    shutil.copyfile(trained / "ema.safetensors", tmp)
    tmp.replace(target)
    rec = {
        "file": target.name,
        "sha256": sha256_of(target),
        "bytes": target.stat().st_size,
        "weights": "EMA of the training run",
        "command": command,
        "data": {
            "photos": "the sample photos that ship inside scikit-image, matplotlib and scikit-learn (oftsr samples)",
            "held_out": config["recipe"]["held_out"],
            "licences": "outputs/sample_photos/LICENSES.md after `oftsr samples` or any quickstart",
        },
        "recipe": config["recipe"],
        "unet": config["unet"],
        "metrics": metrics,
        "software": {"torch": torch.__version__, "python": platform.python_version()},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs ({_cpu_name()})",
    }
    (ASSETS / f"{name}.json").write_text(json.dumps(rec, indent=2) + "\n")
    return rec


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="ship an `oftsr local-teacher` output as the weights NAME")
    p.add_argument("name")
    p.add_argument("trained", help="the local-teacher output folder (ema.safetensors, config.json, metrics.json)")
    p.add_argument("--command", required=True, help="the exact command that produced it, for the record")
    args = p.parse_args(argv)
    rec = ship(args.name, args.trained, args.command)
    print(f"{rec['file']}: sha256 {rec['sha256']}, {rec['bytes']} bytes")
    return 0


__all__ = ["ASSETS", "SCHEME", "record", "resolve", "sha256_of", "ship", "shipped_uri", "shipped_weights"]

if __name__ == "__main__":
    raise SystemExit(main())
