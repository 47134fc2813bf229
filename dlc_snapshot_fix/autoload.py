"""Environment-wide activation of the plugin, for scripts a user cannot edit.

``dlc-snapshot-fix plugin enable`` writes a one-line ``.pth`` file into this
environment's site-packages; Python runs it at start-up, and it imports this module.
Nothing is patched then: a finder waits for ``import deeplabcut`` and installs the
plugin right after DeepLabCut has finished importing, so processes that never import
DeepLabCut pay only for this small module. ``plugin disable`` deletes the file;
``DLC_SNAPSHOT_FIX_PLUGIN=0`` keeps it off in one process.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # not ``typing.TYPE_CHECKING``: importing typing is ~5 ms of every process's start-up
if TYPE_CHECKING:
    from pathlib import Path
    from types import ModuleType

# Only what every process pays for at start-up is imported above; the rest waits for its use.

PTH_NAME = "dlc_snapshot_fix_plugin.pth"
PTH_LINE = "import dlc_snapshot_fix.autoload; dlc_snapshot_fix.autoload.activate()\n"
DISABLE_ENV = "DLC_SNAPSHOT_FIX_PLUGIN"


def pth_path() -> Path:
    """Where the start-up file goes: this interpreter's site-packages."""
    import sysconfig
    from pathlib import Path

    return Path(sysconfig.get_paths()["purelib"]) / PTH_NAME


def enable() -> Path:
    path = pth_path()
    path.write_text(PTH_LINE, encoding="utf-8")
    return path


def disable() -> Path | None:
    path = pth_path()
    if path.exists():
        path.unlink()
        return path
    return None


def is_enabled() -> bool:
    return pth_path().exists()


class _InstallAfterDeepLabCut:
    """A meta path finder that finds nothing itself; wraps DeepLabCut's own loader to install the plugin after it.

    (Not a subclass of ``importlib.abc.MetaPathFinder``: importing that costs every process ~8 ms.)
    """

    def find_spec(self, fullname: str, path=None, target=None):
        if fullname != "deeplabcut":
            return None
        import importlib.machinery

        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        original_exec = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            original_exec(module)
            _install_or_warn()

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _install_or_warn() -> None:
    import warnings

    from dlc_snapshot_fix import plugin

    try:
        plugin.install()
    except plugin.PluginError as error:  # never break `import deeplabcut`; say so loudly instead
        warnings.warn(f"dlc-snapshot-fix plugin NOT active: {error}", RuntimeWarning, stacklevel=2)


def activate() -> None:
    """Called from the ``.pth`` file at interpreter start-up."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return
    if "deeplabcut" in sys.modules:
        _install_or_warn()
        return
    import importlib.util

    if importlib.util.find_spec("deeplabcut") is not None:
        sys.meta_path.insert(0, _InstallAfterDeepLabCut())
