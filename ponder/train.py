"""Outer training of the adaptive layer's slow weights on cached backbone outputs.

Reproduces the outer loop of PonderTTT (deveworld/ponderTTT @ 350afb5,
`src/ponderttt/training/ttt_trainer.py`: the TTT layer trained with the LM loss on top of a frozen
backbone, AdamW) for the causal PyTorch composition of `ponder.adaptive`. Only the adaptive
model's parameters are trained (pre-norm, TTT layer, residual gain); the backbone and the tied head
are frozen. The inner loop runs UPDATE_k (k = `inner_steps`, 1 by default) on every chunk; the loss
is the LM loss, optionally plus `aux_recon_weight` x the layer's self-supervised reconstruction loss.

Data: the training documents' chunks as one stream, documents in a seeded order per epoch and
chunks in order within a document, the TTT state carried from chunk to chunk of a document and cut
from the graph between chunks (truncated backprop through time). An optimizer step averages the
gradients of `batch_chunks` consecutive stream items; the stream interleaves `batch_chunks` lanes
(each a share of the epoch's documents), so one step sees chunks of `batch_chunks` different
documents rather than one document's consecutive chunks.

Validation (optional): every `eval_every` steps the LM loss of the training mode on held-out
VALIDATION documents (carved from the training files by the runner, never the test split) is
measured; the checkpoint with the lowest validation loss is kept and loaded at the end (selection),
and training stops after `patience` validations without improvement (early stopping). The curve
(train and validation loss per validation) is returned and written by `write_curves`.

Checkpoints (`<run_dir>/ckpt.pt`, checksummed and written atomically by `ponder.storage`) hold the model,
the optimizer, the RNG states, the stream position, the carried states, the best model so far and
the curve, so a resumed run is identical to an uninterrupted one (tested).
"""

from __future__ import annotations

import copy
import json
import math
import random
from dataclasses import asdict, dataclass, field
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
        steps: optimizer steps (`batch_chunks` chunks each).
        batch_chunks: chunks per optimizer step (their gradients are averaged).
        eval_every: validate every this many steps (0: never; needs validation documents).
        patience: stop after this many validations without a new best (0: never stop early).
        lr, weight_decay, betas: AdamW.
        grad_clip: max global gradient norm (0: off).
        inner_steps: k of the UPDATE_k rule used while training.
        aux_recon_weight: weight of the auxiliary reconstruction loss (0: LM loss only).
        seed: data order and init.
        save_every: checkpoint period in steps (the last step is always saved).
    """

    steps: int = 40
    batch_chunks: int = 1
    eval_every: int = 0
    patience: int = 0
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
        for name in ("batch_chunks", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("eval_every", "patience"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.save_every < 1:
            raise ValueError(f"save_every={self.save_every} must be >= 1")
        self.betas = tuple(self.betas)


class ChunkStream:
    """The training chunks in order: epoch e deals the documents, permuted with a seed of (seed, e),
    round-robin to `lanes` lanes and interleaves the lanes chunk by chunk (lane 0's first chunk, lane
    1's first chunk, ..., lane 0's second chunk, ...; exhausted lanes drop out). Within a document the
    chunks stay in order, so its carried state is always that of its previous chunk. `lanes=1`: the
    documents one after another."""

    def __init__(self, docs: list[CachedDoc], seed: int, lanes: int = 1):
        if not docs:
            raise ValueError("training needs at least one cached document")
        self.docs, self.seed, self.lanes = docs, seed, lanes
        self.epoch, self.pos = 0, 0
        self._build()

    def _build(self) -> None:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = torch.randperm(len(self.docs), generator=g).tolist()
        lanes = [[(d, c) for d in order[i::self.lanes] for c in range(len(self.docs[d].chunks))]
                 for i in range(self.lanes)]
        self.items = [lane[j] for j in range(max(map(len, lanes))) for lane in lanes if j < len(lane)]

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


@torch.no_grad()
def validation_loss(model: AdaptiveLM, docs: list[CachedDoc], inner_steps: int) -> tuple[float, float]:
    """Token-weighted LM loss of UPDATE_`inner_steps` over `docs` (each document from the slow weights,
    its state carried chunk to chunk, as at evaluation) and the backbone's (SKIP) loss on the same tokens.

    Returns:
        (adaptive loss, SKIP loss) in nats per scored token.
    """
    was_training = model.training
    model.eval()
    total = skip = 0.0
    n_tok = 0
    for doc in docs:
        state = None
        for chunk in doc.chunks:
            adapted, _, state = model.adapt(chunk.hidden[None], state, inner_steps)
            n = chunk.n_scored
            total += float(model.lm_loss(adapted, chunk.input_ids[None])) * n
            skip += chunk.skip_loss * n
            n_tok += n
    model.train(was_training)
    return total / n_tok, skip / n_tok


def _save(path: Path, payload: dict) -> None:
    save_checked(payload, path)  # checksummed, atomic: a crash mid-write leaves the previous checkpoint intact


def load_checkpoint(run_dir: str | Path) -> dict | None:
    """The run's checkpoint, verified against its checksum (None when there is none).

    Raises:
        DamagedFileError (a ValueError): the file is truncated or altered; it is never loaded.
    """
    path = Path(run_dir) / CKPT_NAME
    return load_checked(path) if path.exists() else None


@dataclass
class _Progress:
    """What a run has done so far: everything `train` returns and the checkpoint carries besides the
    model, optimizer, stream and RNG states."""

    step: int = 0
    losses: list = field(default_factory=list)
    skip_losses: list = field(default_factory=list)
    states: dict = field(default_factory=dict)  # doc index -> its carried TTT state (detached)
    curve: list = field(default_factory=list)
    best: dict | None = None  # {"step", "val_loss", "model"} of the best validation so far
    bad: int = 0  # validations since the best one
    stopped: bool = False


def _resume(ckpt_path: Path, model: AdaptiveLM, opt, stream: ChunkStream) -> _Progress:
    """Load the checkpoint at `ckpt_path` into model, optimizer, stream and RNGs; return its progress."""
    ck = load_checked(ckpt_path)
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optim"])
    stream.load_state_dict(ck["stream"])
    torch.set_rng_state(ck["rng"]["torch"])
    random.setstate(ck["rng"]["python"])
    return _Progress(step=ck["step"], losses=list(ck["losses"]), skip_losses=list(ck["skip_losses"]),
                     states=dict(ck["carried_states"]), curve=list(ck["curve"]), best=ck["best"],
                     bad=ck["bad_evals"], stopped=ck["stopped_early"])


def _checkpoint(ckpt_path: Path, model: AdaptiveLM, opt, stream: ChunkStream, prog: _Progress,
                cfg: TrainConfig, extra: dict | None) -> None:
    _save(ckpt_path, {"model": model.state_dict(), "optim": opt.state_dict(), "stream": stream.state_dict(),
                      "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
                      "step": prog.step, "losses": prog.losses, "skip_losses": prog.skip_losses,
                      "carried_states": prog.states, "curve": prog.curve, "best": prog.best,
                      "bad_evals": prog.bad, "stopped_early": prog.stopped,
                      "train_config": asdict(cfg), "adaptive_config": model.config.to_dict(),
                      "extra": extra})


def _accumulate_batch(model: AdaptiveLM, docs: list[CachedDoc], stream: ChunkStream, states: dict,
                      cfg: TrainConfig) -> tuple[list[float], list[float], float, str]:
    """Forward and backward `cfg.batch_chunks` stream items, gradients scaled to their mean; carries
    each document's state in `states`.

    Returns:
        (LM losses, SKIP losses, non-finite loss or 0.0, where it happened or ""); on a non-finite
        loss the batch stops there and that document's state is dropped.
    """
    step_lm, step_skip = [], []
    for _ in range(cfg.batch_chunks):
        d, c = stream.next()
        chunk = docs[d].chunks[c]
        state = states.pop(d, None) if c > 0 else None  # a new document starts from the slow weights
        adapted, recon, new_state = model.adapt(chunk.hidden[None], state, cfg.inner_steps)
        lm = model.lm_loss(adapted, chunk.input_ids[None])
        loss = lm
        if cfg.aux_recon_weight and recon.requires_grad:
            loss = loss + cfg.aux_recon_weight * recon.mean()
        if not math.isfinite(loss.item()):
            return step_lm, step_skip, float(loss), f"doc {docs[d].doc_id}, chunk {c}"
        (loss / cfg.batch_chunks).backward()
        if c + 1 < len(docs[d].chunks):
            states[d] = detach_state(new_state)
        step_lm.append(lm.item())
        step_skip.append(chunk.skip_loss)
    return step_lm, step_skip, 0.0, ""


def _validate(model: AdaptiveLM, val_docs: list[CachedDoc], prog: _Progress, cfg: TrainConfig) -> None:
    """Measure the validation loss, append it to the curve, keep the best model, count patience."""
    val, val_skip = validation_loss(model, val_docs, cfg.inner_steps)
    since = len(prog.losses) - (prog.curve[-1]["step"] if prog.curve else 0)
    prog.curve.append({"step": prog.step, "chunks_seen": prog.step * cfg.batch_chunks,
                       "train_loss": sum(prog.losses[-since:]) / since,
                       "train_skip_loss": sum(prog.skip_losses[-since:]) / since,
                       "val_loss": val, "val_skip_loss": val_skip})
    if prog.best is None or val < prog.best["val_loss"]:
        prog.best = {"step": prog.step, "val_loss": val, "model": copy.deepcopy(model.state_dict())}
        prog.bad = 0
    else:
        prog.bad += 1
        prog.stopped = bool(cfg.patience) and prog.bad >= cfg.patience


def train(model: AdaptiveLM, docs: list[CachedDoc], cfg: TrainConfig, run_dir: str | Path | None = None,
          resume: bool = True, stop_after: int | None = None, progress: bool = True,
          extra: dict | None = None, val_docs: list[CachedDoc] | None = None) -> dict:
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
        val_docs: cached VALIDATION documents (held out from `docs`, never the test split); used when
            `cfg.eval_every` > 0.

    Returns:
        {"losses": per-step LM losses (mean over the step's chunks), "skip_losses": the backbone's
        loss on the same chunks, "step": steps done, "curve": one dict per validation (step,
        train_loss and train_skip_loss since the previous one, val_loss, val_skip_loss), "best_step"
        and "best_val_loss" (None without validation), "stopped_early"}. With validation the model
        ends with the weights of the best validation (the selected checkpoint).
    """
    from tqdm.auto import tqdm

    validate = bool(cfg.eval_every and val_docs)
    if cfg.eval_every and not val_docs:
        raise ValueError(f"eval_every={cfg.eval_every} needs validation documents (val_docs is empty)")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas)
    stream = ChunkStream(docs, cfg.seed, lanes=cfg.batch_chunks)
    prog = _Progress()
    ckpt_path = Path(run_dir) / CKPT_NAME if run_dir is not None else None
    if run_dir is not None:
        clean_stale_tmp(run_dir)  # half-written checkpoints of a killed run
    if resume and ckpt_path is not None and ckpt_path.exists():
        prog = _resume(ckpt_path, model, opt, stream)

    model.train()
    nonfinite = NonFiniteGuard()
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = tqdm(total=cfg.steps, initial=prog.step, desc="[train] adaptive layer", disable=not progress,
               mininterval=1.0)
    while prog.step < end and not prog.stopped:
        opt.zero_grad(set_to_none=True)
        step_lm, step_skip, bad_loss, where = _accumulate_batch(model, docs, stream, prog.states, cfg)
        # the trainers' one rule (ttt_common.train_utils.NonFiniteGuard): skip and count, stop after N in a row
        if not nonfinite.ok(prog.step + 1, bad_loss, where=where):
            opt.zero_grad(set_to_none=True)
            continue
        if cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            if not nonfinite.ok(prog.step + 1, 0.0, norm, where=f"step {prog.step + 1}'s batch"):
                opt.zero_grad(set_to_none=True)
                continue
        opt.step()
        prog.step += 1
        prog.losses.append(sum(step_lm) / len(step_lm))
        prog.skip_losses.append(sum(step_skip) / len(step_skip))
        n = min(10, len(prog.losses))
        post = {"loss": f"{sum(prog.losses[-n:]) / n:.3f}", "skip": f"{sum(prog.skip_losses[-n:]) / n:.3f}"}
        if validate and (prog.step % cfg.eval_every == 0 or prog.step == cfg.steps):
            _validate(model, val_docs, prog, cfg)
        if validate and prog.best is not None:
            post["val"] = f"{prog.curve[-1]['val_loss']:.3f}"
        bar.set_postfix(post)
        bar.update(1)
        if ckpt_path is not None and (prog.step % cfg.save_every == 0 or prog.step == end or prog.stopped):
            _checkpoint(ckpt_path, model, opt, stream, prog, cfg, extra)
    bar.close()
    return _finish(model, prog, cfg, progress)


def _finish(model: AdaptiveLM, prog: _Progress, cfg: TrainConfig, progress: bool) -> dict:
    """Load the selected (best validation) weights once training is over; `train`'s return value."""
    best = prog.best
    if prog.stopped and progress:
        print(f"[train] early stop at step {prog.step}: {cfg.patience} validations without improvement "
              f"(best step {best['step']}, validation loss {best['val_loss']:.4f})", flush=True)
    if best is not None and (prog.step >= cfg.steps or prog.stopped):
        model.load_state_dict(best["model"])  # the selected checkpoint
    model.eval()
    return {"losses": prog.losses, "skip_losses": prog.skip_losses, "step": prog.step, "curve": prog.curve,
            "best_step": best["step"] if best else None, "best_val_loss": best["val_loss"] if best else None,
            "stopped_early": prog.stopped}


def write_curves(run_dir: str | Path, curve: list[dict], title: str = "") -> list[Path]:
    """`curves.jsonl` (one validation per line) and `curves.png` (train / validation / backbone loss vs
    chunks seen) in `run_dir`; the png only when matplotlib is installed. Returns the files written."""
    run_dir = Path(run_dir)
    path = run_dir / "curves.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in curve))
    written = [path]
    if not curve:
        return written
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    x = [r["chunks_seen"] for r in curve]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, [r["train_loss"] for r in curve], "o-", label="train (adaptive, since last validation)")
    ax.plot(x, [r["val_loss"] for r in curve], "s-", label="validation (adaptive)")
    ax.plot(x, [r["val_skip_loss"] for r in curve], "--", color="gray", label="validation, backbone (SKIP)")
    best = min(curve, key=lambda r: r["val_loss"])
    ax.axvline(best["chunks_seen"], color="k", lw=0.6, ls=":", label=f"selected (step {best['step']})")
    ax.set_xlabel("training chunks seen")
    ax.set_ylabel("LM loss (nats / token)")
    ax.set_title(title or "adaptive layer: train / validation")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(run_dir / "curves.png", dpi=110)
    plt.close(fig)
    return [*written, run_dir / "curves.png"]
