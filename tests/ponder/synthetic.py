"""Test helpers for ponder: a real `PonderEnv` over a tiny random adaptive model and random cached 'backbone'
outputs, a tiny random GPT-2 saved to a folder, the fake environments' shared navigation."""

from __future__ import annotations

import torch

from ponder.adaptive import AdaptiveConfig, AdaptiveLM
from ponder.cache import CachedChunk, CachedDoc
from ponder.env import PonderEnv
from ponder.types import ChunkContext


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


def make_tiny_gpt2(folder):
    """A tiny random GPT-2 with GPT-2's real (offline) BPE tokenizer, saved to `folder`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from ttt_common.tokenizer import load_tokenizer

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=50256, eos_token_id=50256)
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    load_tokenizer("gpt2").save_pretrained(folder)
    return str(folder)


class ListEnv:
    """The PonderEnv navigation over `self.docs` = {doc id: [chunk, ...]} for the tests' fake
    environments; a subclass sets `docs` and gives `_features(chunks)` of the current chunk `self.c`."""

    def doc_ids(self):
        return list(self.docs)

    def _ctx(self):
        chunks = self.docs[self.doc]
        if self.c >= len(chunks):
            return None
        return ChunkContext(self.doc, self.c, len(chunks), self._features(chunks))

    def reset(self, doc_id):
        self.doc, self.c = doc_id, 0
        return self._ctx()
