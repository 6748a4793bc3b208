"""One source for the pinned releases (pins.txt): the Makefile installs them, the cluster image is built on the
Ray they pin and installs them, and this environment has them."""

from __future__ import annotations

import re
import subprocess
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pins() -> dict[str, str]:
    """``{distribution: version}`` from pins.txt (extras dropped)."""
    out = {}
    for line in (ROOT / "pins.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, pinned = line.partition("==")
            assert pinned, f"pins.txt: {line!r} is not pinned with =="
            out[re.sub(r"\[.*\]", "", name).strip()] = pinned.strip()
    return out


def test_the_makefile_installs_exactly_the_pins():
    out = subprocess.run(["make", "-s", "--no-print-directory", "print-pins"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    listed = {}
    for item in out.stdout.split():
        name, _, pinned = item.partition("==")
        listed[re.sub(r"\[.*\]", "", name)] = pinned
    assert listed == pins()
    makefile = (ROOT / "Makefile").read_text()
    assert "pins.txt" in makefile and "==" not in makefile.split("PINS ?=", 1)[1].splitlines()[0]


def test_the_image_is_built_on_the_pinned_ray_and_installs_the_pins():
    dockerfile = (ROOT / "cluster" / "Dockerfile").read_text()
    ray_arg = re.search(r"^ARG RAY_VERSION=(\S+)$", dockerfile, re.M)
    assert ray_arg and ray_arg.group(1) == pins()["ray"], "cluster/Dockerfile's RAY_VERSION is not pins.txt's ray"
    base = re.search(r"^FROM (\S+)$", dockerfile, re.M).group(1)
    assert base.startswith("rayproject/ray:${RAY_VERSION}-py31"), base
    assert re.search(r"^COPY .*pins\.txt", dockerfile, re.M)
    installs = re.findall(r"pip install [^\n]*", dockerfile)
    assert installs and all("-r pins.txt" in line for line in installs)  # every install is held to the pins


def test_this_environment_has_the_pinned_releases():
    for name, pinned in pins().items():
        installed = version(name).split("+")[0]
        assert installed == pinned, f"{name} {installed} installed, pins.txt says {pinned}: run `make install`"
