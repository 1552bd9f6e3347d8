"""Bundled configs resolve by name, by `configs/<name>.json` and by path; unknown names get a suggestion."""

from __future__ import annotations

import json

import pytest

from ttt_common.config_files import CONFIG_DIR, bundled_configs, resolve_config


def test_bundled_configs_resolve_by_name_and_path(tmp_path, monkeypatch):
    assert "lact_debug_r2" in bundled_configs() and "ttt_125m" in bundled_configs()
    by_name = resolve_config("lact_debug_r2")
    assert by_name == CONFIG_DIR / "lact_debug_r2.json" and json.loads(by_name.read_text())["r"] == 2
    monkeypatch.chdir(tmp_path)  # outside the checkout: `configs/...` still finds the bundled file
    assert resolve_config("configs/lact_debug_r2.json").read_bytes() == by_name.read_bytes()
    own = tmp_path / "mine.json"
    own.write_text("{}")
    assert resolve_config(own) == own and resolve_config("mine.json").resolve() == own.resolve()


def test_unknown_config_names_the_closest():
    with pytest.raises(FileNotFoundError, match="did you mean 'lact_debug_r2'"):
        resolve_config("lact_debug_r3")
    with pytest.raises(FileNotFoundError, match="no such file"):
        resolve_config("does/not/exist.json")
