"""The model configs that ship with the package (`configs/*.json` in a checkout), found by name.

`resolve_config("lact_debug_r2")`, `resolve_config("configs/lact_debug_r2.json")` and an absolute path
all give the same file, from a checkout or from an installed (non-editable) package.
"""

from __future__ import annotations

import difflib
from pathlib import Path

# in a checkout `ttt_common/configs` is a link to the top-level `configs/`; installed, a real folder
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def bundled_configs() -> list[str]:
    """Names (file stems) of the bundled configs, sorted."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def resolve_config(spec: str | Path) -> Path:
    """A config file from a path, or from the name of a bundled config (with or without `.json`,
    with or without a leading `configs/`). Raises FileNotFoundError naming the closest bundled name."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    name = path.name[:-5] if path.name.endswith(".json") else path.name
    bundled = CONFIG_DIR / f"{name}.json"
    if path.parent in (Path("."), Path("configs")) and bundled.is_file():
        return bundled
    close = difflib.get_close_matches(name, bundled_configs(), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; bundled configs: {', '.join(bundled_configs())}"
    raise FileNotFoundError(f"{spec}: no such file and no bundled config of that name{hint}")
