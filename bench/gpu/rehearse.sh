#!/usr/bin/env bash
# Rehearse the GPU machine's install here, at no device time: an interpreter that sees only
# the packages bench/gpu/gpu-has.txt says the machine has (linked from the project's virtual
# environment, in this machine's versions), plus the wheel list fetched for this Python, then
# bench/gpu/run.sh --device cpu --tiny with it. A wheel missing from bench/gpu/wheels.txt fails
# here as it would there (an ImportError, or run.sh's "unmet" lines). Versions of the packages
# the machine has are this venv's, not the machine's: that part only the GPU run can check.
#
# Usage, from the repository root where PyPI is reachable (about a minute):
#   bash bench/gpu/rehearse.sh [OUT_DIR]
# Environment: VENV (default .venv), the project's virtual environment.
set -euo pipefail
cd "$(dirname "$0")/../.."

VENV=${VENV:-.venv}
work=$(mktemp -d /tmp/gpu-rehearse.XXXXXX)
out=${1:-$work/out}
py_version=$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')

# The wheels, for this interpreter's tags instead of the GPU machine's CPython 3.12.
PYTHON="$VENV/bin/python" PY_VERSION="$py_version" GPU_WHEELS="$work/wheels" \
    bash bench/gpu/wheels.sh

# A bare interpreter (no site packages) whose path holds links to the "machine's" packages.
"$VENV/bin/python" -m venv --without-pip "$work/machine"
"$VENV/bin/python" - "$work/machine" <<'EOF'
import re
import sys
import sysconfig
from importlib.metadata import distributions
from pathlib import Path

from packaging.requirements import Requirement


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def names(path: str) -> set[str]:
    return {canon(line.split("#")[0].split("==")[0].strip())
            for line in Path(path).read_text().splitlines() if line.split("#")[0].strip()}


machine = Path(sys.argv[1])
has = names("bench/gpu/gpu-has.txt") | {"pip"}  # the machine installs with its own pip
wheels = names("bench/gpu/wheels.txt")
dists = {canon(d.metadata["Name"]): d for d in distributions()}
# This venv's versions of the machine's packages may need more than the machine's versions do
# (huggingface_hub 2.x needs httpx2, 1.33 does not): link those too, never a wheel's package.
extra, todo = set(), sorted(has & set(dists))
while todo:
    for text in dists[todo.pop()].requires or []:
        req = Requirement(text)
        name = canon(req.name)
        if (req.marker is None or req.marker.evaluate({"extra": ""})) and name in dists \
                and name not in has | wheels | extra:
            extra.add(name)
            todo.append(name)
if extra:
    print(f"rehearse: also linked, needed by this venv's versions only: {sorted(extra)}")
links = machine / "has"
links.mkdir()
linked = 0
for name, dist in dists.items():
    if name not in has | extra:
        continue
    root = Path(dist.locate_file(""))
    for top in {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
        if not (links / top).exists() and (root / top).exists():
            (links / top).symlink_to(root / top)
    linked += 1
purelib = Path(sysconfig.get_paths(vars={"base": str(machine), "platbase": str(machine)})[
    "purelib"])
purelib.mkdir(parents=True, exist_ok=True)
(purelib / "machine-has.pth").write_text(str(links) + "\n")
print(f"rehearse: {linked} distributions of bench/gpu/gpu-has.txt linked into {links}")
EOF

PYTHON="$work/machine/bin/python" GPU_WHEELS="$work/wheels" \
    bash bench/gpu/run.sh --out "$out" --device cpu --tiny
echo "rehearse: OK; results in $out"
