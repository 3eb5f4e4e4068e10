"""The fast decode step of ``distillery.generate.sample`` for Llama-shaped students (Llama, Qwen2, Qwen3, Mistral).

``StaticDecoder`` keeps keys and values in buffers allocated once, ``(b, kv_heads, P + N, head_dim)`` per
layer, written in place one column per step, and runs a step as a short straight line of the model's own
maths (its norms, RoPE, activation, q/k norms; its weights), with nothing of the generic forward around it
(4-D mask building, cache concatenation, several wrappers per token).

Where did the time of a CPU decode step go (demo student: 8 layers, d = 384, vocabulary 49,152, batch 8,
one thread, measured on the Zen 4 EPYC here)? ~85% in ``aten::mm``, and most of that in the LM head: the
``(8, 384) @ (384, 49,152)`` product took 14-18 ms, ~20 GFLOP/s, while one read of the 75 MB weight takes
3.5 ms. A GEMM with 8 rows re-packs the big operand at every call. ``PackedLinear`` packs each weight once
per ``sample`` call into oneDNN's blocked layout (``torch.ops.mkldnn._reorder_linear_weight``, the op
inductor's CPU freezing pass uses) and runs ``torch.ops.mkldnn._linear_pointwise`` on it: the head fell to
~6.9 ms and the layers' 7 projections from ~525 to ~385 µs per layer. Packing is per call because the
student trains between calls (the head's pack takes ~47 ms, a few steps' saving); a model in eval mode
(inference: answers, evaluation, benchmarks) keeps its packs between calls while its weights are unchanged
(``reuse``: same tensors, same in-place version counters), so repeated calls pack once. q/k/v are packed as one
weight and gate/up as one, so a layer runs four GEMMs. The results equal ``F.linear`` up to float rounding
order (max abs difference ~1e-6 on logits of size ~1).

``torch.compile`` does not pay here: the same step with static shapes (attention over the whole buffer,
masked) compiled in 57 s and then ran no faster than eager (40.7 vs 38.6 ms CPU time, unpacked weights,
loaded machine): the step is GEMM-bound and inductor calls the same GEMMs. Its weight prepacking comes with
``freezing``, which bakes the weights in as constants: wrong once the student trains (a recompile per step).

Under a bf16 autocast (training in bf16) only the prefill and the LM head run in bf16: the layers of a
decode step run in the weights' dtype. Their matmuls have ``b`` rows and their attention one query, where
the cast costs more than bf16 saves: on the Zen 4 EPYC with AVX512-BF16, bf16 SDPA for one query took 6x
and an 8x192 @ 192x512 matmul 1.6x the fp32 time, while the 8x256 @ 256x49,152 head ran 2.5x faster.
"""

from __future__ import annotations

import sys
import weakref

import torch
import torch.nn.functional as F

from .packed_linear import PackedLinear


class PackCache(dict):
    """Packed weights kept on a model between ``sample`` calls (``reuse``). Copies and pickles of the model get
    an empty one: packs are derived data, rebuilt on the next call."""

    def __deepcopy__(self, memo):
        return PackCache()

    def __reduce__(self):
        return (PackCache, ())


def reuse(packs: dict | None, name: str, sources: list, rows: int, build):
    """``build()``, or the value built for ``name`` by an earlier ``sample`` call when every tensor in
    ``sources`` is the same object, unchanged since (same storage, same in-place version counter) and the
    batch hint ``rows`` is the same. ``packs is None``: always build (a training student: its weights change
    between calls, and keeping last step's packs alive would only add memory)."""
    if packs is None:
        return build()
    key = (rows,) + tuple((t.data_ptr(), t._version, t.dtype, tuple(t.shape)) for t in sources if t is not None)
    hit = packs.get(name)
    if hit is not None and hit[0] == key and all(r() is t for r, t in zip(hit[1], sources)):
        return hit[2]
    value = build()
    packs[name] = (key, [weakref.ref(t) if t is not None else (lambda: None) for t in sources], value)
    return value


def _cat_linear(mods, rows: int, packs: dict | None = None, name: str = "") -> PackedLinear:
    """One ``PackedLinear`` for several ``nn.Linear`` on the same input: their outputs side by side."""
    sources = [t for m in mods for t in (m.weight, m.bias)]
    return reuse(packs, name, sources, rows, lambda: _build_cat_linear(mods, rows))


def _build_cat_linear(mods, rows: int) -> PackedLinear:
    weight = torch.cat([m.weight for m in mods], dim=0)
    if all(m.bias is None for m in mods):
        bias = None
    else:
        bias = torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in mods])
    return PackedLinear(weight, bias, rows)


class StaticDecoder:
    """Decode steps of a Llama-shaped model against preallocated key/value buffers.

    One step for ``b`` rows, per layer (``h`` the residual stream ``(b, H)``, ``L`` the cached length)::

        q | k | v = qkv(norm1(h));  q, k = rope(q), rope(k)                       # (b, heads, 1, d)
        K[:, :, L], V[:, :, L] = k, v                                             # in place
        h = h + o_proj(softmax(q K[:, :, :L+1]ᵀ · scaling + mask) V[:, :, :L+1])  # SDPA, GQA
        g | u = gate_up(norm2(h));  h = h + down(act(g) * u)

    then ``logits = lm_head(norm(h))`` (``logits(h)``). The mask hides the prompts' left padding. Norms,
    RoPE, activation and q/k norms (Qwen3) are the model's own modules; the projections are its weights,
    packed (``PackedLinear``).
    """

    def __init__(self, model, cache, mask: torch.Tensor, vocab_size: int | None, screen_head: bool = False,
                 packs: dict | None = None):
        base = model.model
        self.model, self.base, self.vocab_size = model, base, vocab_size
        self.layers = list(base.layers[:model.config.num_hidden_layers])
        module = sys.modules[type(model).__module__]
        self.rope = module.apply_rotary_pos_emb
        self.rotate_half = getattr(module, "rotate_half", None)  # q and k in one rotation (_layers)
        self.length = cache.get_seq_length()
        B, total = mask.shape
        self.keys, self.values = [], []
        dtype = self.layers[0].self_attn.o_proj.weight.dtype  # the decode layers' dtype (see the module docstring)
        for layer in cache.layers[:len(self.layers)]:  # copy the prefill's (b, kv_heads, P, d) into (b, kv_heads, P + N, d)
            k = layer.keys.new_empty(B, layer.keys.shape[1], total, layer.keys.shape[3], dtype=dtype)
            v = layer.values.new_empty(B, layer.values.shape[1], total, layer.values.shape[3], dtype=dtype)
            k[:, :, :self.length] = layer.keys
            v[:, :, :self.length] = layer.values
            self.keys.append(k)
            self.values.append(v)
        self.mask = mask.bool()[:, None, None, :]  # (b, 1, 1, P + N): True = attend
        a = self.layers[0].self_attn
        self.head_dim, self.scaling = a.head_dim, a.scaling
        cfg = model.config
        self.n_q = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_q
        self.gqa = self.n_q != self.n_kv
        self.qkv = [_cat_linear([l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj], B, packs, f"qkv{i}")
                    for i, l in enumerate(self.layers)]
        self.o = [_cat_linear([l.self_attn.o_proj], B, packs, f"o{i}") for i, l in enumerate(self.layers)]
        self.gate_up = [_cat_linear([l.mlp.gate_proj, l.mlp.up_proj], B, packs, f"gate_up{i}") if self._plain_mlp(l)
                        else None for i, l in enumerate(self.layers)]
        self.down = [_cat_linear([l.mlp.down_proj], B, packs, f"down{i}") if self._plain_mlp(l) else None
                     for i, l in enumerate(self.layers)]
        head = model.lm_head
        rows = head.weight if not vocab_size else head.weight[:vocab_size]
        bias = None if head.bias is None else (head.bias if not vocab_size else head.bias[:vocab_size])
        autocast_bf16 = torch.is_autocast_enabled(mask.device.type) and \
            torch.get_autocast_dtype(mask.device.type) == torch.bfloat16
        self.screen, self.head = None, None
        self._head_args = (rows, bias, B, torch.bfloat16 if autocast_bf16 else None)  # autocast: the head in bf16
        if screen_head and not autocast_bf16 and rows.dtype == torch.float32:
            from .screened_head import ScreenedHead

            self.screen = reuse(packs, f"screen{vocab_size}", [head.weight, head.bias], B,  # exact fp32 choice
                                lambda: ScreenedHead(rows, bias, B))                     # through a bf16 screen
        else:
            self.head = reuse(packs, f"head{vocab_size}{self._head_args[3]}", [head.weight, head.bias], B,
                              lambda: PackedLinear(*self._head_args))
        self.head_rows: list[int] = []  # rows the head ran on, per call (tests: no work on finished rows)

    @staticmethod
    def _plain_mlp(layer) -> bool:
        mlp = layer.mlp
        return all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn"))

    def keep(self, rows: torch.Tensor) -> None:
        """Drop every batch row not in ``rows``: later steps run on the kept rows only."""
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]
        self.mask = self.mask[rows]

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        """``normed (b, H)``, the final norm's output → logits ``(b, V)`` (``V = vocab_size`` when given)."""
        self.head_rows.append(normed.shape[0])
        if self.head is None:  # screened, yet a call needs full logits (top_p < 1): pack the plain head now
            self.head = PackedLinear(*self._head_args)
        return self.head(normed.to(self.head.weight.dtype))

    def choose(self, normed: torch.Tensor, sample_temperature: float, top_p: float,
               generator: torch.Generator | None) -> torch.Tensor:
        """``normed (b, H)`` → next tokens ``(b,)``: through the bf16 screen where it is on and ``top_p == 1``,
        else ``next_tokens`` on the full logits."""
        if self.screen is not None and top_p >= 1.0:
            self.head_rows.append(normed.shape[0])
            return self.screen.choose(normed.float(), sample_temperature, generator)
        from .next_token import next_tokens

        return next_tokens(self.logits(normed), sample_temperature, top_p, generator)

    def step(self, tok: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """``tok (b,)`` at ``position (b, 1)`` → the final norm's output ``(b, H)`` (``choose`` picks the next tokens)."""
        L = self.length
        with torch.autocast(tok.device.type, enabled=False):     # the layers: in the weights' dtype (see above)
            h = self._layers(tok, position, L, tok.shape[0])
            self.length = L + 1
            return self.base.norm(h)                              # (b, H)

    def _layers(self, tok: torch.Tensor, position: torch.Tensor, L: int, b: int) -> torch.Tensor:
        h = self.base.embed_tokens(tok)                           # (b, H)
        cos, sin = self.base.rotary_emb(h, position_ids=position)  # (b, 1, d)
        cos4, sin4 = cos[:, None], sin[:, None]                   # (b, 1, 1, d): one rotation for all heads
        # the mask as SDPA's additive float mask, once per step (a bool mask is converted in every layer's call)
        mask = torch.zeros(self.mask.shape[:-1] + (L + 1,), dtype=h.dtype, device=h.device).masked_fill_(
            ~self.mask[..., :L + 1], float("-inf"))
        d, nq, nkv = self.head_dim, self.n_q, self.n_kv
        for i, (layer, K, V) in enumerate(zip(self.layers, self.keys, self.values)):
            a = layer.self_attn
            qkv = self.qkv[i](layer.input_layernorm(h))           # (b, (nq + 2 nkv) d)
            if hasattr(a, "q_norm") or self.rotate_half is None:  # Qwen3: RMSNorm per head (over d) before RoPE
                q = qkv[:, :nq * d].view(b, nq, 1, d)
                k = qkv[:, nq * d:(nq + nkv) * d].view(b, nkv, 1, d)
                if hasattr(a, "q_norm"):
                    q, k = a.q_norm(q), a.k_norm(k)
                q, k = self.rope(q, k, cos, sin)                  # (b, heads, 1, d)
            else:  # apply_rotary_pos_emb's maths (x cos + rotate_half(x) sin) on q and k at once
                qk = qkv[:, :(nq + nkv) * d].view(b, nq + nkv, 1, d)
                qk = qk * cos4 + self.rotate_half(qk) * sin4
                q, k = qk[:, :nq], qk[:, nq:]
            K[:, :, L] = k[:, :, 0]
            V[:, :, L] = qkv[:, (nq + nkv) * d:].view(b, nkv, d)
            o = F.scaled_dot_product_attention(q, K[:, :, :L + 1], V[:, :, :L + 1], attn_mask=mask,
                                               scale=self.scaling, enable_gqa=self.gqa)  # (b, nq, 1, d)
            h = h + self.o[i](o.reshape(b, nq * d))               # one query: (b, nq, 1, d) is (b, 1, nq, d)
            x = layer.post_attention_layernorm(h)
            if self.gate_up[i] is None:
                h = h + layer.mlp(x)
            else:
                gu = self.gate_up[i](x)                           # (b, 2 I)
                g, u = gu.chunk(2, dim=-1)
                h = h + self.down[i](layer.mlp.act_fn(g) * u)
        return h
