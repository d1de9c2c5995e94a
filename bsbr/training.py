"""Training small causal language models of every registered architecture from scratch, and the memory of one
training step.

Used by ``notebooks/07_training.ipynb``::

    train = encode_bytes(load_split("data/corpus", "train"))             # uint8 [n_bytes]
    val = evaluation_windows(encode_bytes(load_split("data/corpus", "validation")), 128, 16)  # [16, 128]
    config = model_config("bsbr", hidden_dim=64, num_layers=2, num_heads=4, ff_dim=256, chunk_size=32)
    run = train_lm("bsbr", config, train, val, steps=150, batch_size=8, seq_len=128, seed=0)
    run.history, run.evals                                                # lists of dicts (rows of a CSV)
    measure_train_step_memory("bsbr", config, seq_len=4096)               # one step, in a fresh process
    ngram_floors(train, val, orders=(1, 2, 3))                            # count n-gram losses on the same bytes
    matched_ff_dims(["bsbr", "gau"], 64, 2, 4, ff_dim=256, chunk_size=32)  # ff_dim per model, params within 5 %

Tokenizer: bytes. Text is UTF-8 encoded and every byte is a token (``vocab_size`` :data:`BYTE_VOCAB_SIZE` = 256);
documents are joined with the byte :data:`EOS_BYTE` (0x00, NUL, which the corpus does not contain) as the
end-of-document token. No tokenizer is trained, so every architecture sees exactly the same token stream, and a
loss in nats per token is a loss per byte (bits per byte = loss / ln 2).

Model: :class:`bsbr.CausalLM` (tied LM head) on the trunk of ``bsbr.build_model(name, **config)``; the
architectures differ only in the attention layer of each pre-norm block (see :mod:`bsbr.model`).

Optimisation: AdamW (Loshchilov & Hutter 2019, arXiv 1711.05101), linear warmup then cosine decay to 10 % of the
peak learning rate, gradient-norm clipping; no dropout. Batches are random windows of the training byte stream
drawn from a generator seeded with ``seed``, so for a given seed every architecture sees the same batches in the
same order, and its weights are initialised after ``torch.manual_seed(seed)``.

Devices: ``device`` is any torch device string that is available here (``"cpu"``, ``"cuda"``, ``"cuda:1"``,
``"mps"``); ``dtype`` is the compute dtype: ``"float32"`` (plain fp32), or ``"bfloat16"`` / ``"float16"``
mixed precision (weights and optimizer state stay fp32, matrix products run under ``torch.autocast``; ``float16``
uses a gradient scaler and needs a CUDA device). Under mixed precision the attention layers of
:data:`FP32_ATTENTION` (DeltaNet, GAU: ops without autocast support) run in fp32.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np
import torch

from bsbr._checks import check_int_at_least, check_positive_int
from bsbr.measure import check_threads_timeout, memory_baseline, memory_peak, run_isolated, set_threads

__all__ = ["BYTE_VOCAB_SIZE", "DTYPES", "EOS_BYTE", "NGRAM_ALPHAS", "NGRAM_NAMES", "ByteNgram", "TrainingRun",
           "encode_bytes", "evaluation_windows", "FP32_ATTENTION", "evaluate", "learning_rate_at", "matched_ff_dim",
           "matched_ff_dims", "measure_train_step_memory", "model_config", "ngram_floors", "parameter_count",
           "random_windows", "resolve_device_dtype", "steps_to_reach", "train_lm", "build_lm", "adamw",
           "check_optimizer_settings", "optimizer_step"]

#: Byte-level vocabulary: every UTF-8 byte value is a token.
BYTE_VOCAB_SIZE = 256
#: End-of-document token between documents of the byte stream (NUL; not in the corpus text).
EOS_BYTE = 0
#: ``dtype`` names accepted by :func:`resolve_device_dtype`.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_FINAL_LR_FRACTION = 0.1  # cosine decay ends at 10 % of the peak learning rate
#: Attention layers that run in fp32 under mixed precision, because they fail under ``torch.autocast``:
#: DeltaNet's chunkwise delta rule solves a triangular system (``torch.linalg.solve_triangular`` has no bfloat16
#: CPU kernel) and GAU's no-grad path writes into preallocated fp32 buffers (``torch.mm(..., out=)``).
FP32_ATTENTION = ("delta_net", "gau")


# ----------------------------------------------------------------------------- data


def encode_bytes(documents: Iterable[Mapping | str]) -> torch.Tensor:
    """The byte stream ``doc_0 EOS doc_1 EOS ... doc_last`` (UTF-8 bytes, ``EOS = EOS_BYTE``).

    Args:
        documents: dicts with a ``"text"`` key (as from :func:`bsbr.data.load_split`) or plain strings.
    Returns:
        ``uint8`` tensor ``[n_bytes]`` (token ids in ``[0, 256)``).
    Raises:
        ValueError: no documents, or a document whose text contains the EOS byte (NUL).
    """
    pieces = []
    for doc in documents:
        text = doc if isinstance(doc, str) else doc["text"]
        data = text.encode("utf-8")
        if bytes([EOS_BYTE]) in data:
            raise ValueError("documents: a text contains the NUL byte, which is the EOS token of the byte stream")
        if pieces:
            pieces.append(bytes([EOS_BYTE]))
        pieces.append(data)
    if not pieces:
        raise ValueError("documents must hold at least one document")
    return torch.frombuffer(bytearray(b"".join(pieces)), dtype=torch.uint8)  # [n_bytes]


def _check_stream(stream, seq_len: int) -> None:
    if not isinstance(stream, torch.Tensor) or stream.dim() != 1 or stream.is_floating_point():
        raise ValueError("stream must be a 1-D integer tensor of token ids (see encode_bytes)")
    if stream.numel() < seq_len:
        raise ValueError(f"seq_len: the stream holds {stream.numel()} tokens, fewer than seq_len={seq_len}")


def random_windows(stream: torch.Tensor, seq_len: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """``batch_size`` windows of ``seq_len`` consecutive tokens at uniformly random offsets of ``stream``.

    Args:
        stream: 1-D integer tensor ``[n_tokens]`` (e.g. from :func:`encode_bytes`), ``n_tokens >= seq_len``.
        seq_len, batch_size: window length and count (positive integers).
        generator: a seeded ``torch.Generator``; the offsets depend only on it (reproducible batches).
    Returns:
        ``int64`` tensor ``[batch_size, seq_len]`` on the stream's device.
    Raises:
        ValueError: bad sizes, or a stream that is not 1-D integer or shorter than ``seq_len``.
    """
    check_positive_int(seq_len=seq_len, batch_size=batch_size)
    _check_stream(stream, seq_len)
    starts = torch.randint(0, stream.numel() - seq_len + 1, (batch_size,), generator=generator)  # [batch]
    index = starts[:, None] + torch.arange(seq_len)[None, :]  # [batch, seq_len]
    return stream[index.to(stream.device)].long()


def evaluation_windows(stream: torch.Tensor, seq_len: int, num_windows: int) -> torch.Tensor:
    """``num_windows`` non-overlapping windows of ``seq_len`` tokens spread evenly over ``stream`` (a fixed
    evaluation set that samples the whole split, not only its first document): window ``i`` is tokens
    ``[i * stride, i * stride + seq_len)`` with ``stride = n_tokens // num_windows``.

    Returns ``int64`` ``[num_windows, seq_len]``. Raises ValueError when the stream holds fewer than
    ``num_windows * seq_len`` tokens (both counts in the message) or the sizes are not positive integers.
    """
    check_positive_int(seq_len=seq_len, num_windows=num_windows)
    _check_stream(stream, seq_len)
    needed = seq_len * num_windows
    if stream.numel() < needed:
        raise ValueError(f"num_windows: {num_windows} windows of {seq_len} tokens need {needed} tokens, the stream "
                         f"holds {stream.numel()}")
    stride = stream.numel() // num_windows  # >= seq_len: windows do not overlap
    index = torch.arange(num_windows)[:, None] * stride + torch.arange(seq_len)[None, :]  # [num_windows, seq_len]
    return stream[index.to(stream.device)].long()


def steps_to_reach(steps, losses, target: float) -> float | None:
    """First step at which a loss curve reaches ``target`` (linear interpolation between evaluations).

    Args:
        steps: increasing evaluation steps (e.g. ``[0, 10, 20, ...]``); losses: the loss at each, same length.
        target: the loss to reach (``loss <= target``).
    Returns:
        the interpolated step (a float; ``steps[0]`` if the first loss already reaches it), or None if no loss
        reaches it.
    Raises:
        ValueError: empty or unequal lengths, or steps not strictly increasing.
    """
    steps, losses = [float(x) for x in steps], [float(x) for x in losses]
    if not steps or len(steps) != len(losses):
        raise ValueError(f"steps and losses must be non-empty and of equal length, got {len(steps)} and {len(losses)}")
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError("steps must be strictly increasing")
    if losses[0] <= target:
        return steps[0]
    for (s0, l0), (s1, l1) in zip(zip(steps, losses), zip(steps[1:], losses[1:])):
        if l1 <= target:
            return s0 + (s1 - s0) * (l0 - target) / (l0 - l1)  # l0 > target >= l1
    return None


# ----------------------------------------------------------------------------- n-gram floors

#: Concentrations ``alpha`` tried per order by :func:`ngram_floors` (chosen on a held-out tail of the training bytes).
NGRAM_ALPHAS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0)
#: Names of the n-gram orders in tables.
NGRAM_NAMES = {1: "unigram", 2: "bigram", 3: "trigram", 4: "4-gram", 5: "5-gram"}


def _as_numpy_tokens(tokens, name: str) -> np.ndarray:
    array = tokens.detach().cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
    if array.dtype.kind not in "iu" or array.size == 0:
        raise ValueError(f"{name} must be a non-empty integer tensor of byte ids, got dtype {array.dtype}")
    if int(array.min()) < 0 or int(array.max()) >= BYTE_VOCAB_SIZE:
        raise ValueError(f"{name} must hold byte ids in [0, {BYTE_VOCAB_SIZE}), got [{array.min()}, {array.max()}]")
    return array.astype(np.int64)


def _codes(array: np.ndarray, n: int) -> np.ndarray:
    """Base-256 codes of the n-grams ending at positions ``n-1 ..`` of the last axis: ``[..., length - n + 1]``."""
    length = array.shape[-1]
    code = np.zeros(array.shape[:-1] + (length - n + 1,), dtype=np.int64)
    for j in range(n):
        code = code * BYTE_VOCAB_SIZE + array[..., j:length - n + 1 + j]
    return code


class ByteNgram:
    """Count n-gram model of a byte stream, each order smoothed toward the one below (additive smoothing with the
    lower order as prior: MacKay & Peto 1995, "A hierarchical Dirichlet language model", Natural Language
    Engineering 1(3))::

        P_0(x) = 1/256
        P_n(x | h) = (c(h x) + alpha_n · P_{n-1}(x | h')) / (c(h) + alpha_n)

    ``h`` is the ``n-1`` bytes before ``x``, ``h'`` its last ``n-2``; ``c(h x)`` counts the n-gram in the stream and
    ``c(h) = Σ_x c(h x)`` (so ``P_1(x) = (c(x) + alpha_1/256) / (N + alpha_1)`` with ``N`` bytes). An unseen context
    falls back to the lower order exactly. Counts are kept for every order up to ``order``; ``alphas`` are given when
    scoring, so one set of counts serves every smoothing.

    Args:
        stream: 1-D integer tensor/array of byte ids ``[n_bytes]``, ``n_bytes >= order``.
        order: highest order (1 = unigram, 2 = bigram, 3 = trigram, ...; at most 7).
    Raises:
        ValueError: ``order`` not an integer in [1, 7], or a stream that is not byte ids or shorter than ``order``.
    """

    def __init__(self, stream, order: int):
        check_positive_int(order=order)
        if order > 7:
            raise ValueError(f"order must be at most 7 (codes are int64), got {order}")
        array = _as_numpy_tokens(stream, "stream").ravel()
        if array.size < order:
            raise ValueError(f"stream: {array.size} bytes hold no {order}-gram")
        self.order = order
        self.tables = []  # per order n: (sorted n-gram codes, counts, sorted context codes, context counts)
        for n in range(1, order + 1):
            codes, counts = np.unique(_codes(array, n), return_counts=True)
            contexts, inverse = np.unique(codes // BYTE_VOCAB_SIZE, return_inverse=True)
            context_counts = np.bincount(inverse.ravel(), weights=counts, minlength=len(contexts))
            self.tables.append((codes, counts.astype(np.float64), contexts, context_counts))

    @staticmethod
    def _lookup(keys: np.ndarray, values: np.ndarray, query: np.ndarray) -> np.ndarray:
        index = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
        return np.where(keys[index] == query, values[index], 0.0)

    def nll(self, windows, alphas) -> np.ndarray:
        """Negative log-likelihood (nats) of every byte but the first of each window, as a model scoring it sees it:
        position ``t`` is predicted from the bytes before it *in its window*, by the order-``min(order, t+1)``
        model (the first positions have fewer bytes of context).

        Args:
            windows: integer byte ids ``[num_windows, seq_len >= 2]`` (e.g. :func:`evaluation_windows`).
            alphas: ``alpha_1 .. alpha_order``, each a number > 0.
        Returns:
            ``float64 [num_windows, seq_len - 1]`` (nats; mean = loss per byte).
        Raises:
            ValueError: bad ``windows`` or ``alphas`` (named).
        """
        array = _as_numpy_tokens(windows, "windows")
        if array.ndim != 2 or array.shape[1] < 2:
            raise ValueError(f"windows must be [num_windows, seq_len >= 2], got shape {list(array.shape)}")
        alphas = list(alphas)
        if len(alphas) != self.order or any(isinstance(a, bool) or not isinstance(a, (int, float, np.floating))
                                            or not a > 0 for a in alphas):
            raise ValueError(f"alphas must be {self.order} numbers > 0 (one per order), got {alphas!r}")
        num_windows, length = array.shape
        prob = np.full((num_windows, length), 1.0 / BYTE_VOCAB_SIZE)  # P_0
        chosen = prob.copy()  # P_min(order, t+1) at position t
        for n, (alpha, (codes, counts, contexts, context_counts)) in enumerate(zip(alphas, self.tables), start=1):
            if n > length:
                break
            code = _codes(array, n)  # [num_windows, length - n + 1]: the n-gram ending at position n-1+i
            joint = self._lookup(codes, counts, code)
            context = self._lookup(contexts, context_counts, code // BYTE_VOCAB_SIZE)
            lower = prob[:, n - 1:].copy()
            prob = np.full((num_windows, length), np.nan)
            prob[:, n - 1:] = (joint + alpha * lower) / (context + alpha)
            chosen[:, n - 1:] = prob[:, n - 1:]  # the highest order available at each position wins
        return -np.log(chosen[:, 1:])


def ngram_floors(train_stream, val_windows, orders=(1, 2, 3), alphas=NGRAM_ALPHAS,
                 holdout_fraction: float = 0.1) -> list[dict]:
    """Validation loss of count n-gram byte models (:class:`ByteNgram`) estimated on the training bytes and scored on
    the positions a trained model is scored on (:func:`evaluate`: every byte of ``val_windows`` but the first of each
    window, context from inside the window): the floors a trained language model should pass.

    Smoothing: ``alpha_n`` of each order is chosen from ``alphas`` by the loss on the last ``holdout_fraction`` of
    ``train_stream`` when counting on the rest (orders in turn, each with the lower orders' choices), then the counts
    are taken on the whole stream. The validation windows play no part in the choice.

    Args:
        train_stream: 1-D integer tensor of byte ids ``[n_bytes]`` (:func:`encode_bytes`).
        val_windows: ``[num_windows, seq_len >= 2]`` byte ids (:func:`evaluation_windows`).
        orders: distinct orders to report (integers in [1, 7]); alphas: the grid (numbers > 0).
        holdout_fraction: in (0, 0.5].
    Returns:
        one dict per order, ascending: ``order``, ``name`` (``"bigram"``), ``alpha`` (its chosen concentration),
        ``alphas`` (the chain ``alpha_1 .. alpha_n``), ``holdout_loss``, ``val_loss`` (nats/byte), ``val_ppl``,
        ``val_bpb``, ``scored`` (bytes scored), ``train_bytes``.
    Raises:
        ValueError: bad ``orders``, ``alphas``, ``holdout_fraction`` or data (named).
    """
    orders = sorted(orders) if isinstance(orders, (list, tuple)) else orders
    if (not isinstance(orders, list) or not orders or len(set(orders)) != len(orders) or any(
            isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 7 for n in orders)):
        raise ValueError(f"orders must be distinct integers in [1, 7], got {orders!r}")
    alphas = list(alphas)
    if not alphas or any(isinstance(a, bool) or not isinstance(a, (int, float)) or not a > 0 for a in alphas):
        raise ValueError(f"alphas must be a non-empty list of numbers > 0, got {alphas!r}")
    if isinstance(holdout_fraction, bool) or not isinstance(holdout_fraction, (int, float)) or not (
            0 < holdout_fraction <= 0.5):
        raise ValueError(f"holdout_fraction must be a number in (0, 0.5], got {holdout_fraction!r}")
    stream = _as_numpy_tokens(train_stream, "train_stream").ravel()
    windows = _as_numpy_tokens(val_windows, "val_windows")
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"val_windows must be [num_windows, seq_len >= 2], got shape {list(windows.shape)}")
    top = orders[-1]
    split = int(round(stream.size * (1 - holdout_fraction)))
    if split < top or stream.size - split < 2:
        raise ValueError(f"train_stream: {stream.size} bytes are too few to hold out {holdout_fraction} of them")
    head, tail = ByteNgram(stream[:split], top), stream[split:][None, :]  # tail: one window [1, n_tail]
    chosen, holdout = [], {}
    for n in range(1, top + 1):  # each order's alpha given the lower orders' choices
        part = ByteNgram.__new__(ByteNgram)
        part.order, part.tables = n, head.tables[:n]
        losses = {a: float(part.nll(tail, chosen + [a]).mean()) for a in alphas}
        best = min(alphas, key=lambda a: (losses[a], a))
        chosen.append(best)
        holdout[n] = losses[best]
    full = ByteNgram(stream, top)
    rows = []
    for n in orders:
        part = ByteNgram.__new__(ByteNgram)
        part.order, part.tables = n, full.tables[:n]
        nll = part.nll(windows, chosen[:n])
        loss = float(nll.mean())
        rows.append({"order": n, "name": NGRAM_NAMES.get(n, f"{n}-gram"), "alpha": chosen[n - 1],
                     "alphas": list(chosen[:n]), "holdout_loss": holdout[n], "val_loss": loss,
                     "val_ppl": math.exp(loss), "val_bpb": loss / math.log(2), "scored": int(nll.size),
                     "train_bytes": int(stream.size)})
    return rows


# ----------------------------------------------------------------------------- models, devices, schedule


def model_config(name: str, hidden_dim: int, num_layers: int, num_heads: int, ff_dim: int, chunk_size: int,
                 vocab_size: int = BYTE_VOCAB_SIZE) -> dict:
    """``bsbr.build_model`` keyword arguments giving architecture ``name`` the common sizes.

    ``chunk_size`` is the one locality length, given to the setting the architecture's registry record names as its
    span (``Architecture.span_setting``): the chunk of ``bsbr``, ``linear``, ``delta_net`` and ``gau``, the
    ``window_size`` of ``sliding_window``; ``standard`` and ``hopfield`` have none. Every other
    architecture-specific setting keeps its registry default (e.g. GAU's ``qk_dim=128, expansion=2``), so
    parameter counts differ slightly between architectures (count them with :func:`build_lm`).

    Raises ValueError for an unknown ``name`` or sizes that are not positive integers.
    """
    import bsbr

    if name not in bsbr.available_models():
        raise ValueError(f"name must be one of {bsbr.available_models()}, got {name!r}")
    check_positive_int(hidden_dim=hidden_dim, num_layers=num_layers, num_heads=num_heads, ff_dim=ff_dim,
                       chunk_size=chunk_size, vocab_size=vocab_size)
    config = dict(vocab_size=vocab_size, hidden_dim=hidden_dim, num_layers=num_layers, num_heads=num_heads,
                  ff_dim=ff_dim)
    span_setting = bsbr.get_architecture(name).span_setting
    if span_setting is not None:
        config[span_setting] = chunk_size
    return config


class _Float32Attention(torch.nn.Module):
    """Runs the wrapped attention layer with autocast off, on an fp32 input (see :data:`FP32_ATTENTION`)."""

    def __init__(self, attention: torch.nn.Module):
        super().__init__()
        self.inner = attention

    def forward(self, hidden_states, *args, **kwargs):
        with torch.autocast(hidden_states.device.type, enabled=False):
            return self.inner(hidden_states.float(), *args, **kwargs)


def build_lm(name: str, config: dict, seed: int = 0, dtype: str = "float32"):
    """``bsbr.CausalLM(bsbr.build_model(name, **config))`` (tied LM head) with weights drawn after
    ``torch.manual_seed(seed)``. With a reduced-precision ``dtype`` the attention layers of the architectures in
    :data:`FP32_ATTENTION` are wrapped to run in fp32 (same weights, same initialisation).
    Raises ValueError as :func:`bsbr.build_model`."""
    import bsbr

    torch.manual_seed(seed)
    lm = bsbr.CausalLM(bsbr.build_model(name, **config))
    if dtype != "float32" and name in FP32_ATTENTION:
        for layer in lm.model.layers:
            layer.attention = _Float32Attention(layer.attention)
    return lm


def parameter_count(name: str, config: dict) -> int:
    """Parameters of ``bsbr.CausalLM(bsbr.build_model(name, **config))`` (tied head counted once)."""
    return sum(p.numel() for p in build_lm(name, config).parameters())


def matched_ff_dims(names, hidden_dim: int, num_layers: int, num_heads: int, ff_dim: int, chunk_size: int,
                    reference: str = "standard", tolerance: float = 0.05,
                    vocab_size: int = BYTE_VOCAB_SIZE) -> dict[str, dict]:
    """Per-architecture feed-forward width that brings each model's parameter count to the reference's.

    Width, depth, heads and the locality length stay common; only ``ff_dim`` (the feed-forward width of every
    block) moves. The reference count is ``reference`` at ``ff_dim``. A model's count is affine in ``ff_dim``
    (``2·D + 1`` weights per unit and block), so the width is solved from the counts at ``ff_dim`` and ``ff_dim + 1``,
    rounded to the nearest integer, and checked by building the model.

    Args:
        names: architectures of ``bsbr.available_models()``; the other sizes as :func:`model_config`.
        reference: the architecture whose count at ``ff_dim`` is the target (need not be in ``names``).
        tolerance: the largest relative difference allowed, ``|params / reference_params - 1|`` (in (0, 1)).
    Returns:
        ``{name: {"ff_dim", "params", "relative_difference"}}`` in the order of ``names``; ``"reference_params"``
        is in each entry too.
    Raises:
        ValueError: unknown names, bad sizes or ``tolerance`` (named), or an architecture whose count cannot come
            within ``tolerance`` by its feed-forward width (the message gives the closest count).
    """
    _check_tolerance(tolerance)
    names = list(names)
    sizes = dict(hidden_dim=hidden_dim, num_layers=num_layers, num_heads=num_heads, chunk_size=chunk_size,
                 vocab_size=vocab_size)
    target = parameter_count(reference, model_config(reference, ff_dim=ff_dim, **sizes))
    return {name: matched_ff_dim(name, lambda width, name=name: model_config(name, ff_dim=width, **sizes), ff_dim,
                                 target, tolerance, reference)
            for name in names}


def _check_tolerance(tolerance) -> None:
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 < tolerance < 1:
        raise ValueError(f"tolerance must be a number in (0, 1), got {tolerance!r}")


def matched_ff_dim(name: str, config_at, ff_dim: int, target: int, tolerance: float = 0.05,
                   reference: str = "the reference") -> dict:
    """The feed-forward width that brings one model's parameter count to ``target`` (:func:`matched_ff_dims` for
    one architecture whose config is not :func:`model_config`'s alone, e.g. BSBR with ``retrieval="blocks"``).

    Args:
        name: the registered architecture; config_at: ``width -> config`` of that model with feed-forward width
            ``width``; ff_dim: the width to start from; target: the parameter count to reach; tolerance: as
            :func:`matched_ff_dims`; reference: its name, for the error message.
    Returns:
        ``{"ff_dim", "params", "relative_difference", "reference_params"}``.
    Raises:
        ValueError: ``tolerance`` not in (0, 1), or no width within ``tolerance`` (the message gives the closest).
    """
    _check_tolerance(tolerance)
    at = parameter_count(name, config_at(ff_dim))
    slope = parameter_count(name, config_at(ff_dim + 1)) - at
    width = max(1, round(ff_dim + (target - at) / slope)) if slope > 0 else ff_dim
    params = parameter_count(name, config_at(width))
    difference = params / target - 1
    if abs(difference) > tolerance:
        raise ValueError(f"ff_dim: {name} cannot be matched to {reference}'s {target:,} parameters within "
                         f"{tolerance:.0%} by its feed-forward width (closest: {params:,} at ff_dim={width})")
    return {"ff_dim": width, "params": params, "relative_difference": difference, "reference_params": target}


def resolve_device_dtype(device: str = "cpu", dtype: str = "float32") -> tuple[torch.device, torch.dtype]:
    """Check a device and a compute-dtype name before any work.

    Args:
        device: a torch device string available on this machine (``"cpu"``, ``"cuda"``, ``"cuda:0"``, ``"mps"``).
        dtype: one of :data:`DTYPES` (``"float32"``, ``"bfloat16"``, ``"float16"``).
    Returns:
        ``(torch.device, torch.dtype)``.
    Raises:
        ValueError: an unparsable or unavailable device (the message says what is available), an unknown dtype,
        or ``float16`` on a non-CUDA device.
    """
    if not isinstance(device, str):
        raise ValueError(f"device must be a string such as 'cpu' or 'cuda', got {device!r}")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"device {device!r} is not a torch device string ('cpu', 'cuda', 'cuda:0', 'mps'): "
                         f"{error}") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (resolved.index is not None and resolved.index >= count):
            build = ("" if torch.version.cuda else
                     f"; this torch ({torch.__version__}) is a CPU-only build: CUDA needs torch's CUDA build")
            raise ValueError(f"device {device!r} is not available here (CUDA devices: {count}{build}); use 'cpu'")
    elif resolved.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError(f"device {device!r} is not available here; use 'cpu'")
    elif resolved.type != "cpu":
        raise ValueError(f"device must be 'cpu', 'cuda[:index]' or 'mps', got {device!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if dtype == "float16" and resolved.type != "cuda":
        raise ValueError("dtype 'float16' (mixed precision with a gradient scaler) needs a CUDA device; "
                         "use 'bfloat16' or 'float32' on " + resolved.type)
    return resolved, DTYPES[dtype]


def _autocast(device: torch.device, dtype: torch.dtype):
    """Mixed-precision context for a compute dtype (a no-op for float32)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def check_optimizer_settings(steps: int, warmup_steps: int, learning_rate, weight_decay, grad_clip) -> None:
    """Raise ValueError naming the setting unless ``warmup_steps < steps``, ``learning_rate > 0``, ``grad_clip > 0``
    and ``weight_decay >= 0`` (numbers, not bools); the caller checks ``steps`` and ``warmup_steps`` are integers."""
    if warmup_steps >= steps:
        raise ValueError(f"warmup_steps must be < steps={steps}, got {warmup_steps}")
    for key, value, low in (("learning_rate", learning_rate, 0.0), ("grad_clip", grad_clip, 0.0)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > low:
            raise ValueError(f"{key} must be a number > 0, got {value!r}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")


def adamw(lm: torch.nn.Module, learning_rate: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW (β = 0.9, 0.95; Loshchilov & Hutter 2019, arXiv 1711.05101) with decoupled ``weight_decay`` on the
    matrices only (not biases, norm weights or the token embedding)."""
    decay = [p for n, p in lm.named_parameters() if p.dim() >= 2 and "embed_tokens" not in n]
    no_decay = [p for n, p in lm.named_parameters() if not (p.dim() >= 2 and "embed_tokens" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=learning_rate, betas=(0.9, 0.95))


def optimizer_step(lm: torch.nn.Module, loss: torch.Tensor, optimizer, scaler, grad_clip: float) -> None:
    """One update from ``loss``: backward (scaled by ``scaler`` for float16), global gradient-norm clipping to
    ``grad_clip``, the optimizer step, gradients cleared."""
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(lm.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def learning_rate_at(step: int, steps: int, learning_rate: float, warmup_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based) of ``steps``: linear warmup from
    ``learning_rate / warmup_steps`` to ``learning_rate`` over ``warmup_steps`` steps, then cosine decay to
    ``0.1 * learning_rate`` at the last step."""
    if step < warmup_steps:
        return learning_rate * (step + 1) / warmup_steps
    span = max(1, steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return learning_rate * (_FINAL_LR_FRACTION + (1 - _FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(lm, windows: torch.Tensor, batch_size: int = 16, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> float:
    """Mean next-token cross-entropy (nats per token) of ``lm`` over every predicted position of ``windows``.

    Args:
        lm: a :class:`bsbr.CausalLM` (put in eval mode here, and back in its previous mode afterwards).
        windows: ``int64 [num_windows, seq_len]``; positions ``1 .. seq_len-1`` of each window are scored.
        batch_size: windows per forward call; device, dtype: as in :func:`train_lm`.
    Returns:
        the loss in nats per token (perplexity = ``exp(loss)``).
    """
    check_positive_int(batch_size=batch_size)
    device = torch.device(device)
    was_training = lm.training
    lm.eval()
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start:start + batch_size].to(device)  # [b, seq_len]
        with _autocast(device, dtype):
            loss = lm(batch, labels=batch).loss
        scored = batch.shape[0] * (batch.shape[1] - 1)
        total += float(loss.detach()) * scored
        count += scored
    lm.train(was_training)
    return total / count


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# ----------------------------------------------------------------------------- training


@dataclass
class TrainingRun:
    """What :func:`train_lm` recorded.

    ``history``: one dict per optimizer step: ``step`` (1-based), ``tokens`` (trained so far), ``lr``,
    ``train_loss`` (nats/token of that step's batch, before the update), ``elapsed_s`` (training seconds so far,
    evaluation excluded). ``evals``: one dict per evaluation (step 0 = initialisation, every ``eval_interval``
    steps, and the last step): ``step, tokens, elapsed_s, val_loss`` (nats/token), ``val_ppl`` (``exp``),
    ``val_bpb`` (bits per token = per byte with the byte tokenizer). ``params``: parameter count (tied head counted
    once). ``train_seconds``: total training time. ``tokens_per_s``: trained tokens / ``train_seconds``.
    """

    name: str
    seed: int
    params: int
    history: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    tokens_per_s: float = 0.0


def train_lm(name: str, config: dict, train_stream: torch.Tensor, val_windows: torch.Tensor, steps: int,
             batch_size: int, seq_len: int, learning_rate: float = 3e-3, warmup_steps: int = 10,
             weight_decay: float = 0.1, grad_clip: float = 1.0, eval_interval: int = 10, seed: int = 0,
             device: str = "cpu", dtype: str = "float32", eval_batch_size: int = 16,
             progress: bool = False) -> TrainingRun:
    """Train ``bsbr.CausalLM(bsbr.build_model(name, **config))`` from scratch for ``steps`` AdamW steps.

    Args:
        name: an architecture of ``bsbr.available_models()``; config: its ``build_model`` kwargs
            (:func:`model_config`).
        train_stream: 1-D integer token stream ``[n_tokens]``; each step trains on
            :func:`random_windows` ``[batch_size, seq_len]`` of it (``batch_size * seq_len`` tokens a step).
        val_windows: ``int64 [num_windows, val_seq_len]`` fixed evaluation windows (:func:`evaluation_windows`).
        steps, batch_size, seq_len: token budget ``steps * batch_size * seq_len``.
        learning_rate: peak AdamW rate; warmup_steps: linear warmup (``0 <= warmup_steps < steps``); schedule
            as :func:`learning_rate_at`. weight_decay: AdamW decoupled decay of the matrices (not of biases,
            LayerNorm weights or the embedding). grad_clip: max global gradient norm (``> 0``).
        eval_interval: evaluate every this many steps (plus step 0 and the last step).
        seed: weights (``torch.manual_seed``) and batch offsets (a generator) are seeded with it.
        device, dtype: see :func:`resolve_device_dtype` (``"cpu"``/``"float32"`` by default).
        eval_batch_size: windows per evaluation forward; progress: show a tqdm bar over the steps.
    Returns:
        :class:`TrainingRun`.
    Raises:
        ValueError: a bad argument (named) before any training; RuntimeError: a non-finite training loss.
    """
    check_positive_int(steps=steps, batch_size=batch_size, seq_len=seq_len, eval_interval=eval_interval,
                       eval_batch_size=eval_batch_size)
    check_int_at_least(0, warmup_steps=warmup_steps, seed=seed)
    check_optimizer_settings(steps, warmup_steps, learning_rate, weight_decay, grad_clip)
    _check_stream(train_stream, seq_len)
    if (not isinstance(val_windows, torch.Tensor) or val_windows.dim() != 2 or val_windows.is_floating_point()
            or val_windows.shape[1] < 2):
        raise ValueError("val_windows must be an integer tensor [num_windows, seq_len >= 2]")
    torch_device, torch_dtype = resolve_device_dtype(device, dtype)

    lm = build_lm(name, config, seed, dtype).to(torch_device).train()
    optimizer = adamw(lm, learning_rate, weight_decay)
    scaler = torch.amp.GradScaler(torch_device.type, enabled=torch_dtype == torch.float16)
    generator = torch.Generator().manual_seed(seed)
    run = TrainingRun(name=name, seed=seed, params=sum(p.numel() for p in lm.parameters()))
    val_windows = val_windows.long()

    def record_eval(step: int, elapsed: float) -> None:
        loss = evaluate(lm, val_windows, eval_batch_size, torch_device, torch_dtype)
        run.evals.append({"step": step, "tokens": step * batch_size * seq_len, "elapsed_s": elapsed,
                          "val_loss": loss, "val_ppl": math.exp(loss), "val_bpb": loss / math.log(2)})

    record_eval(0, 0.0)
    elapsed = 0.0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"{name} seed {seed}", mininterval=5.0, leave=True)
    for step in range(steps):
        lr = learning_rate_at(step, steps, learning_rate, warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = random_windows(train_stream, seq_len, batch_size, generator).to(torch_device)  # [batch, seq_len]
        _synchronize(torch_device)
        started = time.perf_counter()
        with _autocast(torch_device, torch_dtype):
            loss = lm(batch, labels=batch).loss
        optimizer_step(lm, loss, optimizer, scaler, grad_clip)
        value = float(loss.detach())  # synchronizes the device
        elapsed += time.perf_counter() - started
        if not math.isfinite(value):
            raise RuntimeError(f"{name} seed {seed}: training loss became {value} at step {step + 1} "
                               f"(learning_rate={learning_rate}, dtype={dtype})")
        run.history.append({"step": step + 1, "tokens": (step + 1) * batch_size * seq_len, "lr": lr,
                            "train_loss": value, "elapsed_s": elapsed})
        if (step + 1) % eval_interval == 0 or step + 1 == steps:
            record_eval(step + 1, elapsed)
        if bar is not None:
            bar.set_postfix(loss=f"{value:.3f}", refresh=False)
            bar.update(1)
    if bar is not None:
        bar.close()
    run.train_seconds = elapsed
    run.tokens_per_s = steps * batch_size * seq_len / elapsed if elapsed > 0 else float("nan")
    return run


# ----------------------------------------------------------------------------- memory of one training step


def _train_step_memory_here(name: str, config: dict, seq_len: int, batch_size: int, seed: int,
                            threads: int | None, device: str, dtype: str) -> dict:
    """One training step in *this* process (the child side of :func:`measure_train_step_memory`)."""
    used_threads = set_threads(threads)
    torch_device, torch_dtype = resolve_device_dtype(device, dtype)
    # One throwaway step of a separate copy on 8 tokens first: torch's one-time lazy initialisation (kernel
    # dispatch tables, thread pools, allocator arenas) is not part of a training step's memory. It is freed
    # before the baseline, so nothing of the measured model, its gradients or its optimizer state exists yet.
    warm = build_lm(name, config, seed, dtype).to(torch_device).train()
    warm_optimizer = torch.optim.AdamW(warm.parameters(), lr=1e-3)
    warm_ids = torch.zeros(1, 8, dtype=torch.long, device=torch_device)
    with _autocast(torch_device, torch_dtype):
        warm(warm_ids, labels=warm_ids).loss.backward()
    warm_optimizer.step()
    del warm, warm_optimizer, warm_ids
    gc.collect()
    lm = build_lm(name, config, seed, dtype).to(torch_device).train()
    optimizer = torch.optim.AdamW(lm.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(torch_device.type, enabled=torch_dtype == torch.float16)
    generator = torch.Generator().manual_seed(seed)
    batch = torch.randint(0, config["vocab_size"], (batch_size, seq_len), generator=generator).to(torch_device)
    param_bytes = sum(p.numel() * p.element_size() for p in lm.parameters())
    if torch_device.type == "cuda":
        torch.cuda.synchronize(torch_device)
        torch.cuda.reset_peak_memory_stats(torch_device)
        baseline, method = torch.cuda.memory_allocated(torch_device), "torch.cuda allocated bytes (max - before)"
    else:
        baseline, method = memory_baseline()
    started = time.perf_counter()
    with _autocast(torch_device, torch_dtype):
        loss = lm(batch, labels=batch).loss
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    loss_value = float(loss.detach())
    seconds = time.perf_counter() - started
    if torch_device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(torch_device)
    else:
        peak = memory_peak()
    grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in lm.parameters() if p.grad is not None)
    state_bytes = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                      if isinstance(v, torch.Tensor))
    return {"model": name, "seq_len": seq_len, "batch_size": batch_size, "threads": used_threads,
            "device": str(torch_device), "dtype": dtype, "params": sum(p.numel() for p in lm.parameters()),
            "param_bytes": param_bytes, "grad_bytes": grad_bytes, "optimizer_state_bytes": state_bytes,
            "baseline_bytes": baseline, "peak_total_bytes": peak, "peak_bytes": peak - baseline,
            "step_s": seconds, "loss": loss_value, "memory_method": method}


def measure_train_step_memory(name: str, config: dict, seq_len: int, batch_size: int = 1, seed: int = 0,
                              threads: int | None = None, device: str = "cpu", dtype: str = "float32",
                              timeout: float | None = None) -> dict:
    """Peak memory of one training step (forward, backward, first AdamW step) of ``bsbr.CausalLM`` on
    ``build_model(name, **config)``, measured in a fresh process.

    The step runs in a new process forked from :mod:`bsbr.measure`'s fork server, so nothing the caller allocated
    counts; a throwaway step of a separate copy on 8 tokens first absorbs torch's one-time lazy initialisation
    (it is freed before the baseline). The baseline is taken after the model (weights), the optimizer (no state yet: AdamW creates it lazily)
    and the random input ``[batch_size, seq_len]`` exist; the peak is the high-water mark over the step. So
    ``peak_bytes`` = activations saved for backward + gradients + AdamW state (``exp_avg``, ``exp_avg_sq``: 2 ×
    the fp32 weights) + temporaries + allocator slack. On CPU both are resident-set sizes (``VmRSS`` baseline,
    ``VmHWM`` peak after a ``clear_refs`` reset; see :mod:`bsbr.measure`); on CUDA they are
    ``torch.cuda.memory_allocated`` before and ``torch.cuda.max_memory_allocated`` over the step (tensors only).

    Args:
        name, config: architecture and its ``build_model`` kwargs (with ``vocab_size``).
        seq_len, batch_size: input shape (tokens). seed: weights and input ids.
        threads: torch threads in the measuring process (None = torch default).
        device, dtype: as :func:`resolve_device_dtype`. timeout: seconds before the process is killed (None: none).
    Returns:
        dict with ``peak_bytes`` (the headline, bytes), ``baseline_bytes``, ``peak_total_bytes``, ``param_bytes``,
        ``grad_bytes``, ``optimizer_state_bytes`` (what the step created, counted from the tensors), ``params``,
        ``step_s`` (seconds of the step, one sample: not a benchmark), ``loss``, ``memory_method``, and the inputs.
    Raises:
        ValueError: unknown name, bad sizes, device or dtype (before any process starts); RuntimeError: the step
        failed in the child (traceback tail in the message), e.g. out of memory.
    """
    import bsbr

    if name not in bsbr.available_models():
        raise ValueError(f"name must be one of {bsbr.available_models()}, got {name!r}")
    if not isinstance(config, dict) or "vocab_size" not in config:
        raise ValueError(f"config must be a dict of build_model kwargs including vocab_size, got {config!r}")
    check_positive_int(seq_len=seq_len, batch_size=batch_size)
    check_int_at_least(0, seed=seed)
    check_threads_timeout(threads, timeout)
    resolve_device_dtype(device, dtype)
    kwargs = dict(name=name, config=dict(config), seq_len=seq_len, batch_size=batch_size, seed=seed, threads=threads,
                  device=device, dtype=dtype)
    # The first AdamW step imports torch._dynamo (~4 s); preloading it in the fork server (a setting that takes
    # effect if the server is not running yet) spares every point that import. Memory is unaffected: the baseline
    # is read after it.
    return run_isolated(_train_step_memory_here, kwargs, f"a training step of {name!r} at seq_len={seq_len}",
                        timeout, preload=("torch._dynamo", "bsbr.training"))
