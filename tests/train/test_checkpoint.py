"""`ttt_common.checkpoint.Checkpointer`: atomic DCP save/load, and every way a checkpoint can be bad.

One process, no process group (DCP's non-distributed mode), a two-layer MLP with AdamW state: the
same code path the training script uses, minus the sharding (covered in test_train.py).
"""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from torch import nn

from ttt_common.checkpoint import LATEST, Checkpointer, CheckpointError, model_fingerprint


def _model_and_optimizer(seed: int, hidden: int = 8):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = model(torch.randn(5, 4)).square().mean()
    loss.backward()
    opt.step()  # creates exp_avg / exp_avg_sq, so the optimizer state is non-trivial
    opt.zero_grad()
    return model, opt


def _save(ckpt: Checkpointer, step: int, seed: int = 0):
    model, opt = _model_and_optimizer(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns that it runs without a process group
        ckpt.save(step, model, opt, {"step": step, "note": "x"}, model_fingerprint(model, {"hidden": 8}))
    return model, opt


def _load(ckpt: Checkpointer, seed: int = 1, hidden: int = 8, step=None):
    model, opt = _model_and_optimizer(seed, hidden)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got_step, state = ckpt.load(model, opt, step=step, fingerprint=model_fingerprint(model, {"hidden": hidden}))
    return got_step, state, model, opt


def test_roundtrip_restores_model_optimizer_and_train_state(tmp_path):
    ckpt = Checkpointer(tmp_path / "ck")
    saved_model, saved_opt = _save(ckpt, 3, seed=0)
    assert (tmp_path / "ck" / LATEST).read_text().strip() == "step-00000003"
    step, state, model, opt = _load(ckpt, seed=1)  # different weights before loading
    assert step == 3 and state == {"step": 3, "note": "x"}
    for a, b in zip(saved_model.parameters(), model.parameters()):
        assert torch.equal(a, b)
    sa, sb = saved_opt.state_dict()["state"], opt.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(torch.as_tensor(sa[k][name]), torch.as_tensor(sb[k][name])), (k, name)


def test_tmp_folder_from_a_crash_is_never_loaded_and_is_cleaned(tmp_path):
    ckpt = Checkpointer(tmp_path / "ck")
    _save(ckpt, 2, seed=0)
    # a save of step 4 that died half-way: tmp folder with a truncated shard, no meta.json, latest untouched
    tmp = tmp_path / "ck" / "step-00000004.tmp"
    shutil.copytree(tmp_path / "ck" / "step-00000002", tmp)
    (tmp / "meta.json").unlink()
    shard = next(tmp.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:10])
    assert ckpt.latest_step() == 2
    assert ckpt.complete_steps() == [2]
    (tmp_path / "ck" / LATEST).unlink()  # even without the pointer, the tmp folder is not a candidate
    assert ckpt.latest_step() == 2
    step, _, _, _ = _load(ckpt)
    assert step == 2
    _save(ckpt, 4, seed=5)  # the next save of that step replaces the debris
    assert not tmp.exists() and ckpt.latest_step() == 4


def test_truncated_shard_is_reported_not_loaded(tmp_path):
    ckpt = Checkpointer(tmp_path / "ck")
    _save(ckpt, 1)
    shard = next((tmp_path / "ck" / "step-00000001").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match=rf"corrupted: file {shard.name} has \d+ bytes"):
        _load(ckpt)


def test_altered_bytes_same_size_are_reported(tmp_path):
    ckpt = Checkpointer(tmp_path / "ck")
    _save(ckpt, 1)
    shard = next((tmp_path / "ck" / "step-00000001").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside a tensor would otherwise load silently
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="CRC32 mismatch"):
        _load(ckpt)


def test_checkpoint_of_another_model_size_names_the_difference(tmp_path):
    ckpt = Checkpointer(tmp_path / "ck")
    _save(ckpt, 1)
    with pytest.raises(CheckpointError, match=r"another model: .*hidden: checkpoint 8 vs current 16"):
        _load(ckpt, hidden=16)


def test_bad_latest_pointer_and_missing_checkpoint(tmp_path):
    ckpt = Checkpointer(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        _load(ckpt)
    _save(ckpt, 1)
    (tmp_path / "ck" / LATEST).write_text("step-00000009\n")
    with pytest.raises(CheckpointError, match="names step-00000009 but .* missing or incomplete"):
        ckpt.latest_step()
    (tmp_path / "ck" / LATEST).write_text("garbage")
    with pytest.raises(CheckpointError, match="not a 'step-N' folder name"):
        ckpt.latest_step()
    (tmp_path / "ck" / "step-00000001" / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        _load(ckpt, step=1)


def test_keep_prunes_oldest_and_meta_records_files(tmp_path):
    ckpt = Checkpointer(tmp_path / "ck", keep=2)
    for step in (1, 2, 3):
        _save(ckpt, step, seed=step)
    assert ckpt.complete_steps() == [2, 3]
    meta = json.loads((tmp_path / "ck" / "step-00000003" / "meta.json").read_text())
    assert meta["step"] == 3 and meta["world_size"] == 1
    assert set(meta["files"]) == set(meta["crc32"]) and ".metadata" in meta["files"]
    assert any(name.endswith(".distcp") for name in meta["files"])


def test_clean_stale_removes_tmp_and_old_and_restores_an_interrupted_replace(tmp_path):
    ckpt = Checkpointer(tmp_path / "ck")
    _save(ckpt, 1)
    _save(ckpt, 2)
    # a crash mid-save of step 3 (.tmp), a leftover .old of step 1, and a crash between the two renames that
    # replace step 2 (step-2 moved to .old, the new one not yet in place)
    shutil.copytree(ckpt.step_dir(1), tmp_path / "ck" / "step-00000003.tmp")
    shutil.copytree(ckpt.step_dir(1), tmp_path / "ck" / "step-00000001.old")
    (tmp_path / "ck" / "step-00000002").rename(tmp_path / "ck" / "step-00000002.old")
    done = ckpt.clean_stale()
    assert done == ["removed leftover step-00000001.old", "restored step-00000002 from step-00000002.old",
                    "removed incomplete step-00000003.tmp"]
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [LATEST, "step-00000001", "step-00000002"]
    assert _load(ckpt)[0] == 2
    assert ckpt.clean_stale() == []
