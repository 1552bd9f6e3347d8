"""Damaged values in an official JAX checkpoint are refused by `official_port.convert_jax` (issue 11, item 5).

The damage is made at the byte level: one bfloat16 element of a weight in the bundled
`streaming_params` file is overwritten in place, so the msgpack stream stays well-formed and only the
value check can notice.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from official_port.convert_jax import check_param_values, load_official_checkpoint, read_streaming_checkpoint
from parity.fixtures import BUNDLED

CKPT_DIR = BUNDLED / "checkpoints"
PARAMS_FILE = CKPT_DIR / "model_ttt_linear.streaming_params"
CONFIG = CKPT_DIR / "model_ttt_linear_ckpt.json"
KEY = "model/h/1/seq_modeling_block/wq/kernel"
ROOT = Path(__file__).resolve().parents[2]


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    return (np.asarray(x, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)


def damaged_copy(tmp_path: Path, index: tuple[int, int], bits: int) -> Path:
    """A copy of the bundled checkpoint with element `index` of KEY's bfloat16 bytes set to `bits`."""
    params = read_streaming_checkpoint(PARAMS_FILE)
    raw = bytearray(PARAMS_FILE.read_bytes())
    buf = _bf16_bits(params[KEY]).tobytes()  # the tensor's bytes as stored (bf16, little endian, C order)
    pos = bytes(raw).find(buf)
    assert pos >= 0 and bytes(raw).find(buf, pos + 1) < 0, "the tensor's bytes must occur exactly once"
    flat = np.ravel_multi_index(index, params[KEY].shape)
    raw[pos + 2 * flat: pos + 2 * flat + 2] = int(bits).to_bytes(2, "little")
    out = tmp_path / "damaged.streaming_params"
    out.write_bytes(bytes(raw))
    return out


BIG = int(_bf16_bits(np.float32(1240.0)))  # a ~0.02 weight turned into 1240 (the example)


@pytest.mark.parametrize("bits,what", [(BIG, "above"), (0x7FC0, "non-finite"), (0x7F80, "non-finite")],
                         ids=["1240", "nan", "inf"])
def test_damaged_value_is_refused_with_key_and_index(tmp_path, bits, what):
    path = damaged_copy(tmp_path, (5, 7), bits)
    # the stream itself is intact: the reader returns the damaged value
    assert not np.isfinite(read_streaming_checkpoint(path)[KEY][5, 7]) or read_streaming_checkpoint(path)[KEY][5, 7] == 1240
    with pytest.raises(ValueError) as err:
        load_official_checkpoint(path, CONFIG)
    msg = str(err.value)
    assert KEY in msg and "(5, 7)" in msg and what in msg and "--value-check warn" in msg


def test_warn_mode_converts_and_says_so(tmp_path):
    path = damaged_copy(tmp_path, (0, 3), BIG)
    with pytest.warns(UserWarning, match="wq/kernel"):
        model = load_official_checkpoint(path, CONFIG, value_check="warn")
    # flax kernel [in, out] -> torch weight [out, in]
    assert model.model.h[1].seq_modeling_block.wq.weight[3, 0].item() == 1240.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_official_checkpoint(path, CONFIG, value_check="off")


def test_genuine_checkpoint_and_plausible_tails_pass():
    assert check_param_values(read_streaming_checkpoint(PARAMS_FILE)) == []
    rng = np.random.default_rng(0)
    heavy = rng.standard_t(df=2, size=(256, 256)).astype(np.float32) * 0.02  # heavy tails, max/median ~ 1e3
    zeros = np.zeros(64, np.float32)
    zeros[3] = 0.5  # a near-zero bias with one small trained entry
    assert check_param_values({"a": heavy, "b": zeros}) == []
    with pytest.raises(ValueError, match="value_check"):
        check_param_values({"a": heavy}, mode="loud")


def test_cli_reports_damage_in_one_line_with_exit_code_2(tmp_path):
    path = damaged_copy(tmp_path, (5, 7), BIG)
    res = subprocess.run([sys.executable, "-m", "official_port.convert_jax", str(path), "--config", str(CONFIG),
                          "--out", str(tmp_path / "hf")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and KEY in res.stderr
    assert res.stderr.splitlines()[0].startswith("convert_jax.py: error: the checkpoint holds damaged values")
    assert not (tmp_path / "hf").exists()  # nothing written
