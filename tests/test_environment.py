"""The installed packages are exactly the tested set in requirements.lock.

A venv left over from an older lock (or from a plain ``pip install`` that resolved newer
releases) must fail here, naming each package that drifted, instead of passing for a fresh one.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

from packaging.markers import Marker
from packaging.utils import canonicalize_name
from packaging.version import Version

LOCK = Path(__file__).resolve().parents[1] / "requirements.lock"
_PIN = re.compile(r"^(?P<name>[A-Za-z0-9._-]+)==(?P<version>[^\s;]+)\s*(?:;\s*(?P<marker>.+))?$")


def locked_pins(text: str) -> dict[str, str]:
    """``{canonical name: version}`` of the lock's pins whose markers hold on this interpreter."""
    pins = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _PIN.match(line)
        assert match, f"requirements.lock: not a '<name>==<version>' pin: {line!r}"
        if match["marker"] is None or Marker(match["marker"]).evaluate():
            pins[canonicalize_name(match["name"])] = match["version"]
    return pins


def drift(pins: dict[str, str]) -> list[str]:
    """One line per locked package that is missing or installed at another version."""
    problems = []
    for name, locked in sorted(pins.items()):
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            problems.append(f"{name}: locked {locked}, not installed")
            continue
        if Version(installed).public != Version(locked).public:  # '2.14.1+cu130' is torch 2.14.1
            problems.append(f"{name}: locked {locked}, installed {installed}")
    return problems


def test_lock_parses_and_pins_the_core_stack():
    pins = locked_pins(LOCK.read_text())
    for name in ("torch", "torchvision", "diffusers", "transformers", "accelerate", "peft", "safetensors"):
        assert name in pins, f"requirements.lock has no pin for {name}"


def test_installed_versions_equal_the_lock():
    problems = drift(locked_pins(LOCK.read_text()))
    assert not problems, (
        "this environment is not the tested set in requirements.lock (`make clean-venv test` rebuilds it):\n  "
        + "\n  ".join(problems)
    )


def test_drift_names_missing_and_other_versions():
    assert drift({"torch": metadata.version("torch").split("+")[0]}) == []
    assert drift({"torch": "0.0.1"}) == [f"torch: locked 0.0.1, installed {metadata.version('torch')}"]
    assert drift({"no-such-package-xyz": "1.0"}) == ["no-such-package-xyz: locked 1.0, not installed"]


def test_markers_of_other_platforms_are_skipped():
    text = 'numpy==2.4.6 ; python_full_version < "3.0"\nfoo==1.0 ; sys_platform == "no-such-os"\nbar==2.0\n'
    assert locked_pins(text) == {"bar": "2.0"}
