#!/usr/bin/env bash
# Fetch exactly the wheels the GPU machine lacks, for its CPython 3.12 on manylinux x86_64:
# bench/gpu/wheels.txt (always installed there) and bench/gpu/wheels-floor.txt (installed only
# where the machine's own version is older), into bench/gpu/wheels/ (git-ignored), then check
# the folder: every listed name, one version each, nothing else, and under 48 MiB in all (the
# device tool carries at most 64 MiB with the working tree). No torch: the machine has it.
#
# Usage, from the repository root where PyPI is reachable (not on the GPU machine):
#   bash bench/gpu/wheels.sh            download, then check
#   bash bench/gpu/wheels.sh --check    check the folder only
# Environment:
#   PYTHON      the interpreter whose pip downloads (default .venv/bin/python, else python3)
#   PY_VERSION  target CPython (default 3.12; 3.11 fetches this machine's own tags, to rehearse
#               the install here)
#   GPU_WHEELS  the folder (default bench/gpu/wheels)
#   SKIP        names left out of the download and the check, e.g. once worker/outputs/upload.py
#               imports boto3 only when a bucket is set:
#               SKIP="boto3 botocore s3transfer jmespath" (-16 MiB)
#   LIMIT_MIB   the size limit (default 48)
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
PY_VERSION=${PY_VERSION:-3.12}
GPU_WHEELS=${GPU_WHEELS:-bench/gpu/wheels}
SKIP=${SKIP:-}
LIMIT_MIB=${LIMIT_MIB:-48}
export GPU_WHEELS SKIP LIMIT_MIB

# pip matches manylinux tags exactly: name every glibc level a wheel here may carry (the
# machine's glibc is newer than all of them).
PLATFORMS=(manylinux1_x86_64 manylinux2010_x86_64 manylinux2014_x86_64)
for n in 5 12 17 24 26 27 28 31 34 35; do PLATFORMS+=("manylinux_2_${n}_x86_64"); done

requirements() {  # the pinned lines of a list file, without comments and without $SKIP
    sed -e 's/#.*//' -e 's/[[:space:]]//g' "$1" | grep -v '^$' | while read -r pin; do
        name=${pin%%==*}
        case " $SKIP " in *" $name "*) ;; *) echo "$pin" ;; esac
    done
}

download() {  # $1: list file, $2: folder
    local pins
    mapfile -t pins < <(requirements "$1")
    mkdir -p "$2"
    "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps \
        --only-binary=:all: --implementation cp --python-version "$PY_VERSION" \
        --abi "cp${PY_VERSION/./}" "${PLATFORMS[@]/#/--platform=}" -d "$2" "${pins[@]}"
}

if [ "${1:-}" != "--check" ]; then
    rm -rf "$GPU_WHEELS"  # one version each: nothing of an earlier list stays
    download bench/gpu/wheels.txt "$GPU_WHEELS"
    download bench/gpu/wheels-floor.txt "$GPU_WHEELS/floor"
fi

"$PYTHON" - <<'EOF'
"""Check the wheel folder against the lists; print each wheel's size and the total."""
import os
import re
import sys
from pathlib import Path

folder, skip = Path(os.environ["GPU_WHEELS"]), set(os.environ["SKIP"].split())
limit = float(os.environ["LIMIT_MIB"]) * 2**20


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def listed(path: str) -> dict[str, str]:
    pins = {}
    for line in Path(path).read_text().splitlines():
        pin = line.split("#")[0].strip()
        if pin:
            name, version = pin.split("==")
            if name not in skip:
                pins[canon(name)] = version
    return pins


problems, total = [], 0
for sub, path in (("", "bench/gpu/wheels.txt"), ("floor", "bench/gpu/wheels-floor.txt")):
    want, have = listed(path), {}
    for wheel in sorted((folder / sub).glob("*.whl")):
        name, version = wheel.name.split("-")[:2]
        have.setdefault(canon(name), []).append(version)
        total += wheel.stat().st_size
        print(f"{wheel.stat().st_size / 2**20:8.2f} MiB  {sub + '/' if sub else ''}{wheel.name}")
    for name, versions in sorted(have.items()):
        if len(versions) > 1:
            problems.append(f"{name}: {len(versions)} versions ({', '.join(versions)})")
        elif name not in want:
            problems.append(f"{name}: not in {path}")
        elif versions[0] != want[name]:
            problems.append(f"{name}: {versions[0]}, {path} pins {want[name]}")
    problems += [f"{name}=={version}: missing" for name, version in sorted(want.items())
                 if name not in have]
print(f"{total / 2**20:8.2f} MiB  in all (limit {limit / 2**20:.0f} MiB), {folder}")
if total > limit:
    problems.append(f"{total / 2**20:.2f} MiB is over the {limit / 2**20:.0f} MiB limit")
if problems:
    sys.exit("wheels: " + "; ".join(problems))
print("wheels: OK")
EOF
