"""SASRec-style causal transformer over item sequences (pure tensors).

Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018 (arXiv:1808.09781), with
three deliberate changes:

* pre-LayerNorm blocks with a final LayerNorm (stable training without warm-up tricks);
* learned positions counted from the first real item of the session (left padding gets no position),
  so any amount of left padding gives identical outputs and position never reveals future length;
* attention is written by hand over ``scaled_dot_product_attention`` with a finite additive mask in
  which every position may attend to itself, so padded rows never produce NaN and the graph exports
  to ONNX with dynamic batch and sequence axes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqrec.constants import PAD_IDX


@dataclass(frozen=True)
class SASRecConfig:
    """Architecture hyperparameters.

    Attributes:
        num_items: catalog size, excluding PAD; embeddings have C = num_items + 1 rows.
        max_len: context length L; longer sessions must be truncated by the caller.
        d_model: hidden size D.
        n_heads: attention heads H (D % H == 0).
        n_layers: transformer blocks.
        dropout: dropout probability on embeddings, attention weights and block outputs.
        ffn_mult: feed-forward width as a multiple of D.
        copy_mechanism: mix the softmax over the catalog with a pointer (copy) distribution over
            the session's own items, p = g * softmax(h E^T) + (1 - g) * sum_j alpha_j [item_j],
            as in RepeatNet (Ren et al., AAAI 2019) and pointer-generator networks (See et al.,
            ACL 2017). Scores are then log-probabilities.
        copy_recency: with ``copy_mechanism``, add a learned bias b[t - j] to the pointer
            attention of position t over each earlier position j (one scalar per distance
            0..max_len-1, zero at initialisation), so the pointer can favour recently clicked items
            directly, as recency-weighted neighbourhood methods do (STAN, Garg et al., SIGIR 2019)
            and as relative position biases do in attention (Raffel et al., JMLR 2020).
    """

    num_items: int
    max_len: int = 50
    d_model: int = 64
    n_heads: int = 2
    n_layers: int = 2
    dropout: float = 0.2
    ffn_mult: int = 4
    copy_mechanism: bool = False
    copy_recency: bool = False

    def __post_init__(self) -> None:
        if self.num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {self.num_items}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} not divisible by n_heads={self.n_heads}")
        for name in ("copy_mechanism", "copy_recency"):
            if not isinstance(getattr(self, name), bool):  # a string such as "false" is truthy
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.copy_recency and not self.copy_mechanism:
            raise ValueError("copy_recency needs copy_mechanism=True (it biases the pointer)")


def _log_sigmoid(x: Tensor) -> Tensor:
    """log(sigmoid(x)), finite for any finite x; written with elementwise ops so that ONNX
    exporters keep it stable (they lower ``F.logsigmoid`` to Log(Sigmoid), -inf below x = -104)."""
    return -(torch.clamp(-x, min=0) + torch.log1p(torch.exp(-x.abs())))


def _log_add_exp(a: Tensor, b: Tensor) -> Tensor:
    """log(exp(a) + exp(b)) without overflow (exporters lower ``torch.logaddexp`` to
    Log(Exp + Exp))."""
    return torch.maximum(a, b) + torch.log1p(torch.exp(-(a - b).abs()))


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with an explicit additive mask."""

    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, hidden: Tensor, attn_bias: Tensor) -> Tensor:
        """Attend over earlier positions.

        Args:
            hidden: (B, L, D) float.
            attn_bias: (B, 1, L, L) float additive mask: 0 where allowed, dtype minimum elsewhere;
                the diagonal is always 0.

        Returns:
            (B, L, D) float.
        """
        batch, length, d_model = hidden.shape
        head_dim = d_model // self.n_heads
        qkv = self.qkv(hidden).view(batch, length, 3, self.n_heads, head_dim)  # (B, L, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, Dh)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_bias, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, L, Dh)
        out = out.transpose(1, 2).reshape(batch, length, d_model)  # (B, L, D)
        return self.proj(out)


class Block(nn.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln_ffn = nn.LayerNorm(cfg.d_model)
        self.ffn = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.ffn_mult * cfg.d_model),
            nn.GELU(),
            nn.Linear(cfg.ffn_mult * cfg.d_model, cfg.d_model),
        )
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, hidden: Tensor, attn_bias: Tensor) -> Tensor:
        """(B, L, D) float -> (B, L, D) float; see :class:`CausalSelfAttention` for the mask."""
        hidden = hidden + self.drop(self.attn(self.ln_attn(hidden), attn_bias))
        return hidden + self.drop(self.ffn(self.ln_ffn(hidden)))


class SASRec(nn.Module):
    """Causal transformer that scores the catalog for the next item after each position."""

    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.item_emb = nn.Embedding(cfg.num_items + 1, cfg.d_model, padding_idx=PAD_IDX)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.d_model)
        self.emb_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_out = nn.LayerNorm(cfg.d_model)
        if cfg.copy_mechanism:
            self.copy_query = nn.Linear(cfg.d_model, cfg.d_model)
            self.copy_key = nn.Linear(cfg.d_model, cfg.d_model)
            self.copy_gate = nn.Linear(cfg.d_model, 1)
        if cfg.copy_recency:  # (max_len,) pointer attention bias by distance to the query
            self.copy_distance_bias = nn.Parameter(torch.zeros(cfg.max_len))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, 0.02) init for embeddings and linear weights (GPT-2 style), zero biases."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[PAD_IDX].zero_()

    @staticmethod
    def attention_mask(item_ids: Tensor) -> Tensor:
        """Causal + padding mask with the diagonal always allowed (no fully masked row).

        Args:
            item_ids: (B, L) int64, left-padded with PAD_IDX.

        Returns:
            (B, L, L) bool, True where query position (row) may attend to key position (column).
        """
        is_real = item_ids != PAD_IDX  # (B, L)
        length = item_ids.shape[1]
        idx = torch.arange(length, device=item_ids.device)
        is_causal = idx.unsqueeze(0) <= idx.unsqueeze(1)  # (L, L): query row, key column
        is_self = idx.unsqueeze(0) == idx.unsqueeze(1)  # (L, L)
        return (is_causal.unsqueeze(0) & is_real.unsqueeze(1)) | is_self.unsqueeze(0)

    def forward(self, item_ids: Tensor) -> Tensor:
        """Encode sessions.

        Args:
            item_ids: (B, L) int64 item indices, left-padded with PAD_IDX = 0; L <= max_len.

        Returns:
            (B, L, D) float hidden states; position t summarises items[..t]. Rows at padded
            positions are zeros.
        """
        is_real = item_ids != PAD_IDX  # (B, L)
        # Position of each real item counted from the session's first real item; PAD gets 0.
        positions = (torch.cumsum(is_real.to(torch.int64), dim=1) - 1).clamp(min=0)  # (B, L)
        hidden = self.item_emb(item_ids) * (self.cfg.d_model**0.5) + self.pos_emb(positions)
        hidden = self.emb_drop(hidden) * is_real.unsqueeze(-1).to(hidden.dtype)  # (B, L, D)

        is_allowed = self.attention_mask(item_ids)  # (B, L, L)
        neg = torch.finfo(hidden.dtype).min
        attn_bias = torch.zeros(is_allowed.shape, dtype=hidden.dtype, device=item_ids.device)
        attn_bias = attn_bias.masked_fill(~is_allowed, neg).unsqueeze(1)  # (B, 1, L, L)

        for block in self.blocks:
            hidden = block(hidden, attn_bias)
        hidden = self.ln_out(hidden)
        return hidden * is_real.unsqueeze(-1).to(hidden.dtype)

    def score(self, hidden: Tensor) -> Tensor:
        """Dot-product scores against every item embedding.

        Args:
            hidden: (N, D) float hidden states.

        Returns:
            (N, C) float scores; column PAD_IDX is the dtype's minimum so it never ranks.
        """
        scores = hidden @ self.item_emb.weight.t()  # (N, C)
        return scores.index_fill(
            1, torch.tensor([PAD_IDX], device=scores.device), torch.finfo(scores.dtype).min
        )

    def score_last(self, item_ids: Tensor) -> Tensor:
        """Score the whole catalog for the next item of each session.

        Args:
            item_ids: (B, L) int64 item indices, left-padded with PAD_IDX = 0.

        Returns:
            (B, C) float32 scores; column PAD_IDX is the dtype's minimum so it never ranks. An
            all-padding row gets score 0 for every real item (callers apply their fallback).
        """
        hidden = self.forward(item_ids)  # (B, L, D)
        if not self.cfg.copy_mechanism:
            return self.score(hidden[:, -1])
        real = hidden[:, -1] @ self.item_emb.weight[PAD_IDX + 1 :].t()  # (B, C-1)
        real = self.copy_log_probs_last(real, hidden, item_ids)  # (B, C-1)
        pad = torch.full((real.shape[0], 1), torch.finfo(real.dtype).min, dtype=real.dtype)
        return torch.cat([pad.to(real.device), real], dim=1)  # (B, C); PAD_IDX = 0 first

    def copy_log_probs_last(self, logits: Tensor, states: Tensor, item_ids: Tensor) -> Tensor:
        """The copy mixture at the last position, over real items only (``cfg.copy_mechanism``).

        Args:
            logits: (B, C-1) float generator logits of the real items (rows 1.. of the table).
            states: (B, L, D) float ``SASRec.forward`` output.
            item_ids: (B, L) int64 the same left-padded inputs; the last column must be a real
                item (as in every prefix the model scores).

        Returns:
            (B, C-1) float log-probabilities of the real items: log(gate * softmax(logits) +
            (1 - gate) * pointer), with the pointer attention of the last position over the real
            positions (and itself), as :meth:`copy_weights` computes it for every position.
            See :meth:`copy_log_probs_from_keys` for how it is computed.
        """
        log_probs = self.copy_log_probs_from_keys(
            logits, states[:, -1], self.copy_key(states), item_ids
        )
        assert isinstance(log_probs, Tensor)
        return log_probs

    def copy_log_probs_from_keys(
        self,
        logits: Tensor,
        last: Tensor,
        keys: Tensor,
        item_ids: Tensor,
        split_gate: bool = False,
        new_key: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """:meth:`copy_log_probs_last` from the last state and the pointer keys of every position.

        The incremental serving graphs (``seqrec.incremental``) cache the keys, so they call this
        directly. Computed in log space with one pass over the catalog besides ``log_softmax``:
        an item outside the session has log p = log(gate) + log_softmax(logits); a session item
        has log p = logaddexp(log(gate) + log_softmax(logit), log(1 - gate) + log(pointer mass)),
        written into the log-softmax row by one scatter. Nothing is clamped and no (B, C-1)
        probability matrix is built.

        Args:
            logits: (B, C-1) float generator logits of the real items.
            last: (B, D) float final state at the last position.
            keys: (B, L, D) float ``copy_key`` of the final states at every position, or of
                the first L - 1 positions when ``new_key`` is given.
            item_ids: (B, L) int64 left-padded inputs; the last column is a real item.
            split_gate: return ``(log p - log(gate), log(gate))`` instead of log p: the first
                part ranks the catalog the same way, so a top-k can add the (B, 1) second part to
                its k values only.
            new_key: (B, 1, D) float key of the last position, kept apart from the cached
                ``keys`` so that the step graph never copies them into one (B, L, D) tensor.

        Returns:
            (B, C-1) float log-probabilities of the real items, or the pair described above.
        """
        gate_logit = self.copy_gate(last)  # (B, 1)
        query = self.copy_query(last)  # (B, D)
        att = keys @ query.unsqueeze(-1)  # (B, L or L - 1, 1)
        if new_key is not None:
            att = torch.cat([att, new_key @ query.unsqueeze(-1)], dim=1)
        att = att.squeeze(-1) / (self.cfg.d_model**0.5)  # (B, L)
        length = item_ids.shape[1]
        idx = torch.arange(length, device=item_ids.device)  # (L,)
        if self.cfg.copy_recency:
            att = att + self.copy_recency_bias(idx[-1:], length)  # (1, L) over B
        is_last = idx == length - 1  # (L,)
        is_real = item_ids != PAD_IDX  # (B, L)
        is_allowed = is_real | is_last.unsqueeze(0)  # (B, L)
        alpha = torch.softmax(att.masked_fill(~is_allowed, torch.finfo(att.dtype).min), dim=-1)
        # pointer mass of each position's item (summed over repeats of the same item): (B, L)
        same = item_ids.unsqueeze(2) == item_ids.unsqueeze(1)  # (B, L, L)
        mass = (alpha.unsqueeze(1) * same.to(alpha.dtype)).sum(-1)  # (B, L)
        log_gen = torch.log_softmax(logits, dim=-1)  # (B, C-1)
        # padded positions write the last item's value again (same column, same value)
        col = (torch.where(is_real, item_ids, item_ids[:, -1:]) - (PAD_IDX + 1)).clamp(min=0)
        mass = torch.where(is_real, mass, mass[:, -1:])  # (B, L)
        # log(1 - gate) - log(gate) = log(sigmoid(-x) / sigmoid(x)) = -x for the gate logit x
        mixed = _log_add_exp(
            log_gen.gather(1, col), torch.log(mass) - gate_logit
        )  # (B, L) log p(item) - log(gate) of each position's item
        log_gate = _log_sigmoid(gate_logit)  # (B, 1)
        ranked = log_gen.scatter(1, col, mixed)  # (B, C-1) log p - log(gate)
        if split_gate:
            return ranked, log_gate
        return ranked + log_gate

    def copy_recency_bias(self, query_positions: Tensor, length: int) -> Tensor:
        """Pointer-attention bias b[t - j] of ``cfg.copy_recency``.

        Args:
            query_positions: (Q,) int64 positions t of the querying states.
            length: number L of key positions j = 0..L-1.

        Returns:
            (Q, L) float ``copy_distance_bias[t - j]``; distances are clamped to 0..max_len-1
            (negative ones are future keys, which the attention mask removes).
        """
        keys = torch.arange(length, device=query_positions.device)  # (L,)
        distance = (query_positions.unsqueeze(1) - keys).clamp(0, self.cfg.max_len - 1)
        return self.copy_distance_bias[distance]

    def copy_weights(self, hidden: Tensor, item_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Gate and pointer attention of the copy mechanism (``cfg.copy_mechanism``).

        Args:
            hidden: (B, L, D) float output of :meth:`forward`.
            item_ids: (B, L) int64 the same left-padded inputs.

        Returns:
            ``(gate, alpha)``: (B, L, 1) float probability of generating from the catalog at each
            position, and (B, L, L) float attention of each position over earlier real positions
            (and itself); rows sum to 1.
        """
        is_allowed = self.attention_mask(item_ids)  # (B, L, L)
        query = self.copy_query(hidden)  # (B, L, D)
        key = self.copy_key(hidden)  # (B, L, D)
        att = query @ key.transpose(1, 2) / (self.cfg.d_model**0.5)  # (B, L, L)
        if self.cfg.copy_recency:
            length = item_ids.shape[1]
            positions = torch.arange(length, device=item_ids.device)
            att = att + self.copy_recency_bias(positions, length)  # (L, L) over B
        att = att.masked_fill(~is_allowed, torch.finfo(att.dtype).min)
        return torch.sigmoid(self.copy_gate(hidden)), torch.softmax(att, dim=-1)

    def log_prob_of(
        self, hidden: Tensor, item_ids: Tensor, is_target: Tensor, targets: Tensor
    ) -> Tensor:
        """Log-probability of each real target under the copy mixture (training loss).

        Args:
            hidden: (B, L, D) float from :meth:`forward`; item_ids: (B, L) int64 inputs.
            is_target: (B, L) bool real target positions (N of them); targets: (B, L) int64.

        Returns:
            (N,) float log p(target).
        """
        hidden_at, targets_at = hidden[is_target], targets[is_target]  # (N, D), (N,)
        # Real items only (rows 1..), so PAD needs no masking; the target column shifts by one.
        logits = (hidden_at @ self.item_emb.weight[PAD_IDX + 1 :].t()).float()  # (N, C - 1)
        log_p_gen = -F.cross_entropy(logits, targets_at - (PAD_IDX + 1), reduction="none")  # (N,)
        gate, alpha = self.copy_weights(hidden, item_ids)  # (B, L, 1), (B, L, L)
        gate_at, alpha_at = (
            gate[is_target].squeeze(1).float(),
            alpha[is_target].float(),
        )  # (N,), (N, L)
        inputs_at = item_ids.unsqueeze(1).expand(-1, item_ids.shape[1], -1)[is_target]  # (N, L)
        p_copy = (alpha_at * (inputs_at == targets_at.unsqueeze(1))).sum(1)  # (N,)
        tiny = torch.finfo(torch.float32).tiny
        return torch.logaddexp(
            torch.log(gate_at.clamp_min(tiny)) + log_p_gen,
            torch.log((1.0 - gate_at).clamp_min(tiny)) + torch.log(p_copy.clamp_min(tiny)),
        )
