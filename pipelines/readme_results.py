"""Write the README's result paragraphs from the metrics files (the stage times from the rendered reports), so that
every number there is one a run produced.

    python pipelines/readme_results.py           # rewrite the marked blocks of README.md
    python pipelines/readme_results.py --check   # exit 1 (and name the block) if README.md differs from the metrics

A block sits between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->`` in README.md; NAME is a stage whose
``reports/metrics/NAME.json`` a formatter below turns into Markdown, a name in :data:`EXTRA_BLOCKS` (another view of
one stage's metrics file) or a name in :data:`REPORT_BLOCKS` (made from ``reports/*.html``). Blocks without a formatter
are left alone.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from bsbr.convergence import grid_edge_summary
from bsbr.formatting import sig
from bsbr.passkey import accuracy_text
# how the index reads each report (its profile, run time and CPU) and writes some of its values: one wording for both
from build_index import (collect, format_cpu, percent_text, points_text, router_words, steps_text,
                         verdict_word)

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"
METRICS = REPO_ROOT / "reports" / "metrics"


def _ratio(row: dict) -> str:
    return f"{row['ratio']:.3f}× [{row['ratio_low']:.3f}, {row['ratio_high']:.3f}]"


#: report 01's names of the seven attention layers
_LAYERS = {"bsbr": "BSBR", "standard": "full attention", "linear": "linear attention", "delta_net": "DeltaNet",
           "sliding_window": "sliding window", "hopfield": "Hopfield", "gau": "GAU"}


def _target(row: dict, unit: str = "×") -> str:
    """A report-01 target record: ``7.19× (goal ≥ 5×: met)``, with the range the medians' intervals allow where the
    run has it (``21.1× [19.6, 22.4] (goal ≥ 20×: undecided at this noise)``), or ``not measured (goal ≥ 20×)`` when
    the run did not reach its length (the quick profile)."""
    word = {"pass": "met", "FAIL": "missed", "undecided": "undecided at this noise"}.get(row["status"], row["status"])
    goal = f"goal {row['comparison']} {row['threshold']:g}{unit}"
    if row["value"] is None:
        return f"not measured ({goal})"
    calls = f" [{sig(row['low'])}, {sig(row['high'])}]" if row.get("low") is not None else ""  # 1.003 reads 1.00
    return f"{sig(row['value'])}{unit}{calls} ({goal}: {word})"


def scaling(m: dict) -> str:
    """Report 01: attention modules and layers against sequence length: time, memory, decode, operators."""
    a, layers = m["attention"], m["layers"]
    cfg, at, goals = a["config"], a["at_longest"], a["targets"]
    longest = a["longest_seq_len"]
    fwd, peak = layers["forward_median_s"], layers["forward_peak_bytes"]
    full_len = max(int(n) for n in fwd["standard"])
    ranked = sorted((name for name in fwd if str(longest) in fwd[name]), key=lambda name: fwd[name][str(longest)])
    quadratic = [name for name in fwd if str(longest) not in fwd[name]]
    dec = a["decode"]
    first, last = sorted(dec["bsbr"], key=int)[0], sorted(dec["bsbr"], key=int)[-1]
    ops = layers["operators"]
    op_len = max(ops, key=int)
    load = m["machine"].get("load_average")
    growth = goals["bsbr_memory_growth_16384_65536"]
    exponents = ", ".join(f"{_LAYERS[name]} {layers['time_exponent'][name]:.2f}"
                          for name in sorted(layers["time_exponent"], key=layers["time_exponent"].get))
    return (
        f"* **Attention modules** (`reports/01_scaling.html`; one layer, hidden {cfg['hidden_dim']}, "
        f"{cfg['num_heads']} heads, chunk {cfg['chunk_size']}, batch {cfg['batch_size']}, fp32, {cfg['threads']} "
        f"threads; {format_cpu(m.get('machine'))}; BSBRAttention vs the same four projections around torch's fused "
        f"causal SDPA; load average {load[0]:.2f} at the start). Forward speed-up over full attention: "
        f"{_target(goals['module_forward_speedup_16384'])} at 16,384 tokens and "
        f"**{_target(goals['module_forward_speedup_65536'])}** at "
        + (f"{longest:,} (BSBR {at['bsbr_forward_s']:.2f} s); " if longest == 65536 else
           f"65,536 (this run's longest: {longest:,}, BSBR {at['bsbr_forward_s']:.2f} s, "
           f"{at['module_forward_ratio']:.1f}×); ")
        + f"the attention cores alone {at['core_forward_ratio']:.1f}× at {longest:,}; forward+backward "
        f"{at['module_backward_ratio']:.1f}×"
        f"{' (full attention extrapolated)' if at['module_backward_full_extrapolated'] else ''}. At 16,384 tokens "
        f"BSBR's forward runs at {goals['bsbr_matmul_fraction_16384']['value']:.0%} of this machine's measured fp32 "
        f"matmul rate ({a['matmul_gflops_per_s']:.0f} GFLOP/s; goal {goals['bsbr_matmul_fraction_16384']['comparison']} "
        f"{goals['bsbr_matmul_fraction_16384']['threshold']:.0%}: "
        f"{_target(goals['bsbr_matmul_fraction_16384']).rsplit(': ', 1)[1]}.\n"
        f"* **All seven attention layers**, forward at {longest:,} tokens: "
        + ", ".join(f"{_LAYERS[name]} {fwd[name][str(longest)]:.2f} s" for name in ranked)
        + (f" ({', '.join(_LAYERS[n] for n in quadratic)}: to {max(int(k) for k in fwd[quadratic[0]]):,} only)"
           if quadratic else "")
        + f". Fitted time exponents: {exponents}. Forward peaks at {longest:,} tokens: "
        + ", ".join(f"{_LAYERS[name]} {peak[name][str(longest)] / 1e9:.2f} GB" for name in ranked)
        + f", against {4 * longest ** 2 / 1e9:.1f} GB for one fp32 `n × n` score matrix (full attention's fused SDPA "
        + "never holds one). "
        + (f"BSBR's peak from 16,384 to {longest:,} tokens grows {_target(growth)} as fast as linear.\n"
           if growth["value"] is not None else
           f"BSBR's peak growth from 16,384 to 65,536 tokens: {_target(growth)}.\n")
        + f"* **Streaming decode** (median step): BSBR {dec['bsbr'][first]['median_s'] * 1e3:.2f} ms at position "
        f"{int(first):,} and {dec['bsbr'][last]['median_s'] * 1e3:.2f} ms at {int(last):,} "
        f"({_target(goals['bsbr_decode_latency_32768_vs_1024'])}; state "
        f"{dec['bsbr'][first]['state_bytes'] / 2**20:.1f} → {dec['bsbr'][last]['state_bytes'] / 2**20:.1f} MiB), full "
        f"attention's KV-cache step {dec['standard'][first]['median_s'] * 1e3:.2f} → "
        f"{dec['standard'][last]['median_s'] * 1e3:.1f} ms (cache {dec['standard'][first]['state_bytes'] / 2**20:.1f} → "
        f"{dec['standard'][last]['state_bytes'] / 2**20:.1f} MiB).\n"
        f"* **DeltaNet's chunkwise form vs its recurrent loop** ({int(op_len):,} tokens): "
        f"{ops[op_len]['delta_chunkwise_ms']:.0f} vs {ops[op_len]['delta_recurrent_ms']:.0f} ms, "
        f"{_target(layers['targets'][f'delta_chunkwise_speedup_{op_len}'])}; DeltaNet chunkwise ÷ linear attention "
        f"chunkwise {_target(layers['targets'][f'delta_vs_linear_{op_len}'])}.\n"
        f"* **Whole 2-layer models** (with feed-forward) at {m['seq_len']:,} tokens: "
        + ", ".join(f"{_LAYERS[name]} {m['models'][name]['median_s']:.2f} s"
                    for name in sorted(m["models"], key=lambda name: m["models"][name]["median_s"])) + ".")


_ANSWER = {"better": "**yes**", "worse": "**no, it makes the model worse**", "not separated": "**not separated**"}


def conversion_similarity(m: dict) -> str:
    """Report 02: the terraced conversion against the original and the no-retrieval references."""
    ppl, paired, goals, cal = m["perplexity"]["all"], m["paired"], m["goals"], m["calibration"]
    span = 2 * m["chunk_size"]
    lora = cal["lora"]
    return (
        f"* **Conversion of SmolLM2-135M-Instruct** (`reports/02_conversion_similarity.html`; {m['windows']} "
        f"{m['split']} windows of {m['seq_len']:,} tokens, {m['windows_per_source']} from each source "
        f"({', '.join(m['sources'])}), chunk {m['chunk_size']}, {m['sink_size']} sinks, {m['tokens_scored']:,} tokens "
        f"scored after the first chunk; perplexity ratios to the original ({ppl['original']['ppl']:.2f}) with 95% "
        f"block-bootstrap intervals). Terraced retrieval (own + previous chunk exact, older chunks in feature-space "
        f"states) after attention transfer and LoRA: **{_ratio(ppl['terraced_lora'])}** (goal ≤ 1.05×: "
        f"{goals['within_1_05x']}). Against the sliding window {span} + sinks given the same LoRA budget "
        f"({_ratio(ppl['sliding_span_sinks_lora'])}): paired ratio "
        f"**{_ratio(paired['terraced_lora/sliding_span_sinks_lora']['all'])}** (goal below 1: "
        f"{goals['beats_sliding_window_same_lora']}). Does retrieval help? "
        f"{_ANSWER[paired['terraced_transfer/terraced_exact']['all']['verdict']]}: terraced + transfer ÷ its exact "
        f"region alone **{_ratio(paired['terraced_transfer/terraced_exact']['all'])}**. "
        f"Without training: exact region alone {_ratio(ppl['terraced_exact'])}, sliding window {span} + sinks "
        f"{_ratio(ppl['sliding_span_sinks'])}, own chunk + sinks {_ratio(ppl['own_chunk_sinks'])}; the earlier "
        f"normalised retrieval, calibrated: {_ratio(ppl['normalized_calibrated'])}; the seed formula "
        f"{sig(ppl['seed']['ratio'])}×. Calibration: {cal['transfer']['seconds'] / 60:.1f} min of attention transfer "
        f"+ {lora['seconds']['terraced_lora'] / 60:.1f} min of LoRA (rank {lora['rank']}, {lora['steps']} steps of "
        f"{lora['seq_len']:,} tokens) on {cal['threads']} threads. State after 40,960 tokens: "
        f"{m['state']['40960']['ratio']:.4f}× the KV cache. Files: `data/02_conversion_similarity/terraced.safetensors` "
        f"+ `terraced_lora.safetensors` (`load_conversion`, `load_lora`)."
    )


def chunk_size_ablation(m: dict) -> str:
    """Report 03: chunk size × compression of the calibrated terraced conversion, its state and one layer's speed."""
    best, state = m["best_calibrated"], m["state_goal"]
    low, high = m["original_perplexity_interval"]
    times = m["layer_median_s"]

    def layer(goal: dict) -> str:
        n = goal["seq_len"]
        original = next(v for k, v in times.items() if k.startswith("original") and k.endswith(f"n{n}"))
        peaks = m["layer_peak_bytes"]
        original_peak = next(v for k, v in peaks.items() if k.startswith("original") and k.endswith(f"n{n}"))
        # 3 significant digits, as the report writes them
        return (f"at {n:,} tokens the original layer (fused SDPA) takes {sig(original * 1e3)} ms, peak "
                f"{sig(original_peak / 2**20)} MiB; terraced "
                + ", ".join(f"chunk {int(c):,} {sig(times[f'terraced c{c} n{n}'] * 1e3)} ms ({verdict_word(v)}), peak "
                            f"{sig(peaks[f'terraced c{c} n{n}'] / 2**20)} MiB"
                            for c, v in sorted(goal["met"].items(), key=lambda item: int(item[0]))))

    return (
        f"* **Chunk size × compression** (`reports/03_chunk_size_ablation.html`; terraced retrieval calibrated by "
        f"attention transfer, {m['calibration_steps']} steps/layer; {m['scored_tokens']:,} validation tokens of both "
        f"sources scored where every configuration retrieves; original perplexity {m['original_perplexity']:.2f} "
        f"[{low:.2f}, {high:.2f}]). Best calibrated: chunk {best['chunk_size']}, compression "
        f"÷{best['compression_factor']}: {best['perplexity']:.2f} ({best['vs_original']:.3f}× the original, "
        f"{best['vs_exact_region']:.3f}× its exact region alone [{best['vs_exact_region_interval'][0]:.3f}, "
        f"{best['vs_exact_region_interval'][1]:.3f}]); {m['calibrated_gaining_on_exact_region']} calibrated "
        f"configurations beat the exact region of their chunk size (paired interval below 1). **State** at chunk "
        f"{state['chunk_size']}, uncompressed, after {state['tokens']:,} tokens: {state['state_vs_kv_cache']:.4f}× the "
        f"fp32 KV cache (goal ≤ {state['goal_ratio']}×: {verdict_word(state['met'])}). **One attention layer** (goal: no "
        f"slower at the first length, faster at the last): {layer(m['layer_goal_no_slower'])}; "
        f"{layer(m['layer_goal_faster'])}."
    )


def attention_analysis(m: dict) -> str:
    """Report 04: router recall of the original's attention mass at an equal token budget."""
    best = m["best_router"]
    budget = m["headline_budget"]
    meta = m["recall"].get(f"meta_b{m['chunk_size']}")
    meta_layers = m["layers_beating_recency"].get(f"meta_b{m['chunk_size']}")
    mean_group = f"mean_p8_group_b{m['block_size']}"
    text = (
        f"* **Which earlier blocks does a token need?** (`reports/04_attention_analysis.html`; the original SmolLM2's "
        f"attention, {m['layers']} layers × {m['heads']} heads, {m['windows']} {m['split']} windows of "
        f"{m['seq_len']:,} tokens from {' and '.join(m['sources'])}; recall = the share of a query's attention mass "
        f"on the retrievable earlier blocks that a router's top-k blocks hold, {budget} retrieved tokens, blocks of "
        f"{m['block_size']}). Best router — {router_words(best['method'])}: recall **{best['recall']:.3f}** against "
        f"recency {best['recency']:.3f}, chance {best['chance']:.3f} and the oracle {best['oracle']:.3f}; it beats "
        f"recency in **{best['layers_beats_recency']} of {m['layers']} layers** (goal ≥ {m['goal_layers']}: "
        f"{'met' if m['goal_met'] else 'missed'}; 95% t-intervals across windows).")
    if mean_group in m["recall"]:
        text += (f" The router the passkey and long-document experiments use "
                 f"({router_words(mean_group.rsplit('_b', 1)[0])}):"
                 f" {m['recall'][mean_group]:.3f}, {m['layers_beating_recency'][mean_group]} layers.")
    if meta is not None:
        text += (f" The seed's meta-query/meta-key chunk routing (calibrated, chunks of {m['chunk_size']}): "
                 f"{meta:.3f}, beating recency in {meta_layers} layers.")
    return text


_PASSKEY_NAMES = {"original": "the original", "blocks_mean": "blocks (mean keys)",
                  "blocks_mean_compact": "blocks (mean keys, compact positions)",
                  "blocks_minmax": "blocks (Quest's min/max)", "blocks_meta": "blocks (BSBR's meta router, whole chunks)",
                  "exact_region": "exact region alone",
                  "terraced": "terraced + LoRA", "sliding_window": "sliding window + sinks"}


def long_range(m: dict) -> str:
    """Report 05: passkey retrieval, exact match and the answer's log-probability out of reach."""
    lengths = m["lengths"]
    opts = m["blocks_options"]
    acc = "; ".join(
        f"{_PASSKEY_NAMES.get(v, v)} " + ", ".join(
            accuracy_text(m["accuracy"][v][str(n)], *m["ci95"][v][str(n)], trials=m["trials_per_headline_cell"])
            for n in lengths)
        for v in m["accuracy"])
    # the blocks variants that share blocks_options; blocks_meta retrieves whole chunks (at least as many tokens)
    query_routed = [v for v in m["attended_tokens"] if v.startswith("blocks") and v != "blocks_meta"]
    meta_note = ""
    if "blocks_meta" in m["attended_tokens"]:
        meta_note = (f"; BSBR's meta router: whole chunks, at most {max(m['attended_tokens']['blocks_meta'].values()):,} "
                     "tokens")
    task = {"passkey": "Mohtashami & Jaggi's passkey test (repeated-sentence filler)",
            "fact_in_text": "a fact in held-out text"}.get(m.get("task", "fact_in_text"), m.get("task"))
    text = (
        f"* **Passkey retrieval** (`reports/05_long_range.html`; {task}, {', '.join(f'{n:,}' for n in lengths)} "
        f"tokens, {len(m['depths'])} depths × {m['trials_per_cell']} trial{'s' if m['trials_per_cell'] != 1 else ''}"
        f": n = {m['trials_per_headline_cell']} per "
        f"length and variant, Wilson 95% intervals; block retrieval: chunk {m['chunk_size']}, top {opts['top_k']} "
        f"blocks of {opts['block_size']} scored by their best {opts.get('page_size') or opts['block_size']}-token "
        f"page, {opts['sink_size']} sinks, at most {max(max(m['attended_tokens'][v].values()) for v in query_routed):,} tokens "
        f"attended per query{meta_note}). Exact-match accuracy by length ({', '.join(f'{n:,}' for n in lengths)}): {acc}.")
    long_n = len(m["depths"]) * m.get("long_trials_per_cell", m["trials_per_cell"])
    past = {v: [n for n in m.get("long_lengths", []) if str(n) in m["accuracy"][v]] for v in m["accuracy"]}
    if any(past.values()):
        text += (f" Past SmolLM2's {m['max_position_embeddings']:,} trained positions: " +
                 "; ".join(f"{_PASSKEY_NAMES.get(v, v)} " + ", ".join(
                     f"{n:,}: " + accuracy_text(m["accuracy"][v][str(n)], *m["ci95"][v][str(n)], trials=long_n)
                     for n in ns)
                     + f" (goal ≥ 90%: {m['goals'][v]['accuracy_past_8k']})" for v, ns in past.items() if ns) + ".")
    worst = min(lengths, key=lambda n: m["accuracy"]["original"][str(n)])
    if m["accuracy"]["original"][str(worst)] < 0.95:
        text += (f" The original itself reaches only {m['accuracy']['original'][str(worst)]:.1f} at {worst:,} tokens, "
                 f"so exact match cannot test the ≥ 95% goal there.")
    lp = m.get("out_of_reach_answer_logprob")
    if lp:
        text += (f" With the fact out of reach of the exact region and the window ({m['out_of_reach_trials']} "
                 f"samples), the answer's log-probability (nats) minus the original's, paired, 95% bootstrap: " +
                 "; ".join(f"{_PASSKEY_NAMES.get(v, v)} **{r['minus_original']:+.2f}** [{r['ci95'][0]:+.2f}, "
                           f"{r['ci95'][1]:+.2f}]" for v, r in lp.items() if v != "original") +
                 f" (the original's mean: {lp['original']['mean']:.2f}).")
    return text


def _flat_ratio(m: dict) -> str:
    """Report 06's flatness threshold as its notebook writes it: ``1.5×``."""
    return f"{m['flat_ratio']}×"


def _flat(row: dict, ratio: str) -> str:
    """One variant's flatness record against ``ratio`` (:func:`_flat_ratio`)."""
    if row["met"] is None:
        return "no bins past it"
    return (f"{'met' if row['met'] else 'missed'}: {row['exceeding']} bins above {ratio} its median before "
            f"({row['reference_ppl']:.1f}), the highest {row['max_beyond_ppl']:,.1f} at {row['max_beyond_start']:,}")


def _within_range(m: dict) -> str:
    """The flatness rule applied before ``flat_from`` to the original (nothing past its trained context there): how
    far the text alone moves a bin (report 06, from runs that record it)."""
    row = m["flatness"].get("original", {})
    if row.get("max_before_ppl") is None:
        return ""
    bins = f"{row['exceeding_before']} bin{'' if row['exceeding_before'] == 1 else 's'}"
    return (f" The same rule before {m['flat_from']:,}, where nothing is past the trained context: the original has "
            f"{bins} above {_flat_ratio(m)} its median, the highest {row['max_before_ppl']:,.1f} at "
            f"{row['max_before_start']:,} ({row['max_before_ppl'] / row['reference_ppl']:.2f}×).")


def _paired(m: dict) -> str:
    """The flatness goal with the text held fixed (report 06, when the run measured it)."""
    row = m.get("flatness_against_original", {}).get("blocks")
    if not row or row["met"] is None:
        return ""
    return (f" With the text held fixed (perplexity ÷ the original's on the same tokens, within its trained context): "
            f"blocks {row['reference_ratio']:.3f} before, at most {row['max_beyond_ratio']:.3f} after "
            f"(**{row['max_over_reference']:.2f}×**; {'met' if row['met'] else 'missed'}).")


def long_documents(m: dict) -> str:
    """Report 06: a long held-out stream through block retrieval with compact positions vs the original."""
    b, early, late, flat, dec = m["blocks"], m["perplexity_original_range"], m["perplexity_late"], m["flatness"], \
        m["decode"]
    lo, hi = m["late_range"]
    ratio = _flat_ratio(m)
    return (
        f"* **Long documents** (`reports/06_long_documents.html`; {m['text']} ({m['text_split']}), "
        f"{m['tokens_streamed']:,} tokens streamed in pieces of {m['piece_size']}; block retrieval: chunk "
        f"{m['chunk_size']}, top {b['top_k']} blocks of {b['block_size']} by mean keys per {b['page_size']}-token "
        f"page, {b['sink_size']} sinks, positions {b['positions']}). Perplexity over the trained range "
        f"(0–{m['original_range_end']:,}): blocks {early['blocks']:.2f}, its exact region alone "
        f"{early['exact_region']:.2f}, the original {early['original']:.2f}. On the last stretch "
        f"({lo:,}–{hi:,}): blocks **{late['blocks']:.2f}**, exact region {late['exact_region']:.2f}, the original "
        f"started fresh there {late['original_fresh']:.2f}; the original's own KV cache, streamed to "
        f"{m['windows']['original'][1]:,}: flatness {_flat(flat['original'], ratio)}. "
        f"Flatness goal for blocks (no 1,024-token bin past {m['flat_from']:,} above {ratio} the median before): "
        f"{_flat(flat['blocks'], ratio)}; exact region alone {_flat(flat['exact_region'], ratio)}."
        f"{_within_range(m)}{_paired(m)} "
        f"Decode at {dec['context']:,} tokens: slowest of {dec['steps']} steps {dec['max_over_median']:.2f}× the median "
        f"({dec['median_s'] * 1000:.0f} ms; {dec['first_median_s'] * 1000:.0f} ms at {dec['first_context']:,}; goal "
        f"≤ {m['decode_ratio']}×: {'met' if dec['met'] else 'missed'}). Cache: "
        f"{m['memory_bytes_per_token']['blocks']:,.0f} bytes per token "
        f"({m['memory_vs_kv_cache']['blocks']:.2f}× the original's KV cache). {_machine_load(m)}")


def _machine_load(m: dict) -> str:
    """Report 06's machine: its CPU, and other processes' cores around the streams where the run measured them (the
    1-min load average still carries the previous stage), with the busy warning; else the load average."""
    others = m.get("other_cores") or {}
    if others.get("before") is None and others.get("after") is None:
        return (f"Timed on {format_cpu(m.get('machine'))}; load average {m['load_average']['before'][0]:.2f} "
                f"before, {m['load_average']['after'][0]:.2f} after.")
    said = " and ".join(f"{others[k]:.2f} {k}" for k in ("before", "after") if others.get(k) is not None)
    return (f"Timed on {format_cpu(m.get('machine'))}; other processes' cores around the streams: {said}"
            + (" (**busy: these times are not a quiet-machine result**)." if m.get("busy") else "."))


def _edges(chosen: dict, grid) -> str:
    """`` `` + the sentence reports 07 and 08 print in their findings on the rates at the edge of the grid, once for
    all models (:func:`bsbr.convergence.grid_edge_summary`), or ``""``."""
    sentence = grid_edge_summary(chosen, grid)
    return " " + sentence if sentence else ""


#: architectures of report 08 whose chunk or window changes what they compute (their span is worth printing)
SPAN_SENSITIVE = ("bsbr", "gau", "sliding_window")


def associative_recall(m: dict) -> str:
    """Report 08: MQAR trained from scratch, test accuracy per architecture against its state size."""
    task, train, goals = m["task"], m["training"], m["goals"]
    span = m["spans"][0]
    ranked = sorted(m["architectures"].items(), key=lambda item: -item[1]["accuracy"])
    attention = goals["attention_accuracy"]
    text = (
        f"* **Associative recall (MQAR) from scratch** (`reports/08_associative_recall.html`; Zoology's task: "
        f"vocabulary {task['vocab_size']:,}, {task['seq_len']} tokens, {task['num_pairs']} pairs, "
        f"{task['test_answers']:,} test answers per seed; 2 layers of width {m['model']['hidden_dim']} with a "
        f"kernel-{m['model']['short_conv']} embedding convolution; {train['steps']} steps × {train['batch_size']}, "
        f"learning rate per architecture from {train['learning_rates']} on validation, {len(train['seeds'])} seeds, "
        f"95% t-intervals over seeds; chunk/window {span}: "
        f"{100 * m['outside_fraction'][f'chunk_{span}']:.0f}% of the answers lie outside BSBR's own chunk, "
        f"{100 * m['outside_fraction'][f'window_{span}']:.0f}% outside the window). Test accuracy (state per "
        f"sequence, values): " + "; ".join(f"{name} {percent_text(a)} ({a['state_values']:,})" for name, a in ranked)
        + f". Full attention ≥ {100 * attention['goal']:.0f}%: **{'met' if attention['met'] else 'missed'}**"
        + ("" if attention["met"] else " (the quick tier's budget is too small to learn the task)") + ".")
    ranking = m.get("separations")  # which pairs of the registered architectures the intervals tell apart
    if ranking is not None and ranking["pairs"]:
        undecided = ranking["undecided"]
        text += (f" Separated by their intervals at span {ranking['span']}: {ranking['separated']} of "
                 f"{ranking['pairs']} pairs ({ranking['paired_separated']} by the seed-paired difference)"
                 + (f"; undecided: {', '.join(f'{a}–{b}' for a, b in undecided)}." if undecided else "."))
    blocks = m.get("bsbr_blocks")
    if blocks is not None:
        outside = m["outside_fraction"][f"own_and_previous_{blocks['chunk_size']}"]
        text += (f" BSBR with exact block retrieval (`bsbr_blocks`: chunk {blocks['chunk_size']}, top-{blocks['top_k']} "
                 f"of {blocks['block_size']}-token blocks, ≤ {blocks['attended_tokens_max']:,} tokens attended per query): "
                 f"{100 * outside:.0f}% of the answers lie outside its own and previous chunk.")
    factor = m.get("bsbr_compression_factor")
    if factor is not None:
        text += (f" BSBR compressed (`bsbr_compressed`): BSBR with each chunk state compressed {factor}× by a learned "
                 "linear map, a state near linear attention's and the sliding window's.")
    who = {"bsbr": "BSBR", "bsbr_blocks": "BSBR blocks", "bsbr_compressed": "BSBR compressed"}
    # the headline comparisons (the first span; block retrieval at its own chunk), and the others where the two states
    # are within 2× (comparable state); the report lists them all
    shown = [c for c in goals["bsbr_vs"] if c["span"] == span or c.get("model") == "bsbr_blocks"
             or 0.5 <= c["bsbr_state_values"] / c["other_state_values"] <= 2]
    left_out = len(goals["bsbr_vs"]) - len(shown)
    for c in shown:
        other_span = c.get("other_span", c["span"])  # shown where the other's own chunk/window differs
        spans = f"{c['span']} vs {other_span}" if other_span != c["span"] and c["other"] in SPAN_SENSITIVE else c["span"]
        text += (f" {who[c.get('model', 'bsbr')]} vs {c['other']} (span {spans}): **{c['verdict']}**, "
                 f"{points_text(c)} with "
                 f"{c['bsbr_state_values'] / c['other_state_values']:.1f}× its state.")
    if left_out:
        text += (f" ({left_out} more comparison{'s' if left_out > 1 else ''}, between states more than 2× apart, "
                 f"in the report.)")
    frontier = goals.get("frontier") or []
    if frontier:
        def where(f):
            if f["frontier"] is None:
                return f"{f['label']} ({f['state_values']:,}): {f['verdict']}"
            return (f"{f['label']} ({f['state_values']:,}): **{f['verdict']}**, {points_text(f)} against "
                    f"{f['frontier']} ({f['frontier_state_values']:,})")
        text += (" On the accuracy-vs-state frontier (against the most accurate other architecture with no larger "
                 "state, paired by seed): " + "; ".join(where(f) for f in frontier) + ".")
    text += _edges({name: a["learning_rate"] for name, a in ranked}, train["learning_rates"])
    return text + f" Run: {m['run_seconds'] / 60:.1f} min."


def training(m: dict) -> str:
    """Report 07: language-model training from scratch against the n-gram floors: final validation loss and steps to
    a target below the bigram floor, each with its t-interval over seeds, and which pairs the intervals separate."""
    setup, models, floors = m["setup"], m["models"], m["ngram_floors"]
    interval = lambda low, high: "" if low is None else f" [{low:.3f}, {high:.3f}]"
    by_final = sorted(models, key=lambda name: models[name]["final_val_loss"])
    by_steps = sorted(models, key=lambda name: (models[name]["steps_to_target"] is None,
                                                models[name]["steps_to_target"] or 0, models[name]["final_val_loss"]))
    final = ", ".join(f"{name} {models[name]['final_val_loss']:.3f}"
                      f"{interval(models[name]['final_val_loss_low'], models[name]['final_val_loss_high'])}"
                      for name in by_final)

    def steps(name):
        return f"{name} {steps_text(models[name], setup['seeds'])}"  # as report 07 and the index write them

    rates = ", ".join(f"{name} {models[name]['learning_rate']:g}" for name in by_final)
    bigram = floors["bigram"]["val_loss"]
    above = [n for n in by_final if models[n]["final_val_loss_low"] is not None and models[n]["final_val_loss_low"] > bigram]
    holds = [n for n in by_final if n not in m["below_bigram_floor"] and n not in above]  # interval holds the floor
    separated = m["separated"]
    loads = m.get("load_average") or {}
    load = ("" if not loads.get("before") else
            f"; load average {loads['before'][0]:.2f} at the start, {loads['after'][0]:.2f} at the end")
    floor_text = ", ".join(f"{name} {f['val_loss']:.3f}" for name, f in floors.items())
    params = [r["params"] for r in models.values()]
    return (
        f"* **Training from scratch** (`reports/07_training.html`; byte-level, hidden {setup['hidden_dim']}, "
        f"{setup['num_layers']} layers, parameters {min(params):,}–{max(params):,} (matched within "
        f"{100 * setup['max_param_difference']:.2g}%), {setup['steps']} steps × {setup['tokens_per_run'] // setup['steps']:,} "
        f"bytes, learning rate per architecture from {setup['learning_rates']} on validation, {setup['seeds']} seeds, "
        f"95% t-intervals over seeds). Count n-gram floors (nats/byte): {floor_text}. Final validation loss "
        f"(nats/byte): {final}; below the bigram floor with the whole interval: "
        f"{', '.join(m['below_bigram_floor']) or 'none'}" + (f"; above it: {', '.join(above)}" if above else "")
        + (f"; undecided (the interval holds the floor): {', '.join(holds)}" if holds else "") + ". Steps to "
        f"{m['target_val_loss']:.3f} nats/byte ({m['target_source']}): {', '.join(steps(n) for n in by_steps)}. "
        f"Separated by their intervals: {len(separated['final_val_loss'])} of {separated['pairs']} pairs by final "
        f"loss ({len(separated['final_val_loss_paired'])} by the seed-paired difference), "
        f"{len(separated['steps_to_target'])} by steps ({len(separated['steps_to_target_paired'])} paired). "
        f"Chosen rates: {rates}.{_edges({n: models[n]['learning_rate'] for n in by_final}, setup['learning_rates'])} "
        f"Run: {m['run_seconds'] / 60:.1f} min on {m['machine']['threads']} thread(s){load}.")


#: A larger calibration of report 02, closer to LoLCATs' budget (README: keys of params.yaml's default section)
LARGER_CALIBRATION = {"transfer_windows_per_source": 4, "transfer_steps": 200, "lora_steps": 400, "lora_eval_every": 50}


def calibration_cost(m: dict) -> str:
    """Report 02's calibration: what each phase took in the run behind the metrics, the rate per step, and the larger
    calibration (:data:`LARGER_CALIBRATION`) estimated at those rates, with the keys that run it. The estimate
    takes transfer time as proportional to steps × windows and LoRA time (its curve evaluations included) to steps."""
    cal = m["calibration"]
    transfer, lora, normalized = cal["transfer"], cal["lora"], cal["normalized"]
    per_window_step = transfer["seconds"] / (transfer["steps"] * transfer["windows"])
    lora_seconds = lora["seconds"]  # variant -> seconds: the terraced model and the sliding-window control
    per_lora_step = sum(lora_seconds.values()) / (len(lora_seconds) * lora["steps"])
    larger = LARGER_CALIBRATION
    windows = larger["transfer_windows_per_source"] * len(m["sources"])
    estimate = (larger["transfer_steps"] * windows * per_window_step
                + larger["lora_steps"] * per_lora_step * len(lora_seconds) + normalized["seconds"])
    keys = "".join(f"  {key}: {value}\n" for key, value in larger.items())
    return (
        f"In the run behind `reports/02_conversion_similarity.html`, its calibration took "
        f"{(cal['terraced_total_seconds'] + lora_seconds['sliding_span_sinks_lora'] + normalized['seconds']) / 60:.1f} "
        f"min on {cal['threads']} threads: attention transfer {transfer['seconds'] / 60:.1f} min ({transfer['steps']} "
        f"full-batch steps per layer on {transfer['windows']} windows of {m['seq_len']:,} tokens: "
        f"{per_window_step:.2f} s per step and window), LoRA {lora_seconds['terraced_lora'] / 60:.1f} min for the "
        f"terraced model and {lora_seconds['sliding_span_sinks_lora'] / 60:.1f} min for the sliding-window control "
        f"({lora['steps']} steps of {lora['seq_len']:,} tokens, {per_lora_step:.1f} s a step with the perplexity "
        f"curve's evaluations), the normalised retrieval {normalized['seconds'] / 60:.1f} min. Nothing stops it at "
        f"that size: report 02 gives the time it took, and its perplexity-vs-LoRA-steps curve how far the steps got. "
        f"A larger calibration, closer to LoLCATs' budget ({larger['transfer_steps']} transfer steps on "
        f"{windows} windows, {larger['lora_steps']} LoRA steps for each model), would take about "
        f"{estimate / 3600:.1f} h at these rates: set these keys in `params.yaml`, then `dvc exp run` (DVC's `-S` "
        f"cannot name these sections: [Parameter sweeps](#parameter-sweeps)):\n\n```yaml\n"
        f"02_conversion_similarity:\n{keys}```"
    )


FORMATTERS = {"01_scaling": scaling, "02_conversion_similarity": conversion_similarity, "03_chunk_size_ablation": chunk_size_ablation,
              "04_attention_analysis": attention_analysis, "05_long_range": long_range,
              "06_long_documents": long_documents, "07_training": training,
              "08_associative_recall": associative_recall}


def stage_times(reports_dir: Path) -> str | None:
    """How long each report's notebook ran, read from the reports in ``reports_dir`` (their last line, written by
    render_report.stage_run from papermill's record), with the profile each ran in and, where its metrics
    (``reports_dir/metrics/<name>.json``) count ``resumed_pairs``, that the time is its last start's; None if no
    report says."""
    # a stage that resumed from its scoring log (bsbr.experiment.ResumeLog) ran only its last start here
    runs = [(row["name"][:2], row["run_seconds"], row["profile"], row["metrics"].get("resumed_pairs", 0))
            for row in collect(reports_dir) if row["run_seconds"] is not None]
    if not runs:
        return None
    profiles = {profile for _, _, profile, _ in runs}
    each = ", ".join(f"{number} {seconds / 60:.1f}" + ("" if len(profiles) == 1 else f" ({profile})")
                     + (f" (its last start; {resumed} scored pairs came from the log of earlier starts)"
                        if resumed else "")
                     for number, seconds, profile, resumed in runs)
    which = f"the {profiles.pop()} profile" if len(profiles) == 1 else "the profile named beside each"
    return (f"How long each notebook of the reports now in `reports/` ran (papermill's record, printed as each "
            f"report's last line), in minutes, in {which}: {each}; "
            f"{sum(seconds for _, seconds, _, _ in runs) / 3600:.1f} h in all.")


def fresh_clone(reports_dir: Path) -> str | None:
    """The fresh-clone timing of the README's first command, from ``reports_dir/fresh_clone_repro.json`` (written by
    ``pipelines/time_fresh_clone.py``): minutes in all against the budget, per part and per notebook, the load
    average around it, the revisions the reports were stamped with; None if there is no record."""
    path = reports_dir / "fresh_clone_repro.json"
    if not path.is_file():
        return None
    r = json.loads(path.read_text())
    minutes = r["total_seconds"] / 60
    verdict = "met" if minutes <= r["budget_minutes"] else "missed"
    parts = ", ".join(f"{name[:2]} {seconds / 60:.1f}" for name, seconds in sorted(r["notebooks"].items()))
    stamps = r["report_revisions"]
    stamped = (f"Every report was stamped with that one revision ({stamps[0][:10]})"
               if stamps == [r["revision"]] else f"The reports were stamped with {', '.join(s[:10] for s in stamps)}")
    load = ["not recorded" if la is None else "/".join(f"{x:.2f}" for x in la)
            for la in (r["load_average_before"], r["load_average_after"])]
    return (f"Measured on a fresh clone at {r['revision'][:7]} on {r['date'][:10]} (`python "
            f"pipelines/time_fresh_clone.py`: `make setup`, then `make repro` in the default profile; {r['machine']}; "
            f"load average {load[0]} before and {load[1]} after, 1/5/15 min): **{minutes:.1f} min in all** (budget "
            f"{r['budget_minutes']:.0f}: {verdict}): setup {r['setup_seconds'] / 60:.1f}, the notebooks {parts}, and "
            f"{r['other_seconds'] / 60:.1f} min for the rest (the data stages, renders, index and README blocks). "
            f"{stamped}, and `dvc status` was "
            f"{'clean' if r['dvc_status_clean'] else 'not clean'} afterwards.")


#: README blocks made from the rendered reports rather than from one metrics file: name -> formatter(reports_dir)
REPORT_BLOCKS = {"stage_times": stage_times, "fresh_clone": fresh_clone}

BLOCK = re.compile(r"<!-- results:([\w-]+) -->\n(.*?)\n<!-- /results:\1 -->", re.S)


#: README blocks that read another block's metrics file: name -> (metrics file stem, formatter)
EXTRA_BLOCKS = {"calibration_cost": ("02_conversion_similarity", calibration_cost)}


def render(readme: str, metrics_dir: Path = METRICS, reports_dir: Path | None = None) -> str:
    """``readme`` with every block that has a formatter and a metrics file rewritten from that file (its own, or the
    one :data:`EXTRA_BLOCKS` names), and the blocks of :data:`REPORT_BLOCKS` from the reports in ``reports_dir``
    (default: the parent of ``metrics_dir``)."""
    reports_dir = metrics_dir.parent if reports_dir is None else reports_dir

    def block(match: re.Match) -> str:
        name = match.group(1)
        if name in REPORT_BLOCKS:
            text = REPORT_BLOCKS[name](reports_dir)
        else:  # a metrics file's block: the stage's own (FORMATTERS) or another view of one (EXTRA_BLOCKS)
            stem, formatter = EXTRA_BLOCKS.get(name, (name, FORMATTERS.get(name)))
            path = metrics_dir / f"{stem}.json"
            text = formatter(json.loads(path.read_text())) if formatter is not None and path.is_file() else None
        return match.group(0) if text is None else f"<!-- results:{name} -->\n{text}\n<!-- /results:{name} -->"
    return BLOCK.sub(block, readme)


def stale_blocks(readme: str, metrics_dir: Path = METRICS, reports_dir: Path | None = None) -> list[str]:
    """Names of the blocks of ``readme`` whose text differs from what their metrics file (or the reports) give."""
    wanted = dict(BLOCK.findall(render(readme, metrics_dir, reports_dir)))
    return [name for name, text in BLOCK.findall(readme) if wanted[name] != text]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if README.md is stale")
    args = parser.parse_args(argv)
    current = README.read_text()
    if args.check:
        stale = stale_blocks(current)
        if stale:
            print(f"README.md is stale for {stale}: run python pipelines/readme_results.py", file=sys.stderr)
        return 1 if stale else 0
    wanted = render(current)
    if wanted != current:
        tmp = README.with_suffix(".md.tmp")  # written whole, then renamed
        tmp.write_text(wanted)
        tmp.replace(README)
    return 0


if __name__ == "__main__":
    sys.exit(main())
