"""The boundary between the two layers is a folder: every module under ``oftsr/`` imports with torch alone."""

import pkgutil
import subprocess
import sys
from pathlib import Path

import oftsr

FORBIDDEN = ("ray", "mlflow", "fsspec", "s3fs", "pyarrow", "boto3", "botocore", "pipelines")


def core_modules() -> list[str]:
    root = Path(oftsr.__file__).parent
    return ["oftsr", *(m.name for m in pkgutil.walk_packages([str(root)], prefix="oftsr."))]


def test_the_core_lists_every_module_of_the_method():
    names = set(core_modules())
    for expected in (
        "oftsr.solvers",
        "oftsr.losses",
        "oftsr.trajectory",
        "oftsr.nets.unet",
        "oftsr.nets.blocks",
        "oftsr.evaluation",
    ):
        assert expected in names


def test_every_core_module_imports_without_ray_mlflow_or_object_storage():
    code = (
        "import importlib, sys\n"
        f"for m in {core_modules()!r}:\n"
        "    importlib.import_module(m)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
