import subprocess
import sys

CORE = [
    "oftsr",
    "oftsr.conventions",
    "oftsr.degrade",
    "oftsr.flow",
    "oftsr.nets",
    "oftsr.solvers",
    "oftsr.losses",
    "oftsr.infer",
    "oftsr.metrics",
    "oftsr.fid",
    "oftsr.evaluation",
    "oftsr.engine",
    "oftsr.ema",
    "oftsr.augment",
    "oftsr.training",
]


def test_core_imports_no_ray_mlflow_or_s3():
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in CORE)
        + "bad = [m for m in ('ray', 'mlflow', 's3fs', 'boto3', 'botocore') if m in sys.modules]\n"
        + "print(bad); sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
