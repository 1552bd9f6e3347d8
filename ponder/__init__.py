"""PonderTTT in PyTorch: a frozen causal LM plus one adaptive TTT layer, and per-chunk decisions
(SKIP / UPDATE_1 / UPDATE_2 / UPDATE_4) of how much test-time training to spend.

Reproduces deveworld/ponderTTT (commit 350afb5 for the design and its own TTT layer; its later
paper "When to Ponder" for the composition and the reconstruction gating), made strictly causal.

Modules: `types` (actions, cost model, records), `backbone` (frozen HF LM, offline fallback),
`cache` (backbone outputs on disk), `simple_layer` (PonderTTT's own layer), `adaptive`
(pre-norm -> TTT layer -> residual -> tied head), `env` (chunk-by-chunk evaluation), `train`
(outer loop), `gates` (package: which chunks to update; `build_gate` registry; the learned gate in `gates.ppo`),
`rl` (its PPO pieces), `runner` / `report` (the experiment).
Submodules are imported on use; importing `ponder` itself is cheap.
"""

from ponder.types import ACTIONS, INNER_STEPS, ChunkContext, ChunkRecord, flops_multiplier

__all__ = ["ACTIONS", "INNER_STEPS", "ChunkContext", "ChunkRecord", "flops_multiplier"]
