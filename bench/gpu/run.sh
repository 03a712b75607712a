#!/usr/bin/env bash
# The GPU benchmark as one command, on a bare GPU machine that reaches no network:
#   bash bench/gpu/run.sh [--out DIR] [bench/gpu_run.py's options, e.g. --device cpu --tiny]
# from the repository root, with bench/gpu/wheels/ carried along (bash bench/gpu/wheels.sh
# fetches it where PyPI is reachable). It installs those wheels into a temporary target (no
# dependency resolution: the list is exact), the floor wheels only where the machine's own
# version is older, prints any requirement of theirs that the machine's packages do not meet,
# then runs python -m bench.gpu_run with the clock started here, so the install counts against
# the run's time budget (450 s by default: the whole run ends in under 8 minutes). Results:
# DIR (default $OUT, else bench/gpu/out) gets gpu-results.json, gpu-results.md, gpu-run.log and
# worker.log. No wheels in the folder: the interpreter's own packages are used as they are.
# Environment: PYTHON (default python3), GPU_WHEELS (default bench/gpu/wheels).
set -euo pipefail
started=$(date +%s)
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python3}
GPU_WHEELS=${GPU_WHEELS:-bench/gpu/wheels}
out=${OUT:-bench/gpu/out}
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out=$2; shift 2 ;;
        --out=*) out=${1#--out=}; shift ;;
        *) args+=("$1"); shift ;;
    esac
done
mkdir -p "$out"

shopt -s nullglob
wheels=("$GPU_WHEELS"/*.whl)
if [ ${#wheels[@]} -gt 0 ]; then
    site=$(mktemp -d /tmp/gpu-bench-site.XXXXXX)
    floor=()
    for whl in "$GPU_WHEELS"/floor/*.whl; do  # name-version-...whl: older or absent here?
        base=$(basename "$whl")
        if "$PYTHON" - "${base%%-*}" "$(echo "$base" | cut -d- -f2)" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version

from packaging.version import Version

try:
    sys.exit(0 if Version(version(sys.argv[1])) < Version(sys.argv[2]) else 1)
except PackageNotFoundError:
    sys.exit(0)
EOF
        then floor+=("$whl"); fi
    done
    echo "run.sh: installing ${#wheels[@]} wheels (+${#floor[@]} floor) into $site"
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-index --no-deps \
        --no-compile --no-cache-dir --target "$site" "${wheels[@]}" "${floor[@]}"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    export GPU_BENCH_WHEELS="${#wheels[@]} from $GPU_WHEELS, floor: ${floor[*]##*/}"
    # Diagnostics only: a wheel's requirement on a package the machine had, unmet by its version.
    "$PYTHON" - "$site" <<'EOF' || true
import sys
from importlib.metadata import PackageNotFoundError, distributions, version

from packaging.requirements import Requirement

site = sys.argv[1]
for dist in distributions(path=[site]):
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            found = version(req.name)
        except PackageNotFoundError:
            found = None
        if found is None or (req.specifier and not req.specifier.contains(found, True)):
            print(f"run.sh: unmet: {dist.metadata['Name']} needs {req}, found {found}")
EOF
else
    echo "run.sh: no wheels in $GPU_WHEELS: using $PYTHON's own packages"
fi

export PYTHONUNBUFFERED=1
set +e
"$PYTHON" -m bench.gpu_run --out "$out" --started-at "$started" "${args[@]}" 2>&1 \
    | tee "$out/gpu-run.log"
status=${PIPESTATUS[0]}
echo "run.sh: exit $status after $(( $(date +%s) - started )) s; results in $out"
exit "$status"
