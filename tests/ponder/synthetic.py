"""A real `PonderEnv` over a tiny random adaptive model and random cached 'backbone' outputs (tests only)."""

from __future__ import annotations

import torch

from ponder.adaptive import AdaptiveConfig, AdaptiveLM
from ponder.cache import CachedChunk, CachedDoc
from ponder.env import PonderEnv


def synthetic_env(n_docs: int = 2, seed: int = 0, doc_prefix: str = "d") -> PonderEnv:
    """`n_docs` documents of 3 chunks of 9 tokens (vocab 30, hidden 8), ids `<doc_prefix><i>`."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(30, 8, generator=g)
    docs = []
    for d in range(n_docs):
        chunks = []
        for _ in range(3):
            ids = torch.randint(0, 30, (9,), generator=g)
            hid = torch.randn(9, 8, generator=g)
            logp = torch.log_softmax(hid @ emb.T, -1)
            chunks.append(CachedChunk(ids, hid, logp[:-1].gather(-1, ids[1:, None])[:, 0],
                                      -(logp.exp() * logp).sum(-1), logp.exp().max(-1).values, 0.01))
        docs.append(CachedDoc(f"{doc_prefix}{d}", chunks))
    torch.manual_seed(0)
    model = AdaptiveLM(AdaptiveConfig(hidden_size=8, num_heads=2, mini_batch_size=4), emb)
    return PonderEnv(model, docs)
