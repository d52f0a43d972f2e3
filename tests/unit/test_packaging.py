"""What ``pip install .`` puts in site-packages: EPP's own names only. The built-in plugins and the simulator keep
their folders (plugins/, sim/) but install as ``epp_plugins`` and ``epp_sim`` (setup.py); bench/ is not installed.
Generic names such as ``plugins``, ``sim`` or ``bench`` would collide with anything else so named."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_installs_only_epps_own_top_level_names(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(ROOT)], check=True, timeout=240, capture_output=True)
    (wheel,) = tmp_path.glob("epp-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"epp", "epp_plugins", "epp_sim"}
    # every subpackage is in, under its installed name
    for module in ("epp_plugins/scorers/precise/index.py", "epp_sim/apis/__init__.py", "epp/stack/demo.py"):
        assert module in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "builtin = epp_plugins" in text and "epp-sim = epp_sim.__main__:main" in text
