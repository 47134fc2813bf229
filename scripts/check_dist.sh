#!/usr/bin/env bash
# Install as users install: build the sdist and the wheel (python -m build, in isolation), check
# them (twine check --strict, and what they hold), then install the wheel - not this tree - into a
# fresh venv that has only torch, and run the CLI from outside the tree on a copy of sample_project
# with a DataParallel snapshot in it. CI runs this (`make dist-check`).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
WORK=$REPO/.venv-dist
PYTHON=${PYTHON:-python3}
rm -rf "$WORK/dist" "$WORK/user" "$WORK/run"
mkdir -p "$WORK/run"

echo "=== build the sdist and the wheel"
if [ ! -x "$WORK/tools/bin/twine" ]; then
  "$PYTHON" -m venv "$WORK/tools"
  "$WORK/tools/bin/pip" install --quiet build twine
fi
"$WORK/tools/bin/python" -m build --outdir "$WORK/dist" . > "$WORK/build.log" 2>&1 || { tail -30 "$WORK/build.log"; exit 1; }
ls -l "$WORK/dist"
"$WORK/tools/bin/twine" check --strict "$WORK/dist"/*

echo "=== what they hold"
"$PYTHON" - "$WORK/dist" <<'PY'
import sys, tarfile, zipfile
from pathlib import Path

dist = Path(sys.argv[1])
wheel, = dist.glob("*.whl")
sdist, = dist.glob("*.tar.gz")
in_wheel = zipfile.ZipFile(wheel).namelist()
in_sdist = [name.split("/", 1)[1] for name in tarfile.open(sdist).getnames() if "/" in name]
problems = []
for name in ("LICENSE", "COPYING"):
    if not any(n.endswith(f".dist-info/licenses/{name}") for n in in_wheel):
        problems.append(f"the wheel does not ship {name}")
    if name not in in_sdist:
        problems.append(f"the sdist does not ship {name}")
for name in in_wheel:  # only the package and its metadata; no tests, test data, sample project or snapshots
    top = name.split("/", 1)[0]
    if not (top == "dlc_snapshot_fix" or top.endswith(".dist-info")) or name.endswith((".pt", ".pth")):
        problems.append(f"the wheel holds {name}")
for name in in_sdist:
    if name.startswith("sample_project/") or name.endswith((".pt", ".pth")) or "/.venv" in name:
        problems.append(f"the sdist holds {name}")
print(f"wheel: {len(in_wheel)} files, sdist: {len(in_sdist)} files")
if problems:
    sys.exit("\n".join(problems))
PY

echo "=== a fresh venv with only torch, then the wheel"
"$PYTHON" -m venv "$WORK/user"
"$WORK/user/bin/pip" install --quiet "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" >&2 || true
"$WORK/user/bin/pip" install --quiet "$WORK/dist"/*.whl
"$WORK/user/bin/pip" freeze | grep -i -E "^(torch|numpy|dlc-snapshot-fix)[=@ ]" | tr '\n' ' '; echo

echo "=== the installed CLI, from outside the tree"
cd "$WORK/run"
"$WORK/user/bin/dlc-snapshot-fix" --version
"$WORK/user/bin/python" -c "import dlc_snapshot_fix, sys; print(dlc_snapshot_fix.__file__); sys.exit('site-packages' not in dlc_snapshot_fix.__file__)"
cp -r "$REPO/sample_project" sample
find sample -name '*.pt' -delete
rm -rf sample/.dlc-snapshot-fix sample/evaluation-results-pytorch
"$WORK/user/bin/python" - <<'PY'
from pathlib import Path

import torch

model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
train = next(Path("sample").glob("dlc-models-pytorch/iteration-0/*/train"))
state = torch.nn.DataParallel(model).state_dict()  # "module.0.weight", ...: a two-GPU snapshot
torch.save({"model": state, "metadata": {"epoch": 1}}, train / "snapshot-001.pt")
PY
"$WORK/user/bin/dlc-snapshot-fix" sample --no-model-check
"$WORK/user/bin/dlc-snapshot-fix" sample --check --no-model-check  # exit 0: nothing left to migrate
"$WORK/user/bin/python" -c "
import torch, glob
keys = list(torch.load(glob.glob('sample/dlc-models-pytorch/*/*/train/snapshot-001.pt')[0], weights_only=True)['model'])
assert keys and not any(k.startswith('module.') for k in keys), keys
print('installed wheel migrated the snapshot:', keys[:2], '...')
"
echo "=== dist check passed"
