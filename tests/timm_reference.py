"""timm 0.4.12's `timm/data/auto_augment.py`, loaded on its own (it needs only Pillow and numpy) so that `import timm`,
which imports torchvision, never runs. Looked for in an installed timm 0.4.12, then in the wheel that
`pip download --no-deps timm==0.4.12 -d DIR` fetches, with DIR from $VITCL_TIMM_WHEEL_DIR or ~/.cache/vitcl
(.ci/run fetches it there)."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import types
import zipfile
from pathlib import Path

VERSION = "0.4.12"
WHEEL = f"timm-{VERSION}-py3-none-any.whl"
MEMBER = "timm/data/auto_augment.py"
HOW = (f"timm {VERSION} not found: `pip download --no-deps timm=={VERSION} -d ~/.cache/vitcl` "
       f"(or `pip install --no-deps timm=={VERSION}`) enables the comparisons with timm")


def _source() -> str | None:
    try:
        installed = importlib.metadata.version("timm") == VERSION
    except importlib.metadata.PackageNotFoundError:
        installed = False
    spec = importlib.util.find_spec("timm") if installed else None  # finds the package without importing it
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "data" / "auto_augment.py"
        if path.exists():
            return path.read_text()
    wheel = Path(os.environ.get("VITCL_TIMM_WHEEL_DIR", Path.home() / ".cache" / "vitcl")) / WHEEL
    if wheel.exists():
        with zipfile.ZipFile(wheel) as z:
            return z.read(MEMBER).decode()
    return None


def load() -> types.ModuleType | None:
    src = _source()
    if src is None:
        return None
    module = types.ModuleType("timm_auto_augment_0_4_12")
    exec(compile(src, MEMBER, "exec"), module.__dict__)
    return module
