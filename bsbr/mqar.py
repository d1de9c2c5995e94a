"""Multi-query associative recall (MQAR) on models trained from scratch: data, locality, state sizes, training.

MQAR (Arora et al. 2023, "Zoology: Measuring and Improving Recall in Efficient Language Models", arXiv 2312.04927;
reference generator ``zoology/data/multiquery_ar.py`` of HazyResearch/zoology) asks a model to recall, at each
query, the value that was paired with the queried key earlier in the sequence::

    data = multiquery_ar(num_examples=1024, seq_len=64, num_pairs=4, vocab_size=256, seed=0)
    data.inputs, data.labels                                 # int64 [1024, 64] each
    outside_fraction(data.inputs, data.labels, 4, span=16, kind="chunk")   # answers beyond a 16-token chunk
    state_size("bsbr", config, seq_len=64)                   # values of the recurrent state / KV cache, all layers
    run = train_mqar("bsbr", config, train, validation, steps=300, batch_size=32, learning_rate=3e-3)
    run.val_accuracy, evaluate_mqar(run.model, test.inputs, test.labels)

Layout of one example (``N = num_pairs``, ``V = vocab_size``, ``L = seq_len``), as in Zoology:

* positions ``0 .. 2N-1``: the ``N`` key–value pairs ``k_0 v_0 k_1 v_1 ...``; keys are distinct, drawn from
  ``[1, V/2)`` (0 is Zoology's placeholder and never a key), values distinct from ``[V/2, V)``;
* after them, each key is queried exactly once: key ``i`` sits at position ``2N + 2·g_i``, where the gaps ``g_i`` are
  distinct slots of ``[0, (L - 2N)/2)`` drawn without replacement with probability ``∝ a·(g+1)^(a-1)``
  (``power_a = a = 0.01``: a power law that puts most queries soon after the pairs);
* every other position holds a uniformly random token of ``[0, V)`` (Zoology's ``random_non_queries``);
* ``labels[t]`` is the token the model must predict *at* position ``t`` (no shift: the logits of position ``t`` are
  scored against ``labels[t]``): the queried key's value at each query position, ``-100`` (ignored) elsewhere.

Loss and accuracy are taken at the query positions only. An answer counts as correct when the argmax of the logits
at its query position is the value.

Locality (:func:`answer_distances`, :func:`outside_fraction`): an answer needs the pair's *value* token (its last
token, position ``2i+1``; the key is one token earlier still). For BSBR's ``chunk_size = c`` the answer lies outside
the local chunk when the value token is in an earlier chunk than the query (``(2i+1) // c < q // c``): only the
chunk-state retrieval can then supply it. BSBR with ``retrieval="blocks"`` attends exactly to its own and the previous
chunk (``kind="own_and_previous"``: outside when ``(2i+1) // c < q // c - 1``); beyond them only a retrieved block
can supply the answer. For a sliding window ``w`` (a query sees itself and the ``w - 1`` tokens
before it) it lies outside when the value is more than ``w - 1`` tokens before the query (``q - (2i+1) > w - 1``).
Stacking ``n`` window layers widens the receptive field to ``n·(w-1)`` tokens; :func:`outside_fraction` measures one
layer's span.

Model: :class:`bsbr.CausalLM` on ``bsbr.build_model(name, **config)`` (the trunk every report uses), with one
addition shared by every architecture: a short causal depthwise convolution over the token embeddings
(:class:`ShortConvEmbedding`, kernel 3 by default). Binding a key to its value needs each value token to carry the
token before it, and the project's models have no position information (NoPE, :mod:`bsbr.model`). In a probe
while this module was written (vocabulary 256, 64 tokens, 4 pairs, width 64, 2 layers, batches of 32), full attention
without the convolution stayed at ~25 % validation accuracy (guessing among the example's 4 values) after 2,500
steps, with learned absolute positions too after 1,000; with the convolution it reached 99 % in 400 steps. Zoology
gives every sequence mixer the same help (its ``BaseConv`` short convolution, kernel 3, in each layer).

State sizes (:func:`state_size`) are the values each architecture keeps per sequence after ``seq_len`` tokens to
continue it (the streaming state its layer returns with ``return_state=True``), summed over layers, plus the
short convolution's last ``k − 1`` embeddings.
"""

from __future__ import annotations

import math
import pickle
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bsbr._checks import check_int_at_least, check_positive_int
from bsbr.blocks import SUMMARIES

__all__ = ["IGNORE_INDEX", "KINDS", "MQARData", "MQARRun", "ShortConvEmbedding", "accuracy_interval",
           "answer_distances", "build_mqar_lm", "evaluate_mqar", "multiquery_ar", "outside_fraction", "state_formula",
           "state_size", "train_mqar", "train_mqar_runs"]

#: Label of positions that are not scored (``F.cross_entropy``'s ``ignore_index``).
IGNORE_INDEX = -100
#: ``kind`` values of :func:`outside_fraction`: the local region of a chunked layer (its own chunk), of block retrieval
#: (its own and the previous chunk) or of a sliding window.
KINDS = ("chunk", "own_and_previous", "window")


class MQARData(NamedTuple):
    """``inputs``: ``int64 [num_examples, seq_len]`` token ids; ``labels``: ``int64 [num_examples, seq_len]``, the
    value at each query position, :data:`IGNORE_INDEX` elsewhere."""

    inputs: torch.Tensor
    labels: torch.Tensor


def _check_sizes(seq_len: int, num_pairs: int, vocab_size: int) -> None:
    check_positive_int(seq_len=seq_len, num_pairs=num_pairs, vocab_size=vocab_size)
    if seq_len % 2:
        raise ValueError(f"seq_len must be even (pairs and query slots are 2 tokens), got {seq_len}")
    if 4 * num_pairs > seq_len:
        raise ValueError(f"num_pairs: {num_pairs} pairs and their {num_pairs} query slots need seq_len >= "
                         f"4·num_pairs = {4 * num_pairs}, got seq_len={seq_len}")
    if vocab_size // 2 - 1 < num_pairs or vocab_size - vocab_size // 2 < num_pairs:
        raise ValueError(f"vocab_size: {num_pairs} distinct keys in [1, V/2) and values in [V/2, V) need "
                         f"vocab_size >= {2 * num_pairs + 2}, got {vocab_size}")


def _distinct(rng: np.random.Generator, rows: int, low: int, high: int, k: int) -> np.ndarray:
    """``[rows, k]`` distinct uniform integers of ``[low, high)`` per row: the first ``k`` of a random ranking,
    ranked in blocks of rows so that at most ~4M uniforms are held at once."""
    width = high - low
    block = max(1, (1 << 22) // width)
    parts = [np.argsort(rng.random((min(block, rows - start), width)), axis=1)[:, :k]
             for start in range(0, rows, block)]
    return np.concatenate(parts, axis=0) + low


def multiquery_ar(num_examples: int, seq_len: int, num_pairs: int, vocab_size: int, seed: int,
                  power_a: float = 0.01) -> MQARData:
    """MQAR examples as Zoology's ``multiquery_ar`` lays them out (see the module docstring), deterministic by seed.

    Args:
        num_examples: examples (rows), >= 1.
        seq_len: tokens per example, even, >= ``4 · num_pairs``.
        num_pairs: key–value pairs per example (each queried once), >= 1.
        vocab_size: ``V``; keys from ``[1, V/2)``, values from ``[V/2, V)``, filler from ``[0, V)``.
        seed: seeds a ``numpy.random.Generator`` (PCG64); the same seed gives the same examples.
        power_a: exponent ``a`` of the query-gap law ``p(g) ∝ a·(g+1)^(a-1)``, in (0, 1] (1 = uniform gaps).
    Returns:
        :class:`MQARData` (``inputs``, ``labels``: ``int64 [num_examples, seq_len]``).
    Raises:
        ValueError: a non-integer or too small size (named), an odd ``seq_len``, a ``vocab_size`` too small for
        ``num_pairs`` distinct keys and values, ``power_a`` outside (0, 1], or a negative ``seed``.
    Source: the MQAR task of Arora et al. 2023 (arXiv 2312.04927); ``multiquery_ar`` of HazyResearch/zoology.
    """
    check_positive_int(num_examples=num_examples)
    _check_sizes(seq_len, num_pairs, vocab_size)
    check_int_at_least(0, seed=seed)
    if isinstance(power_a, bool) or not isinstance(power_a, (int, float)) or not 0 < power_a <= 1:
        raise ValueError(f"power_a must be a number in (0, 1], got {power_a!r}")
    rng = np.random.default_rng(seed)
    half = vocab_size // 2
    context = 2 * num_pairs
    space = (seq_len - context) // 2  # query slots (every other position after the pairs)
    keys = _distinct(rng, num_examples, 1, half, num_pairs)  # [n, N] distinct keys of [1, V/2) per row
    values = _distinct(rng, num_examples, half, vocab_size, num_pairs)  # [n, N] distinct values of [V/2, V)
    # gaps: N distinct slots with p ∝ a (g+1)^(a-1), sampled without replacement (Gumbel top-k = successive draws)
    log_p = np.log(power_a) + (power_a - 1) * np.log(np.arange(1, space + 1))
    gumbel = -np.log(-np.log(rng.random((num_examples, space))))
    gaps = np.argsort(-(log_p[None, :] + gumbel), axis=1)[:, :num_pairs]  # [n, N], gap of key i in column i
    inputs = rng.integers(0, vocab_size, size=(num_examples, seq_len))  # random filler everywhere first
    inputs[:, 0:context:2], inputs[:, 1:context:2] = keys, values
    query = context + 2 * gaps  # [n, N] query positions
    rows = np.arange(num_examples)[:, None]
    inputs[rows, query] = keys
    labels = np.full((num_examples, seq_len), IGNORE_INDEX, dtype=np.int64)
    labels[rows, query] = values
    return MQARData(torch.from_numpy(inputs.astype(np.int64)), torch.from_numpy(labels))


def _check_data(inputs, labels, num_pairs: int) -> None:
    for name, t in (("inputs", inputs), ("labels", labels)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.is_floating_point():
            raise ValueError(f"{name} must be a 2-D integer tensor [num_examples, seq_len]")
    if labels.shape != inputs.shape:
        raise ValueError(f"labels must have the shape of inputs {list(inputs.shape)}, got {list(labels.shape)}")
    check_positive_int(num_pairs=num_pairs)
    if 2 * num_pairs > inputs.shape[1]:
        raise ValueError(f"num_pairs={num_pairs} pairs do not fit in seq_len={inputs.shape[1]}")


def answer_distances(inputs: torch.Tensor, labels: torch.Tensor, num_pairs: int) -> torch.Tensor:
    """For every answer (a position ``q`` with ``labels[q] != -100``), the query position and its pair's positions.

    The queried key is ``inputs[q]``; its pair is the one of the first ``2·num_pairs`` tokens whose key (even
    position ``2i``) equals it, and the value is at ``2i + 1``.

    Args:
        inputs, labels: ``int64 [num_examples, seq_len]`` as from :func:`multiquery_ar`.
        num_pairs: pairs at the start of every example.
    Returns:
        ``int64 [num_answers, 3]``: columns ``query_position, value_position, distance = query - value`` (tokens),
        answers in row-major order.
    Raises:
        ValueError: malformed tensors (named), or an answer whose query key is not among the pairs' keys.
    """
    _check_data(inputs, labels, num_pairs)
    example, query = torch.nonzero(labels != IGNORE_INDEX, as_tuple=True)  # [num_answers] each
    pair_keys = inputs[:, 0:2 * num_pairs:2]  # [n, N]
    match = pair_keys[example] == inputs[example, query][:, None]  # [num_answers, N]
    if not bool(match.any(1).all()):
        raise ValueError("inputs: an answer's query key is not one of the first num_pairs keys")
    value = 2 * match.int().argmax(1) + 1  # first matching pair's value position
    return torch.stack([query, value, query - value], dim=1)


def outside_fraction(inputs: torch.Tensor, labels: torch.Tensor, num_pairs: int, span: int,
                     kind: str = "chunk") -> float:
    """Fraction of answers whose pair lies outside the query's local region (see the module docstring).

    Args:
        inputs, labels, num_pairs: as :func:`answer_distances`.
        span: the chunk size (``kind="chunk"``, BSBR's ``chunk_size``) or window size (``kind="window"``, the
            sliding window's ``window_size``), tokens, >= 1.
        kind: ``"chunk"``: outside when the value token is in an earlier chunk (``value // span < query // span``);
            ``"own_and_previous"``: outside the own and the previous chunk (``value // span < query // span - 1``,
            the local region of BSBR's ``retrieval="blocks"``); ``"window"``: outside when the value is more than
            ``span - 1`` tokens before the query.
    Returns:
        a fraction in [0, 1] (0.0 when there is no answer).
    Raises:
        ValueError: bad ``span`` or ``kind`` (named), or as :func:`answer_distances`.
    """
    check_positive_int(span=span)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    rows = answer_distances(inputs, labels, num_pairs)
    if rows.shape[0] == 0:
        return 0.0
    query, value, distance = rows.unbind(1)
    if kind == "window":
        outside = distance > span - 1
    else:
        outside = value // span < query // span - int(kind == "own_and_previous")
    return float(outside.double().mean())


# ----------------------------------------------------------------------------- state sizes

#: The closed form of :func:`state_size` per architecture, per layer and sequence (``L`` tokens, ``D`` hidden_dim,
#: ``H`` heads, ``d = D/H``; see each layer's state class).
STATE_FORMULAS = {
    "standard": "2·L·D (every key and value: KVCache)",
    "hopfield": "2·L·D (every key and value: KVCache)",
    "sliding_window": "2·min(L, w−1)·D (the last w−1 keys and values: WindowCache)",
    "linear": "H·(d² + d) (Σφ(k)vᵀ and the normaliser Σφ(k))",
    "delta_net": "H·d² (the fast-weight memory S)",
    "bsbr": "H·c·(d² + d) + H·d² + 2·H·p·d + D with c = L // chunk, p = L % chunk (finished chunks' states K_jᵀV_j and "
            "meta-keys, the current chunk's retrieved R, its keys/values and hidden-state sum)",
    "gau": "s·E + p·(2s + E) with E = expansion·D, s = qk_dim, p = L % chunk (Σ k_linᵀv and the current chunk)",
}
#: the same for BSBR with ``retrieval="blocks"`` (``b`` = block_size, ``s`` = 2 summary vectors per block for
#: ``"minmax"``, 1 for ``"mean"``)
BLOCKS_STATE_FORMULA = ("2·L·D + H·(L // b)·s·d (every key and value, as attention's KV cache, and the finished "
                        "blocks' key summaries: BSBRBlocksState)")


def state_formula(name: str, retrieval: str = "state") -> str:
    """The per-layer state formula of architecture ``name`` (with BSBR's ``retrieval``) as text (for reports).
    Raises ValueError for an unknown ``name``, or a ``retrieval`` other than ``"state"`` for an architecture other
    than ``bsbr`` (or not one of ``bsbr.attention.RETRIEVALS``)."""
    from bsbr.attention import RETRIEVALS

    if name not in STATE_FORMULAS:
        raise ValueError(f"name must be one of {sorted(STATE_FORMULAS)}, got {name!r}")
    if retrieval not in RETRIEVALS or (retrieval != "state" and name != "bsbr"):
        raise ValueError(f"retrieval must be one of {list(RETRIEVALS)} for bsbr ('state' for the others), got "
                         f"{retrieval!r} for {name!r}")
    return BLOCKS_STATE_FORMULA if retrieval == "blocks" else STATE_FORMULAS[name]


def state_size(name: str, config: dict, seq_len: int, short_conv: int = 0) -> int:
    """Values (floats) of the recurrent state / KV cache one sequence keeps after ``seq_len`` tokens, all layers.

    Per layer (formulas in :data:`STATE_FORMULAS`, read from the layers' state classes and equal to their
    ``nbytes() / element_size`` for batch 1, checked in ``tests/test_mqar.py``):

    * ``standard``, ``hopfield``: ``2·L·D`` (:class:`bsbr.KVCache`);
    * ``sliding_window``: ``2·min(L, w−1)·D`` (the rolling :class:`~bsbr.baselines.sliding_window.WindowCache`);
    * ``linear``: ``H·(d² + d)`` (state and normaliser); ``delta_net``: ``H·d²``;
    * ``bsbr``: ``H·c·(F + d) + H·d² + 2·H·p·d + D`` (:class:`bsbr.BSBRState`: ``c = L // chunk_size`` finished
      chunk states ``F = d²`` (``d²/compression_factor`` compressed) with meta-keys, the current chunk's retrieved
      ``R``, its ``p = L % chunk_size`` keys and values and its hidden-state sum);
    * ``gau``: ``s·E + p·(2s + E)`` (:class:`~bsbr.baselines.gau.GAUState`);
    * ``bsbr`` with ``retrieval="blocks"`` in ``config``: ``2·L·D + H·(L // block_size)·s·d``
      (:class:`bsbr.attention.BSBRBlocksState`: exact retrieval keeps every key and value, a KV cache like attention's,
      plus ``s`` = 2 (``"minmax"``) or 1 (``"mean"``) summary vectors per finished block).

    With ``short_conv = k > 0`` (:class:`ShortConvEmbedding`) the model also keeps the last ``min(L, k − 1)``
    token embeddings, ``min(L, k − 1)·D`` values once per model. Bytes = values × the element size (4 in float32,
    2 in bfloat16).

    Args:
        name: an architecture of ``bsbr.available_models()``.
        config: its ``bsbr.build_model`` kwargs (``hidden_dim``, ``num_heads``, ``num_layers``; the span and
            other settings default to the registry's).
        seq_len: tokens seen, >= 0.
        short_conv: kernel of the embedding convolution, 0 = none.
    Returns:
        the number of values (an int).
    Raises:
        ValueError: unknown ``name``, a config without the sizes, or a negative ``seq_len``.
    """
    from bsbr.registry import get_architecture

    arch = get_architecture(name)
    if not isinstance(config, dict) or any(key not in config for key in ("hidden_dim", "num_heads", "num_layers")):
        raise ValueError(f"config must be a dict with hidden_dim, num_heads and num_layers, got {config!r}")
    check_int_at_least(0, seq_len=seq_len, short_conv=short_conv)
    settings = {**arch.defaults, **{k: v for k, v in config.items() if k in arch.defaults}}
    D, H, layers = config["hidden_dim"], config["num_heads"], config["num_layers"]
    d, L = D // H, seq_len
    if name in ("standard", "hopfield"):
        per_layer = 2 * L * D
    elif name == "sliding_window":
        per_layer = 2 * min(L, settings["window_size"] - 1) * D
    elif name == "linear":
        per_layer = H * (d * d + d)
    elif name == "delta_net":
        per_layer = H * d * d
    elif name == "bsbr" and settings["retrieval"] == "blocks":
        parts = SUMMARIES["minmax" if settings["summary"] is None else settings["summary"]]
        per_layer = 2 * L * D + H * (L // settings["block_size"]) * parts * d
    elif name == "bsbr":
        chunk, factor = settings["chunk_size"], settings["compression_factor"]
        features = d * d if factor is None else d * d // factor
        per_layer = H * (L // chunk) * (features + d) + H * d * d + 2 * H * (L % chunk) * d + D
    elif name == "gau":
        inner, qk = settings["expansion"] * D, settings["qk_dim"]
        per_layer = qk * inner + (L % settings["chunk_size"]) * (2 * qk + inner)
    else:  # a newly registered architecture must add its formula here
        raise ValueError(f"name {name!r} has no state-size formula; add one to bsbr.mqar.state_size")
    return layers * per_layer + (min(L, short_conv - 1) * D if short_conv else 0)


# ----------------------------------------------------------------------------- model


class ShortConvEmbedding(nn.Module):
    """Token embedding plus a short causal depthwise convolution over the embeddings.

    ``e = tokens(ids)``: ``[batch, L, D]``; output ``e_t + Σ_{j<k} w_j ⊙ e_{t-j} + b`` (per channel, ``k =
    kernel_size``): position ``t`` sees tokens ``t-k+1 .. t`` only. The convolution's weights start small
    (``N(0, 0.02²)``, bias 0), so the model starts as the plain embedding. ``tokens`` is kept as the given module, so a
    head tied to its weight stays tied.

    Source: the short convolution Zoology puts beside every sequence mixer (Arora et al. 2023, arXiv 2312.04927;
    ``BaseConv`` of HazyResearch/zoology, kernel 3), here once, on the embeddings.

    Raises:
        ValueError: ``kernel_size`` not an integer >= 2, or ``tokens`` not an ``nn.Embedding``.
    """

    def __init__(self, tokens: nn.Embedding, kernel_size: int = 3):
        super().__init__()
        if not isinstance(tokens, nn.Embedding):
            raise ValueError(f"tokens must be an nn.Embedding, got {type(tokens).__name__}")
        check_int_at_least(2, kernel_size=kernel_size)
        width = tokens.embedding_dim
        self.tokens, self.kernel_size = tokens, kernel_size
        self.conv = nn.Conv1d(width, width, kernel_size, groups=width, padding=kernel_size - 1)
        nn.init.normal_(self.conv.weight, std=0.02)
        nn.init.zeros_(self.conv.bias)

    @property
    def weight(self) -> torch.Tensor:
        """The token embedding matrix ``[vocab_size, D]`` (what a tied head reads)."""
        return self.tokens.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[batch, L]`` ids -> ``[batch, L, D]``."""
        embedded = self.tokens(input_ids)  # [batch, L, D]
        mixed = self.conv(embedded.transpose(1, 2))[..., :input_ids.shape[1]]  # [batch, D, L]: causal (left) padding
        return embedded + mixed.transpose(1, 2)


def build_mqar_lm(name: str, config: dict, seed: int = 0, dtype: str = "float32", short_conv: int = 3):
    """:func:`bsbr.training.build_lm` (``CausalLM`` on ``build_model(name, **config)``, tied head, weights drawn after
    ``torch.manual_seed(seed)``) with its token embedding wrapped in a :class:`ShortConvEmbedding` of kernel
    ``short_conv`` (drawn after the model); ``short_conv = 0`` leaves the model as ``build_lm`` makes it.
    Raises ValueError as ``build_model`` and for ``short_conv`` not 0 or >= 2."""
    from bsbr.training import build_lm

    if short_conv != 0:
        check_int_at_least(2, short_conv=short_conv)
    lm = build_lm(name, config, seed, dtype)
    if short_conv:
        lm.model.embed_tokens = ShortConvEmbedding(lm.model.embed_tokens, short_conv)
    return lm


# ----------------------------------------------------------------------------- training and evaluation


def _batches(data: MQARData, batch_size: int):
    for start in range(0, data.inputs.shape[0], batch_size):
        yield data.inputs[start:start + batch_size], data.labels[start:start + batch_size]


@torch.no_grad()
def evaluate_mqar(lm, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 256,
                  device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> tuple[int, int, float]:
    """Answers a model gets right: argmax of the logits at each query position equals the label.

    Args:
        lm: a :class:`bsbr.CausalLM` (evaluated in eval mode, then put back in its previous mode).
        inputs, labels: ``int64 [num_examples, seq_len]`` (:func:`multiquery_ar`).
        batch_size: examples per forward; device, dtype: as :func:`train_mqar` (``dtype`` a torch dtype).
    Returns:
        ``(correct, answers, loss)``: answer counts and the mean cross-entropy (nats) at the answers.
    Raises:
        ValueError: malformed ``inputs``/``labels`` or ``batch_size``.
    """
    _check_data(inputs, labels, 1)
    check_positive_int(batch_size=batch_size)
    from bsbr.training import _autocast

    device = torch.device(device)
    was_training = lm.training
    lm.eval()
    correct = answers = 0
    total_loss = 0.0
    for x, y in _batches(MQARData(inputs, labels), batch_size):
        x, y = x.to(device), y.to(device)
        with _autocast(device, dtype):
            logits = lm(x).logits  # [b, seq_len, vocab]
        scored = y != IGNORE_INDEX
        correct += int((logits.argmax(-1)[scored] == y[scored]).sum())
        answers += int(scored.sum())
        total_loss += float(F.cross_entropy(logits[scored].float(), y[scored], reduction="sum"))
    lm.train(was_training)
    return correct, answers, total_loss / max(answers, 1)


@dataclass
class MQARRun:
    """What :func:`train_mqar` recorded: ``params`` (parameter count), ``history`` (one dict per evaluation:
    ``step``, ``train_loss`` (mean over the steps since the last evaluation, nats), ``val_accuracy``, ``val_loss``,
    ``elapsed_s`` (training seconds so far)), ``val_accuracy`` and ``val_correct``/``val_answers`` at the end,
    ``train_seconds`` and the trained ``model`` (a :class:`bsbr.CausalLM`, eval mode)."""

    name: str
    seed: int
    learning_rate: float
    params: int
    history: list[dict] = field(default_factory=list)
    val_correct: int = 0
    val_answers: int = 0
    val_accuracy: float = float("nan")
    train_seconds: float = 0.0
    model: torch.nn.Module | None = None


def train_mqar(name: str, config: dict, train: MQARData, validation: MQARData, steps: int, batch_size: int,
               learning_rate: float, warmup_steps: int = 10, weight_decay: float = 0.1, grad_clip: float = 1.0,
               eval_interval: int | None = None, seed: int = 0, device: str = "cpu", dtype: str = "float32",
               eval_batch_size: int = 256, short_conv: int = 3) -> MQARRun:
    """Train ``bsbr.CausalLM(bsbr.build_model(name, **config))`` with a short embedding convolution
    (:func:`build_mqar_lm`) from scratch on MQAR.

    Cross-entropy at the answer positions only (labels :data:`IGNORE_INDEX` elsewhere), AdamW (β = 0.9, 0.95;
    weight decay on matrices only, as :func:`bsbr.training.train_lm`), linear warmup then cosine decay to 10 % of
    the peak (:func:`bsbr.training.learning_rate_at`), gradient-norm clipping. Step ``s`` trains on examples
    ``[(s·batch_size) mod n, ...)`` of ``train`` (epochs in order; draw ``train`` with its own seed), weights drawn
    after ``torch.manual_seed(seed)``.

    Args:
        name, config: architecture and its ``build_model`` kwargs (``vocab_size`` >= the data's tokens).
        train, validation: :class:`MQARData`; ``train`` holds >= ``batch_size`` examples.
        steps, batch_size: optimizer steps and examples per step (>= 1).
        learning_rate: peak rate (> 0); warmup_steps: ``0 <= warmup_steps < steps``; weight_decay >= 0;
            grad_clip > 0.
        eval_interval: validation accuracy every this many steps (and at the end); None: only at the end.
        seed: weights (``torch.manual_seed``); device, dtype: as :func:`bsbr.training.resolve_device_dtype`.
        eval_batch_size: examples per evaluation forward.
        short_conv: kernel of the :class:`ShortConvEmbedding` (0: the plain ``build_lm`` model).
    Returns:
        :class:`MQARRun` (the final validation accuracy in ``val_accuracy``).
    Raises:
        ValueError: a bad argument (named) before any training; RuntimeError: a non-finite loss.
    Source: the task and its training recipe: Arora et al. 2023 (arXiv 2312.04927); AdamW: Loshchilov & Hutter
    2019 (arXiv 1711.05101).
    """
    from bsbr.training import (_autocast, adamw, check_optimizer_settings, learning_rate_at, optimizer_step,
                               resolve_device_dtype)

    check_positive_int(steps=steps, batch_size=batch_size, eval_batch_size=eval_batch_size)
    check_int_at_least(0, warmup_steps=warmup_steps, seed=seed)
    if eval_interval is not None:
        check_positive_int(eval_interval=eval_interval)
    check_optimizer_settings(steps, warmup_steps, learning_rate, weight_decay, grad_clip)
    for key, data in (("train", train), ("validation", validation)):
        if not isinstance(data, MQARData):
            raise ValueError(f"{key} must be an MQARData (from multiquery_ar), got {type(data).__name__}")
        _check_data(data.inputs, data.labels, 1)
        if int(data.inputs.max()) >= config.get("vocab_size", 0):
            raise ValueError(f"config: vocab_size must exceed the largest token of {key} ({int(data.inputs.max())})")
    if train.inputs.shape[0] < batch_size:
        raise ValueError(f"train holds {train.inputs.shape[0]} examples, fewer than batch_size={batch_size}")
    torch_device, torch_dtype = resolve_device_dtype(device, dtype)

    lm = build_mqar_lm(name, config, seed, dtype, short_conv).to(torch_device).train()
    optimizer = adamw(lm, learning_rate, weight_decay)
    scaler = torch.amp.GradScaler(torch_device.type, enabled=torch_dtype == torch.float16)
    run = MQARRun(name=name, seed=seed, learning_rate=learning_rate, params=sum(p.numel() for p in lm.parameters()))
    n = train.inputs.shape[0]
    elapsed, losses = 0.0, []
    for step in range(steps):
        lr = learning_rate_at(step, steps, learning_rate, warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = (torch.arange(batch_size) + step * batch_size) % n  # [batch]
        x, y = train.inputs[index].to(torch_device), train.labels[index].to(torch_device)  # [batch, seq_len]
        started = time.perf_counter()
        with _autocast(torch_device, torch_dtype):
            logits = lm(x).logits  # [batch, seq_len, vocab]
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)
        optimizer_step(lm, loss, optimizer, scaler, grad_clip)
        value = float(loss.detach())
        elapsed += time.perf_counter() - started
        if not math.isfinite(value):
            raise RuntimeError(f"{name} seed {seed}: MQAR loss became {value} at step {step + 1} "
                               f"(learning_rate={learning_rate})")
        losses.append(value)
        if (eval_interval is not None and (step + 1) % eval_interval == 0) or step + 1 == steps:
            correct, answers, val_loss = evaluate_mqar(lm, *validation, eval_batch_size, torch_device, torch_dtype)
            run.history.append({"step": step + 1, "train_loss": sum(losses) / len(losses),
                                "val_accuracy": correct / answers, "val_loss": val_loss, "elapsed_s": elapsed})
            losses = []
            run.val_correct, run.val_answers, run.val_accuracy = correct, answers, correct / answers
    run.train_seconds = elapsed
    run.model = lm.eval()
    return run


def _train_mqar_entry(threads: int, **kwargs) -> bytes:
    """One :func:`train_mqar` run on ``threads`` threads (the body of a :func:`train_mqar_runs` worker process), as
    plain pickle bytes: multiprocessing would send the model's tensors as shared-memory handles, which vanish when
    this process exits."""
    torch.set_num_threads(threads)
    return pickle.dumps(train_mqar(**kwargs))


def train_mqar_runs(jobs: list[dict], train: MQARData, validation: MQARData, workers: int = 1, threads: int = 1,
                    progress: str | None = None) -> list[MQARRun]:
    """:func:`train_mqar` for every job, ``workers`` runs at a time, each on ``threads`` threads.

    The models of this task are small (hidden size 64): one run gains almost nothing from a second thread (on the
    2-core reference machine 300 steps took ~23 s on two threads and ~19 s on one, beside other work), so
    independent runs side by side use the cores instead. With ``workers > 1`` every run trains in its own process
    (:func:`bsbr.measure.run_isolated`: a fork server that has imported torch and bsbr) and its :class:`MQARRun`,
    trained model included, is sent back; with ``workers == 1`` they run one after another in this process, with
    torch's thread count set to ``threads`` for the duration. A run's result depends only on its job and
    ``threads`` (the same seed, data and arithmetic), not on ``workers``.

    Args:
        jobs: keyword arguments of :func:`train_mqar` without ``train``/``validation`` (``name``, ``config``,
            ``steps``, ``batch_size``, ``learning_rate``, ``seed``, ...).
        train, validation: :class:`MQARData`, shared by every job.
        workers: runs at a time (>= 1); threads: torch threads per run (>= 1).
        progress: a tqdm description, or None for no progress bar (tqdm writes to stderr).
    Returns:
        one :class:`MQARRun` per job, in the order of ``jobs``.
    Raises:
        ValueError: ``workers``/``threads`` not a positive int, or a job that is not a dict or names
        ``train``/``validation``; RuntimeError: a run failed (its traceback tail and the job in the message).
    """
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from tqdm.auto import tqdm

    from bsbr.measure import run_isolated

    check_positive_int(workers=workers, threads=threads)
    for i, job in enumerate(jobs):
        if not isinstance(job, dict) or {"train", "validation"} & set(job):
            raise ValueError(f"jobs[{i}] must be a dict of train_mqar arguments without train/validation, got {job!r}")
    bar = tqdm(total=len(jobs), desc=progress, mininterval=10.0, disable=progress is None)
    results: list[MQARRun | None] = [None] * len(jobs)
    if workers == 1:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for i, job in enumerate(jobs):
                results[i] = train_mqar(train=train, validation=validation, **job)
                bar.update()
        finally:
            torch.set_num_threads(before)
            bar.close()
        return results

    def one(job: dict) -> MQARRun:
        what = (f"MQAR training of {job.get('name')!r} (learning_rate={job.get('learning_rate')}, "
                f"seed={job.get('seed')})")
        return pickle.loads(run_isolated(_train_mqar_entry, dict(threads=threads, train=train, validation=validation,
                                                                 **job), what))

    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(one, job): i for i, job in enumerate(jobs)}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update()
    finally:
        bar.close()
    return results


def accuracy_interval(accuracies, correct: int | None = None, answers: int | None = None,
                      confidence: float = 0.95) -> dict:
    """Mean accuracy over seeds with its Student-t interval (clipped to [0, 1]), and optionally the Wilson interval
    of the pooled answers.

    Args:
        accuracies: one test accuracy per seed (fractions in [0, 1]).
        correct, answers: pooled answer counts over the seeds (both or neither).
        confidence: of the t interval (the Wilson interval is 95 %).
    Returns:
        ``{"accuracy", "ci_low", "ci_high", "n_seeds"}`` (t over seeds; ``nan`` bounds for one seed) plus
        ``"wilson_low", "wilson_high", "answers"`` when counts are given.
    Raises:
        ValueError: no accuracies, one outside [0, 1], or only one of ``correct``/``answers``.
    Sources: Student-t interval (``bsbr.router_recall.t_interval``); Wilson 1927 (``bsbr.analysis.wilson_interval``).
    """
    from bsbr.analysis import wilson_interval
    from bsbr.router_recall import t_interval

    values = np.asarray(list(accuracies), dtype=np.float64)
    if values.size == 0 or not np.all((values >= 0) & (values <= 1)):
        raise ValueError(f"accuracies must be a non-empty list of fractions in [0, 1], got {values.tolist()}")
    if (correct is None) != (answers is None):
        raise ValueError("correct and answers must be given together")
    mean, low, high = t_interval(values, confidence)
    result = {"accuracy": mean, "ci_low": max(0.0, low) if math.isfinite(low) else low,
              "ci_high": min(1.0, high) if math.isfinite(high) else high, "n_seeds": int(values.size)}
    if correct is not None:
        result["wilson_low"], result["wilson_high"] = wilson_interval(int(correct), int(answers))
        result["answers"] = int(answers)
    return result
