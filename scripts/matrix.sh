#!/usr/bin/env bash
# The environments docs/promises.md promises, each its own venv built from the registry (CI runs this
# after `make test`, whose pinned .venv is the main cell: deeplabcut 3.0.2, numpy 2, torch 2.14.1).
#
#   scripts/matrix.sh            build every cell, then run the cells' tests (both two at a time)
#   scripts/matrix.sh CELL ...   only those cells
#
# A cell: a name, what pip installs, which tests run. DeepLabCut cells run the real end-to-end
# path (rc5 snapshots with numpy metrics -> evaluate_network fails -> migrate, both methods ->
# passes -> restore), what the tool says about DeepLabCut, and every plugin load path.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=.venv-matrix
TEST_DEPS="pytest>=8 hypothesis>=6.100"
TOOL_DEPS="pyyaml>=6 click>=8.1 filelock>=3.12 tqdm>=4.60 platformdirs>=3"
DLC_TESTS="tests/test_verdicts.py tests/test_plugin.py tests/test_numpy_dialects.py tests/test_dlcyaml.py
  tests/test_signature.py tests/test_signature_deeplabcut.py
  tests/test_deeplabcut.py::test_migration_makes_evaluate_network_work_and_restore_undoes_it
  tests/test_deeplabcut.py::test_a_head_of_the_wrong_shape_is_explained_by_module"
  # what depends on DeepLabCut's version; the torch-level suites run in the torch cells (3.10: torch 2.6.0)
TORCH_TESTS="-m not\ deeplabcut\ and\ not\ slurm\ and\ not\ filesystems"  # SLURM and mounts: the main cell
DLC_CORE_TESTS="tests/test_verdicts.py tests/test_numpy_dialects.py
  tests/test_deeplabcut.py::test_migration_makes_evaluate_network_work_and_restore_undoes_it"
NUMPY_TESTS="$TORCH_TESTS --ignore=tests/test_platforms.py"  # the platform tests do not depend on numpy: 3.10, 3.13

declare -A INSTALL=(
  [dlc-3.0.0]="torch==2.14.1 torchvision==0.29.1 deeplabcut==3.0.0"
  [dlc-3.0.1]="torch==2.6.0 torchvision==0.21.0 deeplabcut==3.0.1"  # the lowest torch pyproject.toml declares
  [torch-numpy1]="torch==2.13.0 numpy==1.26.4 filelock==3.12.0"  # and the lowest filelock declared
  [python-3.10]="torch==2.6.0 numpy>=2,<3"  # numpy 2 and the newest filelock, as in 3.13
  [python-3.12-dlc]="torch==2.14.1 torchvision==0.29.1 deeplabcut==3.0.2"  # DeepLabCut's pip install path
  [python-3.13]="torch==2.14.1 numpy>=2,<3"  # the newest Python pyproject.toml declares
)
declare -A PYTHON_OF=(  # the interpreter a cell's venv is made from (default: python3, 3.11 here)
  [python-3.10]="/root/.pyenv/versions/3.10.13/bin/python3"  # the oldest Python pyproject.toml declares
  [python-3.12-dlc]="/root/.pyenv/versions/3.12.1/bin/python3"
  [python-3.13]="/root/.pyenv/versions/3.13.0/bin/python3"
)
declare -A TESTS=(
  [dlc-3.0.0]="$DLC_TESTS"
  [dlc-3.0.1]="$DLC_TESTS"
  [torch-numpy1]="$NUMPY_TESTS"
  [python-3.10]="$TORCH_TESTS"
  [python-3.12-dlc]="$DLC_CORE_TESTS"  # the rest is Python-agnostic and runs in the 3.10 and 3.13 cells
  [python-3.13]="$TORCH_TESTS"
)
CELLS=("$@")
[ ${#CELLS[@]} -eq 0 ] && CELLS=(dlc-3.0.0 dlc-3.0.1 python-3.12-dlc torch-numpy1 python-3.10 python-3.13)

build() {  # one cell's venv, once per run (a stamp records what it was built from)
  local cell=$1 venv=$ROOT/$1 python=${PYTHON_OF[$1]:-python3}
  local wanted="$python: ${INSTALL[$1]} $TOOL_DEPS $TEST_DEPS"
  if [ -f "$venv/.built" ] && [ "$(cat "$venv/.built")" = "$wanted" ]; then return 0; fi
  rm -rf "$venv" && "$python" -m venv "$venv" || return 1
  # shellcheck disable=SC2086
  "$venv/bin/pip" install --quiet ${INSTALL[$cell]} $TOOL_DEPS $TEST_DEPS 2>&1 | grep -v "^WARNING: Location" >&2
  "$venv/bin/pip" install --quiet --no-deps -e . 2>&1 | grep -v "^WARNING: Location" >&2
  "$venv/bin/python" -c "import dlc_snapshot_fix.cli" && echo "$wanted" > "$venv/.built"
}

mkdir -p "$ROOT"
declare -A BUILT
pids=()
for cell in "${CELLS[@]}"; do  # two builds at a time: pip waits on the network and the disk, not the CPU
  build "$cell" > "$ROOT/$cell.build.log" 2>&1 &
  pids+=("$!:$cell")
  if [ ${#pids[@]} -ge 2 ]; then
    for entry in "${pids[@]}"; do wait "${entry%%:*}"; BUILT[${entry#*:}]=$?; done
    pids=()
  fi
done
for entry in "${pids[@]}"; do wait "${entry%%:*}"; BUILT[${entry#*:}]=$?; done

test_cell() {  # one cell's tests; its log, and its one-line result in $ROOT/CELL.result
  local cell=$1
  {
    "$ROOT/$cell/bin/python" -m pip freeze 2>/dev/null | grep -i -E "^(deeplabcut|torch|torchvision|numpy|filelock)==" | tr '\n' ' '
    "$ROOT/$cell/bin/python" --version
  } > "$ROOT/$cell.versions"
  # shellcheck disable=SC2086
  selection=$(echo ${TESTS[$cell]})  # one line
  # 100 fuzz cases per property in a cell (the main cell runs 500): the properties do not depend on the cell
  if eval "DLC_FUZZ_EXAMPLES=\${DLC_FUZZ_EXAMPLES:-100} HF_HUB_OFFLINE=1 MPLBACKEND=Agg $ROOT/$cell/bin/python -m pytest -q -p no:cacheprovider $selection" \
      > "$ROOT/$cell.test.log" 2>&1; then
    tail -1 "$ROOT/$cell.test.log" > "$ROOT/$cell.result"
  else
    echo "FAILED: $(tail -1 "$ROOT/$cell.test.log")" > "$ROOT/$cell.result"
  fi
}

running=0  # two cells' tests at a time: each is one pytest process, this machine has two cores
for cell in "${CELLS[@]}"; do
  [ "${BUILT[$cell]}" != 0 ] && continue
  rm -f "$ROOT/$cell.result"
  test_cell "$cell" &
  running=$((running + 1))
  if [ $running -ge 2 ]; then wait -n; running=$((running - 1)); fi
done
wait

failed=0
summary=()
for cell in "${CELLS[@]}"; do
  echo "=== matrix cell $cell ==="
  if [ "${BUILT[$cell]}" != 0 ]; then
    echo "could not build the venv:"; tail -20 "$ROOT/$cell.build.log"
    summary+=("$cell: BUILD FAILED"); failed=1; continue
  fi
  cat "$ROOT/$cell.versions"
  result=$(cat "$ROOT/$cell.result" 2>/dev/null || echo "FAILED: no result")
  if [[ $result == FAILED* ]]; then
    grep -v "^INFO\|^WARNING" "$ROOT/$cell.test.log" | tail -40
    failed=1
  fi
  summary+=("$cell: $result")
  echo "${summary[-1]}"
done
echo "=== matrix ==="
printf '%s\n' "${summary[@]}"
exit $failed
