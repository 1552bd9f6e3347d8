"""Training metrics: stdout lines and a tqdm progress bar on rank 0, a JSONL file, an end-of-run loss plot.

Like torchtitan's `torchtitan/components/metrics.py` (one `log(metrics, step)` feeding every backend,
tokens/s and peak memory measured by the logger), reduced to the backends this project needs. Only
rank 0 writes; the other ranks' loggers are inert, so callers need no `if rank == 0`.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from pathlib import Path

import torch

from ttt_common.files import atomic_write_text


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process in GiB: CUDA max allocated on a GPU, else the peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # Linux reports ru_maxrss in KiB, macOS in bytes
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All records of a JSONL file (a torn last line, from a crash mid-write, is skipped)."""
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


class TensorBoardBackend:
    """Scalars to `<out>/tensorboard/` (`tensorboard --logdir <out>/tensorboard`); needs `pip install tensorboard`."""

    def __init__(self, out: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ValueError("--log-backend tensorboard needs the tensorboard package: "
                             "pip install tensorboard (or the 'logging' extra)") from err
        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))

    def log(self, metrics: dict, step: int) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(_namespaced(key), value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbBackend:
    """Weights & Biases run (project `ttt`, run name = the out folder's name); needs `pip install wandb`."""

    def __init__(self, out: Path, config: dict | None = None):
        try:
            import wandb
        except ImportError as err:
            raise ValueError("--log-backend wandb needs the wandb package: pip install wandb") from err
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "ttt"), name=out.name, dir=str(out),
                              config=config or {}, resume="allow")

    def log(self, metrics: dict, step: int) -> None:
        self.run.log({_namespaced(k): v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        self.run.finish()


BACKENDS = {"tensorboard": TensorBoardBackend, "wandb": WandbBackend}


def _namespaced(key: str) -> str:
    """torchtitan-style groups: loss_metrics/..., eval/..., throughput/..., memory/..."""
    if key.startswith("eval_"):
        return f"eval/{key[5:]}"
    if key in ("loss", "grad_norm", "lr", "skipped_steps"):
        return f"loss_metrics/{key}"
    if key in ("tokens_per_s", "step_time_s", "tokens_seen"):
        return f"throughput/{key}"
    if key.startswith("peak_mem"):
        return f"memory/{key}"
    return key


class MetricsLogger:
    """Log per-step metrics to stdout, a progress bar and `<out>/metrics.jsonl` (rank 0 only).

    Args:
        out: run folder (created); None disables the file and the plot.
        total_steps: length of the progress bar.
        start_step: steps already done (a resumed run); records with a larger step are dropped
            from an existing metrics.jsonl so the file reads like one uninterrupted run.
        enabled: False on ranks other than 0.
        log_every: print a stdout line every this many steps (the JSONL gets every step).
        progress: show a tqdm bar (on stderr).
        backends: extra sinks by name (`BACKENDS`: "tensorboard", "wandb"), each fed the same
            `log(metrics, step)` as the JSONL; an uninstalled one is a ValueError naming the package.
        run_config: the run's options, given to backends that record them (W&B).
    """

    def __init__(self, out: str | os.PathLike | None, total_steps: int, start_step: int = 0,
                 enabled: bool = True, log_every: int = 1, progress: bool = True,
                 backends: list[str] | tuple[str, ...] = (), run_config: dict | None = None):
        self.enabled = enabled
        self.log_every = max(1, log_every)
        self.out = Path(out) if out is not None else None
        self.jsonl = None
        self._file = None
        self._bar = None
        self.backends = []
        unknown = [b for b in backends if b not in BACKENDS]
        if unknown:
            raise ValueError(f"unknown log backend(s) {unknown}; choose from {sorted(BACKENDS)}")
        if not enabled:
            return
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            self.jsonl = self.out / "metrics.jsonl"
            if self.jsonl.exists():
                keep = [r for r in read_jsonl(self.jsonl) if r.get("step", 0) <= start_step]
                atomic_write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in keep))
            self._file = open(self.jsonl, "a")
            for name in backends:
                self.backends.append(BACKENDS[name](self.out, run_config) if name == "wandb"
                                     else BACKENDS[name](self.out))
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                             file=sys.stderr, disable=None)

    def log(self, metrics: dict, step: int) -> None:
        """Record one step's metrics (floats, ints); `step` is the 1-based optimizer step."""
        if not self.enabled:
            return
        record = {"step": step, **{k: (float(v) if isinstance(v, float) else v) for k, v in metrics.items()}}
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        for backend in self.backends:
            backend.log(metrics, step)
        if self._bar is not None:
            self._bar.update(1)
            if "eval_loss" in metrics:
                self._last_eval = metrics["eval_loss"]
            post = {"loss": f"{metrics.get('loss', float('nan')):.4f}"}
            if getattr(self, "_last_eval", None) is not None:
                post["eval"] = f"{self._last_eval:.4f}"
                post["ppl"] = f"{math.exp(min(self._last_eval, 50.0)):.1f}"
            post["tok_s"] = f"{metrics.get('tokens_per_s', 0):.0f}"
            self._bar.set_postfix(**post)
        if step % self.log_every == 0 or "eval_loss" in metrics:
            parts = [f"step {step}"]
            for key, fmt in (("loss", ".4f"), ("grad_norm", ".3f"), ("lr", ".3e"), ("tokens_per_s", ".0f"),
                             ("peak_mem_gib", ".2f"), ("skipped_steps", "d"), ("eval_loss", ".4f"),
                             ("eval_ppl", ".2f")):
                if key in metrics:
                    parts.append(f"{key} {format(metrics[key], fmt)}")
            self.write(" | ".join(parts))

    def write(self, message: str) -> None:
        """Print a line on rank 0 without breaking the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=sys.stdout)
        else:
            print(message, flush=True)
        sys.stdout.flush()

    def close(self, plot: bool = True) -> Path | None:
        """Close the file and bar; write `<out>/loss.png` from the whole JSONL. Returns the PNG path."""
        if not self.enabled:
            return None
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._file is not None:
            self._file.close()
            self._file = None
        for backend in self.backends:
            backend.close()
        self.backends = []
        if plot and self.jsonl is not None and self.jsonl.exists():
            return plot_loss(self.jsonl, self.out / "loss.png")
        return None


def plot_loss(jsonl: str | os.PathLike, png: str | os.PathLike) -> Path | None:
    """Plot loss (and lr on a second axis) against step from a metrics JSONL; None when it has no loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_jsonl(jsonl) if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]
    if not records:
        return None
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in records], color="tab:blue", lw=1.2, label="train loss")
    evals = [r for r in records if isinstance(r.get("eval_loss"), (int, float)) and math.isfinite(r["eval_loss"])]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", color="tab:green", lw=1.5, ms=3,
                label="held-out loss")
        ax.legend(loc="upper right")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    if all("lr" in r for r in records):
        ax2 = ax.twinx()
        ax2.plot(steps, [r["lr"] for r in records], color="tab:orange", lw=0.8, alpha=0.5, ls="--", label="lr")
        ax2.set_ylabel("learning rate")
    ax.set_title(Path(jsonl).parent.name or "training")
    fig.tight_layout()
    png = Path(png)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
