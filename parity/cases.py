"""Dispatch of fixture cases to the adapter that checks our port against them, and case results.

Every case (`<case>.json` + `<case>.npz`, format in `parity/README.md`) names what produced it: the
official TTT layers / model of test-time-training/ttt-lm-jax, PonderTTT's layer, or LaCT's chunk
operations. `adapter_for(case)` picks the adapter module that rebuilds the matching port from the
case's own config and returns one `Check` per compared tensor; `run_case_file` / `run_loaded_case`
turn that into a `CaseResult` and never raise, so one broken case cannot stop a whole run.

Dispatch rules (first match wins), on the JSON's `kind` and `class`:

| rule | adapter |
| --- | --- |
| `class` starts with `ponderttt.` | `parity.ponder.run_case` |
| `kind` is `lact_op` or `lact_helper` | `parity.lact.run_case` |
| `kind` is `lact_layer` | `parity.lact_layer.run_case` |
| `kind` is `layer` and `class` starts with `ttt.models.ttt_layer.` | `parity.official_layer.run_case` |
| `kind` is `model` | `parity.official_model.run_case` |
| `kind` is `checkpoint` | `parity.official_model.run_checkpoint_case` |
"""

from __future__ import annotations

import importlib
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from parity.fixtures import Case, Check, load_case

Adapter = Callable[[Case], list[Check]]

# (module, function) of every adapter; modules are imported only when a case needs them, so a
# missing or broken adapter fails its own cases and nothing else.
ADAPTERS: dict[str, tuple[str, str]] = {
    "ponder": ("parity.ponder", "run_case"),
    "lact": ("parity.lact", "run_case"),
    "lact_layer": ("parity.lact_layer", "run_case"),
    "official_layer": ("parity.official_layer", "run_case"),
    "official_model": ("parity.official_model", "run_case"),
    "official_checkpoint": ("parity.official_model", "run_checkpoint_case"),
}

OFFICIAL_LAYER_PREFIX = "ttt.models.ttt_layer."
PONDER_PREFIX = "ponderttt."
LACT_KINDS = ("lact_op", "lact_helper")


class UnknownCaseError(ValueError):
    """A case whose `kind` / `class` matches no adapter."""


def adapter_name(meta: dict) -> str:
    """The key in `ADAPTERS` for a case's metadata (its JSON dict).

    Raises:
        UnknownCaseError: no rule matches; the message names the kind, the class and the known ones.
    """
    kind = meta.get("kind")
    cls = meta.get("class") or ""
    if not isinstance(cls, str):
        raise UnknownCaseError(f"case field 'class' must be a string, got {cls!r}")
    if cls.startswith(PONDER_PREFIX):
        return "ponder"
    if kind in LACT_KINDS:
        return "lact"
    if kind == "lact_layer":
        return "lact_layer"
    if kind == "layer" and cls.startswith(OFFICIAL_LAYER_PREFIX):
        return "official_layer"
    if kind == "model":
        return "official_model"
    if kind == "checkpoint":
        return "official_checkpoint"
    raise UnknownCaseError(
        f"no adapter for kind={kind!r} class={cls!r}: known are class 'ponderttt.*', kind "
        f"{' / '.join(repr(k) for k in LACT_KINDS)}, kind 'lact_layer', kind 'layer' with class '{OFFICIAL_LAYER_PREFIX}*', "
        "kind 'model', kind 'checkpoint' (see parity/README.md)"
    )


def resolve_adapter(name: str) -> Adapter:
    """Import the adapter `ADAPTERS[name]` (a clear ImportError if its module or function is missing)."""
    module_name, func_name = ADAPTERS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise  # the adapter exists but one of its own imports is missing: show that one
        raise ImportError(f"adapter module {module_name} is not available ({exc})") from exc
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ImportError(f"adapter module {module_name} has no function {func_name}(case)")
    return func


def adapter_for(case: Case) -> Adapter:
    """The function that checks `case`: `adapter(case) -> list[Check]` (see the module docstring).

    Raises:
        UnknownCaseError: the case's kind/class matches no adapter.
        ImportError: the adapter's module cannot be imported.
    """
    return resolve_adapter(adapter_name(case.meta))


_GRAD_NAME = re.compile(r"(?:^|[\s/:])grad/")


def is_grad_check(check: Check) -> bool:
    """Gradient checks are named after their `grad/...` array (the fixture key convention).

    Adapters may prefix the key (`manual/grad/input/q`, `streaming_params: grad/...`), so any
    path component `grad/` counts, as does a name starting with `grad`.
    """
    return check.name.startswith("grad") or bool(_GRAD_NAME.search(check.name))


@dataclass
class CaseResult:
    """The outcome of one case: its checks, or the error that prevented them.

    A case passes when it produced at least one check, every check passed and nothing raised.
    """

    name: str
    kind: str
    checks: list[Check] = field(default_factory=list)
    error: str = ""
    path: Path | None = None
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.error and bool(self.checks) and all(c.passed for c in self.checks)

    def _worst(self, grads: bool) -> float | None:
        errs = [c.max_rel for c in self.checks if is_grad_check(c) == grads]
        if not errs:
            return None
        # nan counts as worst: max() would silently skip it depending on the order
        return math.nan if any(math.isnan(e) for e in errs) else max(errs)

    @property
    def out_err(self) -> float | None:
        """Largest relative error over the output checks (None when the case has none)."""
        return self._worst(grads=False)

    @property
    def grad_err(self) -> float | None:
        """Largest relative error over the gradient checks (None when the case has none)."""
        return self._worst(grads=True)

    @property
    def failed_checks(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def reason(self, max_checks: int = 3) -> str:
        """Why the case failed ('' when it passed), in one line naming up to `max_checks` bad tensors."""
        if self.error:
            return self.error
        if not self.checks:
            return "adapter returned no checks (nothing was compared)"
        failed = self.failed_checks
        text = "; ".join(describe_check(c) for c in failed[:max_checks])
        return text + (f"; (+{len(failed) - max_checks} more, see --verbose)" if len(failed) > max_checks else "")


def describe_check(check: Check) -> str:
    """`name max_rel=... tol=...` plus the note, for one check."""
    text = f"{check.name} max_rel={check.max_rel:.3e} tol={check.tol:.0e}"
    return f"{text} ({check.note})" if check.note else text


def _one_line(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def run_loaded_case(case: Case) -> CaseResult:
    """Dispatch an already-loaded case to its adapter; any exception becomes a failed result."""
    kind = str(case.meta.get("kind", "?"))
    result = CaseResult(name=case.name, kind=kind, path=case.path)
    start = time.perf_counter()
    try:
        adapter = adapter_for(case)
        checks = adapter(case)
        if not isinstance(checks, list) or not all(isinstance(c, Check) for c in checks):
            raise TypeError(f"adapter must return list[Check], got {type(checks).__name__}")
        result.checks = checks
    except Exception as exc:  # one case failing must not stop the run
        result.error = _one_line(exc)
    result.seconds = time.perf_counter() - start
    return result


def run_case_file(json_path: str | Path) -> CaseResult:
    """Load `<case>.json` (+ npz) and run it; a missing npz or unreadable JSON is a failed result."""
    json_path = Path(json_path)
    try:
        case = load_case(json_path)
    except Exception as exc:
        kind = "?"
        try:
            kind = str(json.loads(json_path.read_text()).get("kind", "?"))
        except Exception:  # the kind is only for the report line
            pass
        return CaseResult(name=json_path.stem, kind=kind, error=_one_line(exc), path=json_path)
    return run_loaded_case(case)


def discover(directory: str | Path) -> list[Path]:
    """Every case JSON under `directory` (recursively), or the file itself if it is a `.json`.

    Unlike `parity.fixtures.find_cases` this keeps a case JSON whose npz is missing, so the run
    reports it as failed instead of silently skipping it. A JSON counts as a case when it is an
    object with a `kind` or `case` field, or when an npz of the same stem lies beside it.

    Raises:
        FileNotFoundError: `directory` does not exist.
    """
    directory = Path(directory)
    if directory.is_file():
        if directory.suffix != ".json":
            raise ValueError(f"--fixtures {directory}: expected a directory or a <case>.json file")
        return [directory]
    if not directory.is_dir():
        raise FileNotFoundError(f"fixture directory {directory} does not exist")
    found = []
    for path in sorted(directory.rglob("*.json")):
        if path.with_suffix(".npz").exists():
            found.append(path)
            continue
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # not a case file (no npz, not JSON we can read)
        if isinstance(meta, dict) and ("kind" in meta or "case" in meta):
            found.append(path)
    return found
