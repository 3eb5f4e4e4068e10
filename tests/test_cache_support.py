"""Shared pieces for the teacher-cache tests (no tests here): block datasets, tiny teachers, KL references."""

from __future__ import annotations

import torch

from distillery.targets import TeacherTargets


class BlockDataset:
    """``n`` random blocks of ``seq_len`` tokens with shifted labels; some rows have masked prompts."""

    def __init__(self, n: int, seq_len: int = 16, vocab: int = 512, seed: int = 0, index_offset: int = 0):
        g = torch.Generator().manual_seed(seed)
        toks = torch.randint(4, vocab, (n, seq_len + 1), generator=g)
        self.input_ids = toks[:, :-1].clone()
        self.labels = toks[:, 1:].clone()
        for i in range(n):  # blocks i % 3 == 1 get a masked "prompt" of i % 5 positions, the last block ends early
            if i % 3 == 1:
                self.labels[i, : i % 5 + 1] = -100
        self.labels[n - 1, -3:] = -100
        self.index_offset = index_offset

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i],
                "attention_mask": torch.ones_like(self.input_ids[i]), "index": torch.tensor(i + self.index_offset)}


def collate(ds, indices) -> dict:
    items = [ds[int(i)] for i in indices]
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


class TinyTeacher(torch.nn.Module):
    """A deterministic torch-only causal 'teacher' (embedding + running mean + head): cheap to import and run."""

    def __init__(self, vocab: int = 512, dim: int = 32, seed: int = 0, scale: float = 4.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.nn.Parameter(torch.randn(vocab, dim, generator=g))
        self.head = torch.nn.Parameter(torch.randn(vocab, dim, generator=g) * scale / dim ** 0.5)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.emb[input_ids]  # (B, T, D)
        h = h.cumsum(1) / torch.arange(1, h.shape[1] + 1)[None, :, None]
        return h @ self.head.T  # (B, T, V)


def forward_kl_dense(student_logits, teacher_logits, loss_temperature: float = 1.0) -> torch.Tensor:
    """KL(p_T || q_S) per position ``(B, T)`` at ``loss_temperature`` (reference, full vocabulary)."""
    p_lp = torch.log_softmax(teacher_logits.float() / loss_temperature, -1)
    q_lp = torch.log_softmax(student_logits.float() / loss_temperature, -1)
    return (p_lp.exp() * (p_lp - q_lp)).sum(-1)


def forward_kl_sparse(student_logits, t: TeacherTargets) -> torch.Tensor:
    """Top-k + one tail bucket: ``sum_k p_k (lp_k - log q_k) + p_tail (tail - log q_tail)`` per position.

    Inline until ``distillery.losses`` lands; ``q_tail = 1 - sum_k q_k``.
    """
    q_lp = torch.log_softmax(student_logits.float() / t.loss_temperature, -1)
    q_k = q_lp.gather(-1, t.topk_ids)  # (B, T, K)
    q_tail = torch.log1p(-q_k.exp().sum(-1).clamp(max=1 - 1e-6))  # (B, T)
    p_tail = t.tail_logprob.exp()
    head = (t.topk_logprobs.exp() * (t.topk_logprobs - q_k)).sum(-1)
    return head + torch.where(p_tail > 0, p_tail * (t.tail_logprob - q_tail), torch.zeros_like(p_tail))
