"""Outer training of the adaptive layer's slow weights on cached backbone outputs.

Reproduces the outer loop of PonderTTT (deveworld/ponderTTT @ 350afb5,
`src/ponderttt/training/ttt_trainer.py`: the TTT layer trained with the LM loss on top of a frozen
backbone, AdamW) for the causal PyTorch composition of `ponder.adaptive`. Only the adaptive
model's parameters are trained (pre-norm, TTT layer, residual gain); the backbone and the tied head
are frozen. The inner loop runs UPDATE_k (k = `inner_steps`, 1 by default) on every chunk; the loss
is the LM loss, optionally plus `aux_recon_weight` x the layer's self-supervised reconstruction loss.

Data: the training documents' chunks as one stream, documents in a seeded order per epoch and
chunks in order within a document, the TTT state carried from chunk to chunk of a document and cut
from the graph between steps (truncated backprop through time). One chunk per optimizer step.

Checkpoints (`<run_dir>/ckpt.pt`, checksummed and written atomically by `ponder.storage`) hold the model,
the optimizer, the RNG states, the stream position and the carried state, so a resumed run is
identical to an uninterrupted one (tested).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ponder.adaptive import AdaptiveLM, detach_state
from ponder.cache import CachedDoc
from ponder.storage import clean_stale_tmp, load_checked, save_checked
from ttt_common.train_utils import NonFiniteGuard

CKPT_NAME = "ckpt.pt"


@dataclass
class TrainConfig:
    """Args:
        steps: optimizer steps (one chunk each).
        lr, weight_decay, betas: AdamW.
        grad_clip: max global gradient norm (0: off).
        inner_steps: k of the UPDATE_k rule used while training.
        aux_recon_weight: weight of the auxiliary reconstruction loss (0: LM loss only).
        seed: data order and init.
        save_every: checkpoint period in steps (the last step is always saved).
    """

    steps: int = 40
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    inner_steps: int = 1
    aux_recon_weight: float = 0.0
    seed: int = 0
    save_every: int = 10

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"steps={self.steps} must be >= 0")
        if self.inner_steps < 1:
            raise ValueError(f"inner_steps={self.inner_steps} must be >= 1 (training needs the TTT path)")
        if self.save_every < 1:
            raise ValueError(f"save_every={self.save_every} must be >= 1")
        self.betas = tuple(self.betas)


class ChunkStream:
    """The training chunks in order: epoch e visits documents in a permutation seeded by (seed, e)."""

    def __init__(self, docs: list[CachedDoc], seed: int):
        if not docs:
            raise ValueError("training needs at least one cached document")
        self.docs, self.seed = docs, seed
        self.epoch, self.pos = 0, 0
        self._build()

    def _build(self) -> None:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = torch.randperm(len(self.docs), generator=g).tolist()
        self.items = [(d, c) for d in order for c in range(len(self.docs[d].chunks))]

    def next(self) -> tuple[int, int]:
        if self.pos >= len(self.items):
            self.epoch, self.pos = self.epoch + 1, 0
            self._build()
        item = self.items[self.pos]
        self.pos += 1
        return item

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, sd: dict) -> None:
        self.epoch, self.pos = int(sd["epoch"]), int(sd["pos"])
        self._build()


def _save(path: Path, payload: dict) -> None:
    save_checked(payload, path)  # checksummed, atomic: a crash mid-write leaves the previous checkpoint intact


def load_checkpoint(run_dir: str | Path) -> dict | None:
    """The run's checkpoint, verified against its checksum (None when there is none).

    Raises:
        DamagedFileError (a ValueError): the file is truncated or altered; it is never loaded.
    """
    path = Path(run_dir) / CKPT_NAME
    return load_checked(path) if path.exists() else None


def train(model: AdaptiveLM, docs: list[CachedDoc], cfg: TrainConfig, run_dir: str | Path | None = None,
          resume: bool = True, stop_after: int | None = None, progress: bool = True,
          extra: dict | None = None) -> dict:
    """Train `model` in place.

    Args:
        model: the adaptive model (its slow weights are trained).
        docs: cached TRAINING documents.
        cfg: `TrainConfig`.
        run_dir: where `ckpt.pt` goes (None: no checkpoints).
        resume: continue from `run_dir/ckpt.pt` when present.
        stop_after: stop after this global step (simulates an interruption; the checkpoint of that
            step is written).
        progress: tqdm bar with the loss.
        extra: stored as is in the checkpoint (e.g. the identity of the training data).

    Returns:
        {"losses": per-step LM losses, "skip_losses": the backbone's loss on the same chunks,
        "step": steps done}.
    """
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas)
    stream = ChunkStream(docs, cfg.seed)
    step, losses, skip_losses, state, state_doc = 0, [], [], None, None
    ckpt_path = Path(run_dir) / CKPT_NAME if run_dir is not None else None
    if run_dir is not None:
        clean_stale_tmp(run_dir)  # half-written checkpoints of a killed run
    if resume and ckpt_path is not None and ckpt_path.exists():
        ck = load_checked(ckpt_path)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optim"])
        stream.load_state_dict(ck["stream"])
        torch.set_rng_state(ck["rng"]["torch"])
        random.setstate(ck["rng"]["python"])
        step, losses, skip_losses = ck["step"], list(ck["losses"]), list(ck["skip_losses"])
        state, state_doc = ck["carried_state"], ck["carried_doc"]

    def checkpoint():
        if ckpt_path is None:
            return
        _save(ckpt_path, {"model": model.state_dict(), "optim": opt.state_dict(), "stream": stream.state_dict(),
                          "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
                          "step": step, "losses": losses, "skip_losses": skip_losses,
                          "carried_state": state, "carried_doc": state_doc,
                          "train_config": asdict(cfg), "adaptive_config": model.config.to_dict(),
                          "extra": extra})

    model.train()
    nonfinite = NonFiniteGuard()
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = tqdm(total=cfg.steps, initial=step, desc="[train] adaptive layer", disable=not progress, mininterval=1.0)
    while step < end:
        d, c = stream.next()
        chunk = docs[d].chunks[c]
        if c == 0 or state_doc != d:
            state = None  # a new document starts from the slow weights
        adapted, recon, new_state = model.adapt(chunk.hidden[None], state, cfg.inner_steps)
        lm = model.lm_loss(adapted, chunk.input_ids[None])
        loss = lm
        if cfg.aux_recon_weight and recon.requires_grad:
            loss = loss + cfg.aux_recon_weight * recon.mean()
        # the trainers' one rule (ttt_common.train_utils.NonFiniteGuard): skip and count, stop after N in a row;
        # the carried state is dropped, since it may be what made the loss non-finite
        if not nonfinite.ok(step + 1, loss.detach(), where=f"doc {docs[d].doc_id}, chunk {c}"):
            state = None
            continue
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            if not nonfinite.ok(step + 1, loss.detach(), norm, where=f"doc {docs[d].doc_id}, chunk {c}"):
                opt.zero_grad(set_to_none=True)
                state = None
                continue
        opt.step()
        state, state_doc = detach_state(new_state), d
        step += 1
        losses.append(lm.item())
        skip_losses.append(chunk.skip_loss)
        n = min(10, len(losses))
        bar.set_postfix(loss=f"{sum(losses[-n:]) / n:.3f}", skip=f"{sum(skip_losses[-n:]) / n:.3f}")
        bar.update(1)
        if step % cfg.save_every == 0 or step == end:
            checkpoint()
    bar.close()
    model.eval()
    return {"losses": losses, "skip_losses": skip_losses, "step": step}
