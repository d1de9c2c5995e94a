"""Pre-norm transformer layer and model shared by every attention architecture.

A model is token embedding -> ``num_layers`` pre-norm layers -> final LayerNorm. There are no position
embeddings: causal attention carries order itself (NoPE; Haviv et al. 2022, arXiv 2203.16634), and every
architecture here is compared under the same rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bsbr._checks import check_dropout, check_int_at_least, check_positive_int
from bsbr.attention import BSBRAttention
from bsbr.layer import validate_attention_mask
from bsbr.baselines.standard import StandardAttention

__all__ = ["AttentionModel", "BSBRForCausalLM", "BSBRLayer", "BSBRModel", "CausalLM", "CausalLMOutput",
           "StandardModel", "TransformerLayer", "TransformerModel"]


class TransformerLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + ff(norm(x))`` with a GELU feed-forward of width ``ff_dim``.

    ``attention`` is any module with ``forward(hidden_states[batch, seq_len, hidden_dim], attention_mask=None,
    state=None, return_state=False)`` (see :class:`bsbr.BSBRAttention`).
    """

    def __init__(self, attention: nn.Module, hidden_dim: int, ff_dim: int, dropout: float = 0.0):
        super().__init__()
        check_positive_int(hidden_dim=hidden_dim, ff_dim=ff_dim)
        self.attention = attention
        self.attention_norm = nn.LayerNorm(hidden_dim)
        self.ff_norm = nn.LayerNorm(hidden_dim)
        self.ff = nn.Sequential(nn.Linear(hidden_dim, ff_dim), nn.GELU(), nn.Linear(ff_dim, hidden_dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, state=None,
                return_state: bool = False):
        """``[batch, seq_len, hidden_dim]`` -> ``[batch, seq_len, hidden_dim]`` (and the attention's new state with
        ``return_state=True``; ``state`` continues a sequence as in the attention module)."""
        result = self.attention(self.attention_norm(hidden_states), attention_mask, state=state,
                                return_state=return_state)
        attended, new_state = result if return_state else (result, None)
        hidden_states = hidden_states + self.dropout(attended)
        hidden_states = hidden_states + self.dropout(self.ff(self.ff_norm(hidden_states)))
        return (hidden_states, new_state) if return_state else hidden_states


class TransformerModel(nn.Module):
    """Embedding, ``num_layers`` :class:`TransformerLayer` built by ``make_attention()``, final LayerNorm.

    ``forward(input_ids[batch, seq_len], attention_mask=None[batch, seq_len], state=None, return_state=False)
    -> [batch, seq_len, hidden_dim]``, or ``(hidden_states, state)`` with ``return_state=True``; ``state`` is the
    list of the layers' attention states and continues a sequence (pieces give the full forward's outputs).
    Padded positions (``attention_mask == 0``) output zeros.
    Raises ValueError for non-positive sizes, ``dropout`` outside [0, 1), ``input_ids`` that is not a 2-D integer
    tensor with ``seq_len >= 1``, ids outside ``[0, vocab_size)``, a malformed ``attention_mask`` or a ``state``
    that is not one state per layer from this model.
    """

    def __init__(self, vocab_size: int, hidden_dim: int, num_layers: int, ff_dim: int, dropout: float,
                 make_attention: Callable[[], nn.Module]):
        super().__init__()
        check_positive_int(vocab_size=vocab_size, hidden_dim=hidden_dim, num_layers=num_layers, ff_dim=ff_dim)
        check_dropout(dropout)
        self.vocab_size, self.hidden_dim = vocab_size, hidden_dim
        self.embed_tokens = nn.Embedding(vocab_size, hidden_dim)
        nn.init.normal_(self.embed_tokens.weight, std=0.02)  # GPT-2 init: keeps tied-head logits O(1) at start
        self.layers = nn.ModuleList(
            TransformerLayer(make_attention(), hidden_dim, ff_dim, dropout) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(hidden_dim)
        self.dropout = nn.Dropout(dropout)

    def check_input_ids(self, input_ids) -> None:
        """Raise ValueError unless ``input_ids`` is a 2-D integer tensor, ``seq_len >= 1``, ids in ``[0, vocab_size)``."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            raise ValueError("input_ids must be a 2-D integer tensor [batch, seq_len]")
        if input_ids.shape[1] < 1:
            raise ValueError("input_ids must have seq_len >= 1")
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.vocab_size):
            raise ValueError(f"input_ids must lie in [0, vocab_size={self.vocab_size})")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, state=None,
                return_state: bool = False):
        self.check_input_ids(input_ids)
        attention_mask = validate_attention_mask(attention_mask, *input_ids.shape)
        if state is not None and (not isinstance(state, (list, tuple)) or len(state) != len(self.layers)):
            raise ValueError(f"state must be the list of {len(self.layers)} layer states this model returned "
                             "with return_state=True")
        hidden_states = self.dropout(self.embed_tokens(input_ids))  # [batch, seq_len, hidden_dim]
        new_states = []
        for index, layer in enumerate(self.layers):
            layer_state = None if state is None else state[index]
            if return_state:
                hidden_states, layer_state = layer(hidden_states, attention_mask, layer_state, True)
                new_states.append(layer_state)
            else:
                hidden_states = layer(hidden_states, attention_mask, layer_state)
        hidden_states = self.norm(hidden_states)
        if attention_mask is not None:
            hidden_states = hidden_states.masked_fill(~attention_mask[:, :, None], 0.0)  # padding: zeros
        return (hidden_states, new_states) if return_state else hidden_states


class BSBRLayer(TransformerLayer):
    """Pre-norm layer with :class:`bsbr.BSBRAttention` (arguments as in :class:`BSBRModel`)."""

    def __init__(self, hidden_dim: int, num_heads: int, chunk_size: int, ff_dim: int, dropout: float = 0.0,
                 compression_factor: int | None = None, **retrieval):
        super().__init__(BSBRAttention(hidden_dim, num_heads, chunk_size, dropout, compression_factor, **retrieval),
                         hidden_dim, ff_dim, dropout)


class BSBRModel(TransformerModel):
    """Language-model trunk with BSBR attention in every layer.

    Args:
        vocab_size, hidden_dim, num_layers, num_heads, ff_dim: sizes (positive integers).
        chunk_size: BSBR chunk length in tokens.
        dropout: in [0, 1).
        compression_factor: None or a divisor of ``head_dim**2`` (see :class:`bsbr.BSBRAttention`).
        retrieval, block_size, top_k, summary, sink_size: the layer's retrieval (``"state"``, the default, or
            ``"blocks"``) and the settings of ``"blocks"`` (see :class:`bsbr.BSBRAttention`).
    ``forward(input_ids[batch, seq_len], attention_mask=None) -> hidden states [batch, seq_len, hidden_dim]``.
    """

    def __init__(self, vocab_size: int, hidden_dim: int, num_layers: int, num_heads: int, chunk_size: int,
                 ff_dim: int, dropout: float = 0.0, compression_factor: int | None = None, retrieval: str = "state",
                 block_size: int | None = None, top_k: int | None = None, summary: str | None = None,
                 sink_size: int | None = None):
        settings = dict(retrieval=retrieval, block_size=block_size, top_k=top_k, summary=summary, sink_size=sink_size)
        # Validate once up front so errors name the argument before any layer is built.
        BSBRAttention(hidden_dim, num_heads, chunk_size, dropout, compression_factor, **settings)
        super().__init__(vocab_size, hidden_dim, num_layers, ff_dim, dropout,
                         lambda: BSBRAttention(hidden_dim, num_heads, chunk_size, dropout, compression_factor,
                                               **settings))


class StandardModel(TransformerModel):
    """Language-model trunk with standard causal softmax attention (:class:`bsbr.baselines.StandardAttention`)."""

    def __init__(self, vocab_size: int, hidden_dim: int, num_layers: int, num_heads: int, ff_dim: int,
                 dropout: float = 0.0):
        StandardAttention(hidden_dim, num_heads, dropout)
        super().__init__(vocab_size, hidden_dim, num_layers, ff_dim, dropout,
                         lambda: StandardAttention(hidden_dim, num_heads, dropout))


class AttentionModel(TransformerModel):
    """Language-model trunk with ``attention_cls(hidden_dim, num_heads, dropout, **attention_settings)`` in every
    layer: the baselines of :mod:`bsbr.baselines` (linear, DeltaNet, sliding window, Hopfield, GAU) built by
    :func:`bsbr.build_model`. ``attention_settings`` holds the architecture's own arguments (e.g. ``window_size``).
    ``forward`` as :class:`TransformerModel`. Raises ValueError as the attention class and the trunk do."""

    def __init__(self, attention_cls: Callable[..., nn.Module], vocab_size: int, hidden_dim: int, num_layers: int,
                 num_heads: int, ff_dim: int, dropout: float = 0.0, **attention_settings):
        attention_cls(hidden_dim, num_heads, dropout, **attention_settings)  # errors name the argument up front
        super().__init__(vocab_size, hidden_dim, num_layers, ff_dim, dropout,
                         lambda: attention_cls(hidden_dim, num_heads, dropout, **attention_settings))
        self.attention_settings = dict(attention_settings)


@dataclass
class CausalLMOutput:
    """``logits``: ``[batch, seq_len, vocab_size]``; ``loss``: mean next-token cross-entropy (nats) or None;
    ``state``: the trunk's per-layer streaming states (``return_state=True``) or None."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    state: list | None = None


class CausalLM(nn.Module):
    """Causal language model: a :class:`TransformerModel` trunk and a linear LM head (no bias).

    Args:
        model: the trunk (``model.embed_tokens``, ``model.vocab_size``, ``model.hidden_dim``).
        tie_word_embeddings: share the LM head weight with the token embedding (one tensor) or learn its own.
    """

    def __init__(self, model: TransformerModel, tie_word_embeddings: bool = True):
        super().__init__()
        if not isinstance(model, TransformerModel):
            raise ValueError(f"model must be a bsbr TransformerModel, got {type(model).__name__}")
        if not isinstance(tie_word_embeddings, bool):
            raise ValueError(f"tie_word_embeddings must be a bool, got {tie_word_embeddings!r}")
        self.model = model
        self.lm_head = nn.Linear(model.hidden_dim, model.vocab_size, bias=False)
        if tie_word_embeddings:
            self.lm_head.weight = model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, state=None, return_state: bool = False) -> CausalLMOutput:
        """Logits, and the loss when ``labels`` are given.

        Args:
            input_ids: ``[batch, seq_len]`` token ids; attention_mask: optional ``[batch, seq_len]`` 1 = real token.
            labels: optional ``[batch, seq_len]`` ids, usually ``input_ids`` itself (HF convention): position ``t``'s
                logits are scored against ``labels[:, t+1]``; ``-100`` labels are ignored, and so are pairs where
                ``t`` or ``t+1`` is padding (a padded row scores as the row alone). The loss is the mean over
                scored tokens (0 when none is scored).
            state, return_state: streaming, as in :class:`TransformerModel`.
        Returns:
            :class:`CausalLMOutput`.
        Raises:
            ValueError: as the trunk, and ``labels`` that is not an integer tensor shaped like ``input_ids``.
        """
        result = self.model(input_ids, attention_mask, state=state, return_state=return_state)
        hidden_states, new_state = result if return_state else (result, None)
        logits = self.lm_head(hidden_states)  # [batch, seq_len, vocab_size]
        loss = None
        if labels is not None:
            if not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape or labels.is_floating_point():
                raise ValueError(f"labels must be an integer tensor shaped like input_ids {list(input_ids.shape)}")
            targets = labels[:, 1:]
            if attention_mask is not None:  # score only real tokens predicted from real tokens
                real = validate_attention_mask(attention_mask, *input_ids.shape)
                targets = targets.masked_fill(~(real[:, :-1] & real[:, 1:]), -100)
            per_token = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="none")
            scored = (targets != -100).sum()
            loss = per_token.sum() / scored.clamp_min(1)
        return CausalLMOutput(logits=logits, loss=loss, state=new_state)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, generator: torch.Generator | None = None,
                 eos_token_id: int | None = None) -> torch.Tensor:
        """Extend every prompt by up to ``max_new_tokens`` tokens, one streaming step per token.

        The prompt runs once with ``return_state=True``; each new token then costs one single-token forward that
        continues the state (for BSBR: constant cost per token, whatever the position).

        Args:
            input_ids: ``[batch, prompt_len]`` prompts of equal length (no padding: the state is batch-uniform).
            max_new_tokens: tokens to add (>= 0).
            do_sample: False = greedy (argmax); True = sample from ``softmax(logits / temperature)``, restricted to
                the ``top_k`` most likely tokens when ``top_k`` is given.
            temperature: > 0; top_k: None or >= 1; generator: a seeded ``torch.Generator`` for reproducible samples.
            eos_token_id: optional id; a row that produced it keeps producing it, and generation stops early once
                every row has.
        Returns:
            ``[batch, prompt_len + new]`` ids, the prompt first (``new <= max_new_tokens``).
        Raises:
            ValueError: a bad argument (named in the message), as well as the trunk's input checks.
        """
        check_int_at_least(0, max_new_tokens=max_new_tokens)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
        if top_k is not None:
            check_positive_int(top_k=top_k)
        if eos_token_id is not None:
            check_int_at_least(0, eos_token_id=eos_token_id)
        if max_new_tokens == 0:
            self.model.check_input_ids(input_ids)
            return input_ids.clone()
        output = self(input_ids, return_state=True)
        tokens = [input_ids]
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            logits = output.logits[:, -1].float()  # [batch, vocab_size]
            if do_sample:
                logits = logits / temperature
                if top_k is not None and top_k < logits.shape[-1]:
                    kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_token = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[:, 0]
            else:
                next_token = logits.argmax(dim=-1)
            if eos_token_id is not None:
                next_token = next_token.masked_fill(finished, eos_token_id)
                finished |= next_token == eos_token_id
            tokens.append(next_token[:, None])
            if step == max_new_tokens - 1 or bool(finished.all()):
                break
            output = self(next_token[:, None], state=output.state, return_state=True)
        return torch.cat(tokens, dim=1)


class BSBRForCausalLM(CausalLM):
    """BSBR language model: :class:`BSBRModel` trunk + LM head (arguments as :class:`BSBRModel`, plus
    ``tie_word_embeddings``). ``forward(input_ids, attention_mask=None, labels=None, state=None,
    return_state=False) -> CausalLMOutput``; :meth:`generate` decodes with BSBR's streaming state."""

    def __init__(self, vocab_size: int, hidden_dim: int, num_layers: int, num_heads: int, chunk_size: int,
                 ff_dim: int, dropout: float = 0.0, compression_factor: int | None = None,
                 tie_word_embeddings: bool = True):
        super().__init__(BSBRModel(vocab_size, hidden_dim, num_layers, num_heads, chunk_size, ff_dim, dropout,
                                   compression_factor), tie_word_embeddings)
