"""Benchmarks: one fresh process per measured point of a model, an attention layer or core, or a matmul; FLOP counts.

Three kinds of point, each measured in its own process (see *Per point*):

* :func:`measure_forward`: a whole model from ``bsbr.build_model`` (token ids in, hidden states out), forward only.
* :func:`measure_attention`: one attention module or core against full attention of the same width:

  ========== =====================================================================================================
  impl       what is called (``hidden_states``: ``[batch, seq_len, hidden_dim]``; per-head tensors ``q, k, v``:
             ``[batch, heads, seq_len, head_dim]``; ``meta_query, meta_key``: ``[batch, heads, num_chunks, head_dim]``)
  ========== =====================================================================================================
  bsbr       ``bsbr.BSBRAttention(hidden_dim, num_heads, chunk_size)(hidden_states)`` (projections included)
  standard   ``bsbr.StandardAttention(hidden_dim, num_heads)(hidden_states)``: torch's causal
             ``scaled_dot_product_attention`` with ``q_proj, k_proj, v_proj, out_proj``
  linear,    the baselines' attention layers, ``bsbr.registry.build_attention(impl, hidden_dim, num_heads)`` with
  delta_net, their architecture defaults (``linear``/``delta_net``: chunk 64, ``sliding_window``: window 128,
  sliding_   ``hopfield``: one update, ``gau``: chunk 128, ``qk_dim`` 128, expansion 2; ``chunk_size`` is BSBR's only)
  window,
  hopfield,
  gau
  bsbr_core  ``bsbr.attention.bsbr_attention(query, key, value, meta_query, meta_key, chunk_size)``
  sdpa_core  ``torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True)``
  delta_     DeltaNet's delta rule, ``delta_rule_chunkwise(q, k, v, beta, 64)`` / ``delta_rule_recurrent(q, k, v,
  chunkwise, beta)`` (the token loop), on unit-norm ``q, k`` and ``beta`` in (0, 1): the operator pair whose speed-up is a target in report 01
  delta_
  recurrent
  linear_    linear attention, ``linear_attention_chunkwise(φq, φk, v, 64)`` / ``linear_attention_recurrent(φq,
  chunkwise, φk, v)`` with ``φ = elu + 1``
  linear_
  recurrent
  llama_     one pretrained-shaped attention layer and its conversion (random weights, nothing downloaded): a
  original,  ``LlamaAttention`` (``hidden_dim``, ``num_heads`` query / ``num_key_value_heads`` key-value heads, RoPE)
  llama_     called as the decoder layer calls it, ``layer(hidden_states, position_embeddings=(cos, sin))``, with
  normalized torch's fused causal SDPA (``llama_original``), and that layer converted by
  llama_     ``convert_to_bsbr(..., chunk_size, retrieval=..., sink_size=sink_size)`` (``llama_normalized``:
  terraced   the same projections and RoPE, normalised retrieval, :mod:`bsbr.normalized`; ``llama_terraced``:
             terraced retrieval, :mod:`bsbr.terraced`, uncompressed); SmolLM2-135M's shapes
             are ``hidden_dim=576, num_heads=9, num_key_value_heads=3`` (head_dim 64)
  ========== =====================================================================================================

  The cores get random per-head tensors laid out as the modules produce them (views
  ``[batch, seq_len, heads, head_dim] -> [batch, heads, seq_len, head_dim]`` of token-major projections), so a
  core point is the module point minus its projections. Modes:

  - ``forward``: ``fn()`` under ``torch.inference_mode()``.
  - ``backward``: forward + backward as in training, timed together: ``fn().sum().backward()`` with gradients
    to the input(s) and every parameter (grads reset to None before each call, not timed apart).
  - ``decode`` (modules only): streaming generation. ``module(hidden_states, state=None, return_state=True)``
    prefills the ``seq_len`` tokens (timed apart as ``prefill_s``, not in the headline), then
    every timed call is one token, ``module(token, state=state, return_state=True)`` with ``token
    [batch, 1, hidden_dim]``: the per-token latency at position ``seq_len`` (+ warmup tokens). BSBR's state is
    ``O(num_chunks · head_dim²)`` per head and a token costs the same at any position; standard attention's state
    is a KV cache and a token costs ``O(position)``. ``state_bytes`` (``state.nbytes()``) is reported at the end.

* :func:`matmul_throughput`: the machine's fp32 GEMM rate (best of a few large ``torch.mm``), the yardstick for
  the achieved GFLOP/s of the attention points.

Per point (the helpers of :mod:`bsbr.measure`):

* time: ``time.perf_counter`` around each call after ``warmup`` untimed calls; ``repeats`` timed calls (fewer if
  ``max_timed_s`` is given and their total passes it; at least one), reported as median (the headline), mean,
  min, max and all, in seconds (:func:`bsbr.measure.timed_calls`, :func:`bsbr.measure.time_summary`).
* memory: the process's resident set size (:func:`bsbr.measure.memory_baseline`, :func:`bsbr.measure.memory_peak`).
  After imports, model/input creation (and, for ``decode``, the prefill) the current RSS is the baseline
  (``baseline_rss_bytes``: weights, inputs, libraries, the prefilled state) and the kernel's high-water mark is
  reset to it; after all calls the high-water mark is the peak (``peak_rss_bytes``).
  ``peak_bytes = peak_rss_bytes - baseline_rss_bytes`` is what the calls added (activations, attention buffers,
  saved tensors and gradients, allocator slack).
* isolation: each point runs in a new process forked from a fork server (:func:`bsbr.measure.run_isolated`), so
  its peak memory is its own and it shares no allocator state, thread pool or warm cache with the caller or other
  points. The ``*_in_process`` functions measure in the calling process instead (the child side, and the CLI).

FLOPs (:func:`attention_flop_terms`, forward; matrix products only, a multiply-add = 2 FLOPs; softmax, chunk
means, bias adds and other elementwise work are not counted). ``n`` = seq_len, ``D`` = hidden_dim,
``H`` = num_heads, ``d = D / H``, ``B`` = chunk_size, ``C = ceil(n / B)`` chunks of sizes ``s_i`` (all ``B``
but a partial last one); everything is multiplied by batch_size. Causal products count only the causal half
(the pairs ``j <= i``, diagonal included), i.e. the work that a kernel skipping masked blocks must do:

* ``projections = 4 · 2·n·D²`` (q, k, v, out; modules only)
* ``meta_projections = 2 · 2·C·D²`` (meta-query and meta-key of the chunk means; ``bsbr`` only)
* BSBR core:
  ``local_attention = 2·D · Σ_i s_i(s_i+1)`` (Q·Kᵀ and P·V inside each chunk: ``2 · 2·d · s(s+1)/2`` per chunk
  and head; ≈ ``2·n·(B+1)·D``),
  ``chunk_states = 2·(C-1)·B·D·d`` (``F_j = K_jᵀ V_j`` for the ``C-1`` chunks that are ever retrieved),
  ``meta_scores = D·C·(C-1)`` (``r_i·h_j`` for ``j < i``), ``state_mixing = H·d²·C·(C-1)``
  (``Σ_{j<i} w_ij F_j``), ``readout = 2·n·D·d`` (``q_t · R_i`` for every token);
* full attention core: ``attention = 2·D · n(n+1)`` (causal Q·Kᵀ and P·V, ``2 · 2·d · n(n+1)/2`` per head).

``backward`` mode counts ``3 ×`` the forward FLOPs (the backward of a product is two products of its size;
recomputation inside fused attention kernels is not counted). Achieved GFLOP/s = FLOPs / median seconds / 1e9.

CLI: ``python -m bsbr.bench`` (:mod:`bsbr.bench`).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from bsbr._checks import check_heads, check_int_at_least, check_positive_int
from bsbr.attention import bsbr_attention
from bsbr.baselines.delta_net import delta_rule_chunkwise, delta_rule_recurrent
from bsbr.baselines.linear import elu_feature_map, linear_attention_chunkwise, linear_attention_recurrent
from bsbr.measure import (check_threads_timeout, memory_baseline, memory_peak, run_isolated, set_threads,
                          time_summary, timed_calls)
from bsbr.registry import available_models, build_attention, build_model
from bsbr.utils import check_sink_size

__all__ = [
    "ATTENTION_IMPLS",
    "ATTENTION_MODES",
    "CONVERTED_IMPLS",
    "CORE_IMPLS",
    "FLOP_IMPLS",
    "MATMUL_SHAPES",
    "MODULE_IMPLS",
    "attention_flop_terms",
    "attention_flops",
    "check_attention_args",
    "matmul_throughput",
    "matmul_throughput_in_process",
    "measure_attention",
    "measure_attention_in_process",
    "measure_forward",
    "measure_forward_in_process",
]

# The order the reports list (and colour) the attention layers in; a newly registered architecture follows them.
_REPORT_ORDER = ("bsbr", "standard", "linear", "delta_net", "sliding_window", "hopfield", "gau")

#: ``impl`` values of :func:`measure_attention` that are attention layers (projections included): every registered
#: architecture (``available_models()``), BSBR and full attention first.
MODULE_IMPLS = tuple(sorted(available_models(), key=lambda name: (
    _REPORT_ORDER.index(name) if name in _REPORT_ORDER else len(_REPORT_ORDER), name)))
#: ``impl`` values that are operators on per-head tensors (no projections).
CORE_IMPLS = ("bsbr_core", "sdpa_core", "delta_chunkwise", "delta_recurrent", "linear_chunkwise", "linear_recurrent")
#: ``impl`` values that are a pretrained model family's attention layer, original and converted (forward/backward).
CONVERTED_IMPLS = ("llama_original", "llama_normalized", "llama_terraced")
#: ``impl`` values of :func:`measure_attention`: the modules, the cores, then the converted layers.
ATTENTION_IMPLS = MODULE_IMPLS + CORE_IMPLS + CONVERTED_IMPLS
#: ``impl`` values with a FLOP count (:func:`attention_flop_terms`); the others report ``flops=None``.
FLOP_IMPLS = ("bsbr", "standard", "bsbr_core", "sdpa_core")
#: ``mode`` values of :func:`measure_attention`; ``decode`` needs a module (one of :data:`MODULE_IMPLS`).
ATTENTION_MODES = ("forward", "backward", "decode")
#: Default GEMM shapes ``(m, k, n)`` of :func:`matmul_throughput`: a projection-sized product and a square one.
MATMUL_SHAPES = ((16384, 512, 512), (2048, 2048, 2048))


# ----------------------------------------------------------------------------- whole models


def measure_forward_in_process(name: str, config: dict, seq_len: int, batch_size: int = 1, repeats: int = 3,
                               warmup: int = 1, threads: int | None = None, seed: int = 0) -> dict:
    """:func:`measure_forward` in *this* process (its child side, and the CLI): arguments and result as there, no
    argument checks; the memory is this process's, so it is only meaningful in a fresh one."""
    used_threads = set_threads(threads)
    torch.manual_seed(seed)
    model = build_model(name, **config).eval()
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, config["vocab_size"], (batch_size, seq_len), generator=generator)
    baseline, memory_method = memory_baseline()

    def call():
        output = model(input_ids)
        del output

    with torch.inference_mode():
        times = timed_calls(call, repeats, warmup)
    peak = memory_peak()
    summary = time_summary(times)
    return {
        "model": name,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "repeats": repeats,
        "warmup": warmup,
        "threads": used_threads,
        "median_s": summary["median_s"],
        "min_s": summary["min_s"],
        "max_s": summary["max_s"],
        "times_s": times,
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": peak,
        "peak_bytes": peak - baseline,
        "memory_method": memory_method,
    }


def measure_forward(name: str, config: dict, seq_len: int, batch_size: int = 1, repeats: int = 3,
                    warmup: int = 1, threads: int | None = None, seed: int = 0,
                    timeout: float | None = None) -> dict:
    """Time one forward pass of ``bsbr.build_model(name, **config)`` on random tokens, in a fresh process.

    Args:
        name: a name from ``bsbr.available_models()``.
        config: keyword arguments for ``bsbr.build_model`` (must include ``vocab_size``).
        seq_len, batch_size: input shape ``[batch_size, seq_len]`` (tokens).
        repeats: timed forward calls (>= 1); warmup: untimed calls before them (>= 0).
        threads: ``torch.set_num_threads`` in the measuring process; None = torch default.
        seed: seeds the weights and the input tokens.
        timeout: seconds before the measuring process is killed (None = no limit).
    Returns:
        dict with ``median_s, min_s, max_s`` (seconds), ``times_s`` (all timed calls), ``baseline_rss_bytes``
        (RSS after imports, model build and input creation), ``peak_rss_bytes`` (RSS high-water mark over the
        forward calls), ``peak_bytes`` (their difference), all in bytes, ``memory_method`` (how they were read,
        see :func:`bsbr.measure.memory_baseline`), and the inputs ``model, seq_len, batch_size, repeats, warmup,
        threads``.
    Raises:
        ValueError: unknown ``name`` or invalid sizes (before anything runs); RuntimeError: the measuring process
        failed (its traceback tail is in the message), e.g. a config the model does not take, or out of memory.
    """
    if name not in available_models():
        raise ValueError(f"name must be one of {available_models()}, got {name!r}")
    if not isinstance(config, dict) or "vocab_size" not in config:
        raise ValueError(f"config must be a dict of build_model kwargs including vocab_size, got {config!r}")
    check_positive_int(seq_len=seq_len, batch_size=batch_size, repeats=repeats)
    check_int_at_least(0, warmup=warmup)
    check_threads_timeout(threads, timeout)
    kwargs = dict(name=name, config=dict(config), seq_len=seq_len, batch_size=batch_size, repeats=repeats,
                  warmup=warmup, threads=threads, seed=seed)
    return run_isolated(measure_forward_in_process, kwargs, f"{name!r} at seq_len={seq_len}", timeout)


# ----------------------------------------------------------------------------- attention modules and cores


def check_attention_args(impl, mode, seq_len, hidden_dim, num_heads, chunk_size, batch_size,
                         num_key_value_heads=None, sink_size=0) -> None:
    """Raise ValueError naming the argument unless ``impl``/``mode`` are known (``decode`` only for a module in
    :data:`MODULE_IMPLS`) and the sizes positive, with ``hidden_dim`` divisible by ``num_heads``, which
    ``num_key_value_heads`` (None = ``num_heads``) divides, and (``llama_normalized``, ``llama_terraced``) ``0 <= sink_size <=
    chunk_size``."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"impl must be one of {list(ATTENTION_IMPLS)}, got {impl!r}")
    if mode not in ATTENTION_MODES:
        raise ValueError(f"mode must be one of {list(ATTENTION_MODES)}, got {mode!r}")
    if mode == "decode" and impl not in MODULE_IMPLS:
        raise ValueError(f"mode 'decode' streams through a module: impl must be one of {list(MODULE_IMPLS)}, "
                         f"got {impl!r}")
    check_positive_int(seq_len=seq_len, chunk_size=chunk_size, batch_size=batch_size)
    check_heads(hidden_dim, num_heads)
    if num_key_value_heads is not None:
        check_positive_int(num_key_value_heads=num_key_value_heads)
        if num_heads % num_key_value_heads:
            raise ValueError(f"num_key_value_heads ({num_key_value_heads}) must divide num_heads ({num_heads})")
    if impl in ("llama_normalized", "llama_terraced"):
        check_sink_size(sink_size, chunk_size)


def attention_flop_terms(impl: str, seq_len: int, hidden_dim: int = 512, num_heads: int = 8,
                         chunk_size: int = 128, batch_size: int = 1) -> dict[str, int]:
    """Forward FLOPs of one attention point, term by term (formulas in the module docstring).

    Args:
        impl: one of :data:`FLOP_IMPLS`.
        seq_len, hidden_dim, num_heads, chunk_size, batch_size: the point's sizes (``chunk_size`` is ignored by
            ``standard`` and ``sdpa_core``).
    Returns:
        ``{term: FLOPs}``: ``projections`` (modules), ``meta_projections`` (``bsbr``), then ``local_attention,
        chunk_states, meta_scores, state_mixing, readout`` (BSBR) or ``attention`` (full attention).
    Raises:
        ValueError: ``impl`` not in :data:`FLOP_IMPLS` or invalid sizes.
    """
    check_attention_args(impl, "forward", seq_len, hidden_dim, num_heads, chunk_size, batch_size)
    if impl not in FLOP_IMPLS:
        raise ValueError(f"impl must be one of {list(FLOP_IMPLS)} for a FLOP count, got {impl!r}")
    n, D, H, B = seq_len, hidden_dim, num_heads, chunk_size
    d = D // H
    terms = {}
    if impl in ("bsbr", "standard"):
        terms["projections"] = 4 * 2 * n * D * D
    if impl in ("bsbr", "bsbr_core"):
        C = -(-n // B)
        sizes_term = (n // B) * B * (B + 1) + (n % B) * (n % B + 1)  # Σ_i s_i (s_i + 1)
        if impl == "bsbr":
            terms["meta_projections"] = 2 * 2 * C * D * D
        terms["local_attention"] = 2 * D * sizes_term
        terms["chunk_states"] = 2 * (C - 1) * B * D * d
        terms["meta_scores"] = D * C * (C - 1)
        terms["state_mixing"] = H * d * d * C * (C - 1)
        terms["readout"] = 2 * n * D * d
    else:
        terms["attention"] = 2 * D * n * (n + 1)
    return {key: batch_size * value for key, value in terms.items()}


def attention_flops(impl: str, seq_len: int, hidden_dim: int = 512, num_heads: int = 8, chunk_size: int = 128,
                    batch_size: int = 1, mode: str = "forward") -> int:
    """FLOPs of one call of an attention point: the sum of :func:`attention_flop_terms`, ``3 ×`` for ``backward``.

    Raises:
        ValueError: unknown ``impl``, invalid sizes, or ``mode`` not ``"forward"``/``"backward"`` (a decode step
            has no FLOP count here).
    """
    if mode not in ("forward", "backward"):
        raise ValueError(f"mode must be 'forward' or 'backward' for a FLOP count, got {mode!r}")
    forward = sum(attention_flop_terms(impl, seq_len, hidden_dim, num_heads, chunk_size, batch_size).values())
    return forward * (3 if mode == "backward" else 1)


def _llama_call(impl, seq_len, hidden_dim, num_heads, num_key_value_heads, chunk_size, sink_size, batch_size,
                generator, grad):
    """``(call, leaves, module)`` of one random-weight ``LlamaAttention`` (``llama_original``) or its conversion
    (``llama_normalized``, ``llama_terraced``), called as a decoder layer calls it; RoPE's ``(cos, sin)`` are computed once, outside."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    from bsbr.convert import BSBRLlamaAttention

    config = LlamaConfig(vocab_size=32, hidden_size=hidden_dim, intermediate_size=4 * hidden_dim, num_hidden_layers=1,
                         num_attention_heads=num_heads, num_key_value_heads=num_key_value_heads or num_heads,
                         max_position_embeddings=seq_len, attn_implementation="sdpa")
    layer = LlamaAttention(config, layer_idx=0)
    if impl in ("llama_normalized", "llama_terraced"):  # compression None: feature_dim = head_dim
        layer = BSBRLlamaAttention(layer, chunk_size, retrieval=impl.removeprefix("llama_"), sink_size=sink_size)
    layer.eval()
    hidden_states = torch.randn(batch_size, seq_len, hidden_dim, generator=generator, requires_grad=grad)
    with torch.no_grad():
        position_embeddings = LlamaRotaryEmbedding(config)(hidden_states, torch.arange(seq_len)[None])
    return (lambda: layer(hidden_states, position_embeddings=position_embeddings)[0]), [hidden_states], layer


def _attention_call(impl, mode, seq_len, hidden_dim, num_heads, chunk_size, batch_size, generator,
                    num_key_value_heads=None, sink_size=0):
    """Build what ``impl`` runs and return ``(call, leaves, module)``: ``call()`` -> output tensor."""
    grad = mode == "backward"
    head_dim = hidden_dim // num_heads
    if impl in CONVERTED_IMPLS:
        return _llama_call(impl, seq_len, hidden_dim, num_heads, num_key_value_heads, chunk_size, sink_size,
                           batch_size, generator, grad)
    if impl in MODULE_IMPLS:
        module = build_attention(impl, hidden_dim, num_heads, **({"chunk_size": chunk_size} if impl == "bsbr" else {}))
        module.eval()  # dropout is 0 anyway; eval keeps the modules on their inference branches
        hidden_states = torch.randn(batch_size, seq_len, hidden_dim, generator=generator, requires_grad=grad)
        return (lambda: module(hidden_states)), [hidden_states], module

    def per_head(length):
        # token-major [batch, length, heads, head_dim] viewed as [batch, heads, length, head_dim], like a projection
        base = torch.randn(batch_size, length, num_heads, head_dim, generator=generator, requires_grad=grad)
        return base, base.transpose(1, 2)

    (q0, q), (k0, k), (v0, v) = per_head(seq_len), per_head(seq_len), per_head(seq_len)
    if impl == "sdpa_core":
        return (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)), [q0, k0, v0], None
    if impl.startswith("delta_"):
        beta0 = torch.rand(batch_size, num_heads, seq_len, generator=generator, requires_grad=grad)
        form = delta_rule_chunkwise if impl == "delta_chunkwise" else delta_rule_recurrent
        return (lambda: form(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, beta0)[0]), [q0, k0, v0, beta0], None
    if impl.startswith("linear_"):
        form = linear_attention_chunkwise if impl == "linear_chunkwise" else linear_attention_recurrent
        return (lambda: form(elu_feature_map(q), elu_feature_map(k), v)[0]), [q0, k0, v0], None
    num_chunks = -(-seq_len // chunk_size)
    (mq0, mq), (mk0, mk) = per_head(num_chunks), per_head(num_chunks)
    return (lambda: bsbr_attention(q, k, v, mq, mk, chunk_size)), [q0, k0, v0, mq0, mk0], None


def measure_attention_in_process(impl: str, mode: str, seq_len: int, hidden_dim: int = 512, num_heads: int = 8,
                                 chunk_size: int = 128, batch_size: int = 1, repeats: int = 3, warmup: int = 1,
                                 threads: int | None = None, seed: int = 0, max_timed_s: float | None = None,
                                 num_key_value_heads: int | None = None, sink_size: int = 4) -> dict:
    """:func:`measure_attention` in *this* process (its child side, and the CLI): arguments and result as there;
    the memory is this process's, so it is only meaningful in a fresh one.

    Raises:
        ValueError: as :func:`check_attention_args`.
    """
    check_attention_args(impl, mode, seq_len, hidden_dim, num_heads, chunk_size, batch_size, num_key_value_heads,
                         sink_size)
    used_threads = set_threads(threads)
    torch.manual_seed(seed)  # the module's weights
    generator = torch.Generator().manual_seed(seed)  # the inputs
    call, leaves, module = _attention_call(impl, mode, seq_len, hidden_dim, num_heads, chunk_size, batch_size,
                                           generator, num_key_value_heads, sink_size)
    extra = {}
    if mode == "forward":
        baseline, memory_method = memory_baseline()
        with torch.inference_mode():
            times = timed_calls(call, repeats, warmup, max_timed_s)
    elif mode == "backward":
        parameters = list(module.parameters()) if module is not None else []

        def step():
            for tensor in leaves + parameters:
                tensor.grad = None
            call().sum().backward()

        baseline, memory_method = memory_baseline()
        times = timed_calls(step, repeats, warmup, max_timed_s)
    else:  # decode: prefill seq_len tokens, then one token per call
        steps = warmup + repeats
        tokens = torch.randn(batch_size, steps, hidden_dim, generator=generator)  # [batch, steps, hidden_dim]
        with torch.inference_mode():
            start = time.perf_counter()
            _, state = module(leaves[0], state=None, return_state=True)  # prefill: the seq_len-token prompt
            extra["prefill_s"] = time.perf_counter() - start
            holder = {"state": state, "next": 0}

            def decode_one():
                i = holder["next"]
                _, holder["state"] = module(tokens[:, i : i + 1], state=holder["state"], return_state=True)
                holder["next"] = i + 1

            baseline, memory_method = memory_baseline()
            times = timed_calls(decode_one, repeats, warmup, max_timed_s)
        final = holder["state"]
        extra.update(position=seq_len, state_bytes=int(final.nbytes()), state_tokens=int(final.num_tokens))
    peak = memory_peak()
    result = {
        "impl": impl,
        "mode": mode,
        "seq_len": seq_len,
        "hidden_dim": hidden_dim,
        "num_heads": num_heads,
        "chunk_size": chunk_size,
        "batch_size": batch_size,
        **({"num_key_value_heads": num_key_value_heads or num_heads, "sink_size": sink_size}
           if impl in CONVERTED_IMPLS else {}),
        "warmup": warmup,
        "threads": used_threads,
        **time_summary(times),
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": peak,
        "peak_bytes": peak - baseline,
        "memory_method": memory_method,
        "flops": None,
        "gflops_per_s": None,
        **extra,
    }
    if mode != "decode" and impl in FLOP_IMPLS:
        result["flops"] = attention_flops(impl, seq_len, hidden_dim, num_heads, chunk_size, batch_size, mode)
        result["gflops_per_s"] = result["flops"] / result["median_s"] / 1e9
    return result


def measure_attention(impl: str, seq_len: int, mode: str = "forward", hidden_dim: int = 512, num_heads: int = 8,
                      chunk_size: int = 128, batch_size: int = 1, repeats: int = 3, warmup: int = 1,
                      threads: int | None = None, seed: int = 0, max_timed_s: float | None = None,
                      timeout: float | None = None, num_key_value_heads: int | None = None,
                      sink_size: int = 4) -> dict:
    """Time and memory of one attention module or core at one length, in a fresh process (module docstring).

    Args:
        impl: one of :data:`MODULE_IMPLS` (attention layers with their projections, input
            ``[batch, seq_len, hidden_dim]``) or :data:`CORE_IMPLS` (the operator alone on
            ``[batch, heads, seq_len, head_dim]``); the table in the module docstring.
        seq_len: tokens per sequence; in ``decode`` mode the prefilled position the timed tokens follow.
        mode: ``"forward"`` (inference), ``"backward"`` (forward + backward, timed together) or ``"decode"`` (one
            token per timed call after a prefill of ``seq_len`` tokens; modules only).
        hidden_dim, num_heads, chunk_size, batch_size: sizes (``head_dim = hidden_dim // num_heads``; full
            attention ignores ``chunk_size``).
        repeats: timed calls (``decode``: timed tokens), >= 1; warmup: untimed calls before them, >= 0.
        threads: ``torch.set_num_threads`` in the measuring process; None = torch default.
        seed: seeds the weights and the inputs.
        max_timed_s: stop timing once the timed calls total more than this many seconds (at least one call is
            timed; ``repeats`` in the result is the number done); None = always ``repeats``.
        timeout: seconds before the measuring process is killed (None = no limit).
        num_key_value_heads, sink_size: the converted layers' (:data:`CONVERTED_IMPLS`) key/value heads (None =
            ``num_heads``) and attention-sink tokens (``llama_normalized``, ``llama_terraced``); the other impls
            ignore them.
    Returns:
        dict with the inputs (``impl, mode, seq_len, hidden_dim, num_heads, chunk_size, batch_size, warmup,
        threads``; ``num_key_value_heads, sink_size`` for :data:`CONVERTED_IMPLS`), ``repeats`` (timed calls done), ``median_s, mean_s, min_s, max_s, times_s`` (seconds per
        call; per token in ``decode``), ``baseline_rss_bytes, peak_rss_bytes, peak_bytes, memory_method``,
        ``flops`` and ``gflops_per_s`` (None in ``decode``); ``decode`` adds ``position`` (= ``seq_len``),
        ``prefill_s``, ``state_bytes`` and ``state_tokens`` (of the final state).
    Raises:
        ValueError: an argument above out of range, naming it (before anything runs). RuntimeError: the
        measuring process failed or timed out (its traceback tail is in the message), e.g. out of memory.
    """
    check_attention_args(impl, mode, seq_len, hidden_dim, num_heads, chunk_size, batch_size, num_key_value_heads,
                         sink_size)
    check_positive_int(repeats=repeats)
    check_int_at_least(0, warmup=warmup)
    check_threads_timeout(threads, timeout)
    if max_timed_s is not None and (isinstance(max_timed_s, bool) or not isinstance(max_timed_s, (int, float))
                                    or not max_timed_s > 0):
        raise ValueError(f"max_timed_s must be a positive number of seconds or None, got {max_timed_s!r}")
    kwargs = dict(impl=impl, mode=mode, seq_len=seq_len, hidden_dim=hidden_dim, num_heads=num_heads,
                  chunk_size=chunk_size, batch_size=batch_size, repeats=repeats, warmup=warmup, threads=threads,
                  seed=seed, max_timed_s=max_timed_s, num_key_value_heads=num_key_value_heads, sink_size=sink_size)
    return run_isolated(measure_attention_in_process, kwargs, f"{impl!r} {mode} at seq_len={seq_len}", timeout)


# ----------------------------------------------------------------------------- the machine's matmul rate


def matmul_throughput_in_process(shapes=MATMUL_SHAPES, repeats: int = 5, threads: int | None = None,
                                 seed: int = 0) -> dict:
    """:func:`matmul_throughput` in *this* process (its child side, and the CLI): best-of-``repeats`` fp32
    ``torch.mm`` rate per shape; result as there, no argument checks."""
    used_threads = set_threads(threads)
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for m, k, n in shapes:
        a = torch.randn(m, k, generator=generator)
        b = torch.randn(k, n, generator=generator)
        out = torch.empty(m, n)
        best = min(timed_calls(lambda: torch.mm(a, b, out=out), repeats, warmup=1))
        rows.append({"m": m, "k": k, "n": n, "best_s": best, "gflops_per_s": 2 * m * k * n / best / 1e9})
        del a, b, out
    return {"gflops_per_s": max(row["gflops_per_s"] for row in rows), "threads": used_threads, "dtype": "float32",
            "repeats": repeats, "shapes": rows}


def matmul_throughput(threads: int | None = None, shapes=MATMUL_SHAPES, repeats: int = 5, seed: int = 0,
                      timeout: float | None = None) -> dict:
    """The machine's measured fp32 matrix-multiply rate, in a fresh process: the yardstick for achieved GFLOP/s.

    Each shape ``(m, k, n)`` is ``torch.mm([m, k], [k, n])`` into a preallocated output, one warmup call then
    ``repeats`` timed calls; a shape's rate is ``2·m·k·n / best seconds``.

    Args:
        threads: ``torch.set_num_threads`` in the measuring process; None = torch default.
        shapes: iterable of ``(m, k, n)`` positive integers (default :data:`MATMUL_SHAPES`).
        repeats: timed calls per shape (>= 1). seed: seeds the random matrices. timeout: seconds, or None.
    Returns:
        ``{"gflops_per_s": best rate over the shapes, "threads", "dtype": "float32", "repeats",
        "shapes": [{"m", "k", "n", "best_s", "gflops_per_s"}, ...]}``.
    Raises:
        ValueError: malformed ``shapes`` or invalid ``repeats``/``threads``/``timeout``; RuntimeError: the
        measuring process failed.
    """
    try:
        shapes = [tuple(shape) for shape in shapes]
    except TypeError:
        raise ValueError(f"shapes must be an iterable of (m, k, n) triples, got {shapes!r}") from None
    if not shapes or any(len(shape) != 3 for shape in shapes):
        raise ValueError(f"shapes must be a non-empty iterable of (m, k, n) triples, got {shapes!r}")
    for m, k, n in shapes:
        check_positive_int(m=m, k=k, n=n)
    check_positive_int(repeats=repeats)
    check_threads_timeout(threads, timeout)
    kwargs = dict(shapes=[list(shape) for shape in shapes], repeats=repeats, threads=threads, seed=seed)
    return run_isolated(matmul_throughput_in_process, kwargs, "matmul throughput", timeout)
