"""Render an executed notebook to a self-contained HTML report (the command of every render stage).

    python pipelines/render_report.py data/01_scaling/01_scaling.ipynb reports/01_scaling.html

* Code is hidden (inputs and prompts excluded, papermill's injected-parameters cell included); markdown,
  printed output (the provenance cell), tables and figures stay.
* Figures are inline base64 PNG; the lab template's CSS is inlined.
* Nothing is fetched when the file is opened: the template's CDN scripts (require.js, MathJax, Mermaid,
  widget manager) are left out, and any remaining ``<script src="http...">``/``<link href="http...">`` tag
  is an error. Consequence: LaTeX in markdown is shown as typed (write formulas in Unicode).
* What belongs in the terminal stays there (it is kept in the executed .ipynb and papermill's log): stderr
  streams (warnings, logging, model-hub retries, tracebacks printed by libraries), tqdm progress bars (lines
  with ``\\r`` redraws or tqdm's ``12/30 [00:07<03:28, 7.18s/it]`` status, and ipywidgets bars) are left out of
  the page; other printed lines stay, a ``\\r`` redraw collapsed to its final state.
* A notebook with an error output (a failed run) is not rendered: FailedNotebookError.
* Layout (:func:`report_layout`, what a reader sees first): the question (the first markdown cell), then a
  ``<section class="what-we-found">`` box with the headline figure across its top (readable) and the run's summary
  cells below it, then the body, then collapsed ``<details class="appendix">``: the set-up cells (parameters,
  provenance, run log) and each "Appendix" section. Summary cells, in order of precedence: cells tagged
  ``summary``; the section under a markdown heading "What we found" / "Conclusion(s)" / "Summary" (the heading
  becomes the box's own); a code cell whose output has such a heading; the
  run of cells with outputs right before the first appendix heading. Headline figure: a cell tagged
  ``headline-figure``; else the first figure of the summary; else the nearest figure before the summary, else after
  it. Appendices: cells tagged ``appendix`` and every section under a heading "Appendix ..." / "Appendices".
  Last line: how long the notebook ran (:func:`stage_run`, papermill's record), in ``data-run-seconds``; in
  ``<head>``, ``<meta name="bsbr-rendered-at">``: the revision the page was rendered at.
  Wide tables scroll inside their own box and images shrink to the page, so the page never scrolls sideways.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import bs4
import jinja2
import nbformat
from nbconvert import HTMLExporter
from nbconvert.preprocessors import CoalesceStreamsPreprocessor, Preprocessor

from bsbr.provenance import git_revision

# Lab template minus every block that loads something from a CDN.
_TEMPLATE = "bsbr_offline.html.j2"
_TEMPLATE_SOURCE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""

#: An element that makes the browser fetch a remote resource: <script src=http...>, <link href=http...>,
#: <img src=http...>, <iframe src=http...> or a CSS @import/url() of http(s).
EXTERNAL_RESOURCE = re.compile(
    r"""<(?:script|img|iframe)\b[^>]*\bsrc\s*=\s*["']?\s*(?:https?:)?//"""
    r"""|<link\b[^>]*\bhref\s*=\s*["']?\s*(?:https?:)?//"""
    r"""|@import\s+(?:url\()?\s*["']?\s*(?:https?:)?//"""
    r"""|url\(\s*["']?\s*(?:https?:)?//""",
    re.IGNORECASE,
)


#: A tqdm status line: "desc:  40%|####      | 12/30 [00:07<03:28,  7.18s/layer, loss=0.3]" or, without a total,
#: "desc: 12it [00:03,  4.00it/s]". Matched by its bar (``NN%|...| N``) or its time bracket (``[elapsed<``,
#: ``[elapsed,``).
PROGRESS_LINE = re.compile(r"\d{1,3}%\|.*\|\s*\d|\[(?:\d+:)?\d\d:\d\d(?:<|,\s)")

#: Output MIME types of interactive widgets (tqdm.notebook bars); a static page cannot show them.
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


class ExternalResourceError(RuntimeError):
    """The rendered HTML would load something over the network."""


class FailedNotebookError(RuntimeError):
    """The executed notebook holds an error output: its run failed, so there is no report to publish."""


def without_progress_bars(text: str) -> str:
    """Printed text without its progress-bar lines: each line's ``\\r`` redraws are collapsed to the final state,
    and a line whose final state is a tqdm status line (:data:`PROGRESS_LINE`) is dropped, with the blank lines a
    dropped bar leaves at the start."""
    kept, dropped = [], False
    for line in re.findall(r"[^\n]*\n|[^\n]+", text):  # lines split at "\n" only (str.splitlines splits at "\r")
        final = line.rstrip("\r\n").rsplit("\r", 1)[-1]
        if PROGRESS_LINE.search(final):
            dropped = True
        else:
            kept.append(final + ("\n" if line.endswith("\n") else ""))
    result = "".join(kept)
    return result.lstrip("\n") if dropped else result


class TerminalOutputFilter(Preprocessor):
    """Leaves out of the report what is written for the terminal: stderr streams, progress-bar lines of stdout
    streams and widget outputs. Run it after :class:`CoalesceStreamsPreprocessor` (a bar written in pieces is then
    one line). Raises FailedNotebookError on an error output."""

    def preprocess_cell(self, cell, resources, cell_index):
        kept = []
        for output in cell.get("outputs", []):
            if output.output_type == "error":
                raise FailedNotebookError(f"cell {cell_index} raised {output.ename}: {output.evalue}")
            if output.output_type == "stream":
                if output.name == "stderr":
                    continue
                output.text = without_progress_bars(output.text)
                if not output.text.strip():
                    continue
            elif WIDGET_MIME in output.get("data", {}):
                continue
            kept.append(output)
        cell.outputs = kept
        return cell, resources


#: A markdown heading that opens the summary section, or an appendix section (matched on the heading's text).
SUMMARY_HEADING = re.compile(r"^(what we found|conclusions?|summary)\b", re.IGNORECASE)
APPENDIX_HEADING = re.compile(r"^appendi(x|ces)\b", re.IGNORECASE)
#: "What we found" as a heading inside a cell's rendered output (HTML ``<h1-4>`` or a markdown ``#`` line).
SUMMARY_IN_OUTPUT = re.compile(r"<h[1-4][^>]*>\s*(what we found|conclusions?)\b"
                               r"|^#{1,4}\s+(what we found|conclusions?)\b", re.IGNORECASE | re.MULTILINE)

_LAYOUT_CSS = """
main { max-width: 1400px; margin: 0 auto; box-sizing: border-box; }
section.what-we-found { display: grid; grid-template-columns: minmax(0, 1fr); gap: 0.6em;
  border: 2px solid #2b6cb0; border-radius: 6px; padding: 0.4em 1em; margin: 0.8em 0 1.2em; }
section.what-we-found > h1, section.what-we-found > h2, section.what-we-found > h3 { order: 0; margin: 0.3em 0 0;
  font-family: var(--jp-content-font-family, system-ui, sans-serif); }
section.what-we-found > .what-we-found-figure { order: 1; }
section.what-we-found > .what-we-found-text { order: 2; }
/* the headline figure first, across the box (its legend and labels readable), at most ~60% of the window high */
section.what-we-found > .what-we-found-figure img { display: block; margin: 0 auto; max-height: 62vh; width: auto; }
details.appendix { border-top: 1px solid #ccc; margin: 0.6em 0; padding: 0.3em 0; }
details.appendix > summary { cursor: pointer; font-weight: bold; font-size: 1.1em; padding: 0.3em 0; }
.table-scroll { max-width: 100%; overflow-x: auto; }
img { max-width: 100%; height: auto; }
.jp-OutputArea-output { max-width: 100%; overflow-x: auto; }
.jp-OutputArea-output pre { white-space: pre-wrap; overflow-wrap: anywhere; }
"""


def _headings(cell) -> list[tuple[int, str]]:
    """(level, text) of the markdown ``#`` headings of a markdown cell."""
    if cell.cell_type != "markdown":
        return []
    return [(len(m.group(1)), m.group(2).strip()) for m in re.finditer(r"^(#{1,6})\s+(.+)$", cell.source, re.MULTILINE)]


def _has_figure(cell) -> bool:
    return any("image/png" in out.get("data", {}) or "image/svg+xml" in out.get("data", {})
               for out in cell.get("outputs", []))


def _output_text(cell) -> str:
    return "\n".join(str(out.get("data", {}).get(mime, "")) for out in cell.get("outputs", [])
                     for mime in ("text/html", "text/markdown"))


def _section(cells, start: int) -> list[int]:
    """Indices of the cells under the heading of markdown cell ``start``: up to the next heading of the same or a
    higher level."""
    level = _headings(cells[start])[0][0]
    end = next((i for i in range(start + 1, len(cells))
                if any(lvl <= level for lvl, _ in _headings(cells[i]))), len(cells))
    return list(range(start, end))


def report_layout(nb) -> dict:
    """Where each cell of an executed notebook goes in the report (indices into ``nb.cells``).

    Returns ``{"question": [i], "summary": [i, ...], "figure": i or None, "body": [...],
    "appendices": [(title, [i, ...]), ...]}``; every cell is in exactly one place. ``summary`` is empty when the
    notebook marks no summary (see the module docstring for the rules), and the report then has no box."""
    cells = nb.cells
    tags = [set(cell.metadata.get("tags", [])) for cell in cells]
    question = next((i for i, cell in enumerate(cells) if cell.cell_type == "markdown"), None)
    heading_cells = [i for i, cell in enumerate(cells) if _headings(cell)]

    appendix, appendix_titles = {}, []
    for i in heading_cells:
        text = _headings(cells[i])[0][1]
        if APPENDIX_HEADING.match(text) and i not in appendix:
            appendix_titles.append((text, _section(cells, i)))
            appendix.update(dict.fromkeys(_section(cells, i)))
    tagged_appendix = [i for i in range(len(cells)) if "appendix" in tags[i] and i not in appendix]

    summary = [i for i in range(len(cells)) if "summary" in tags[i]]
    if not summary:
        heading = next((i for i in heading_cells if SUMMARY_HEADING.match(_headings(cells[i])[0][1])), None)
        if heading is not None:
            summary = _section(cells, heading)
    if not summary:
        printed = [i for i, cell in enumerate(cells)
                   if cell.cell_type == "code" and SUMMARY_IN_OUTPUT.search(_output_text(cell))]
        summary = printed[:1]
    if not summary and appendix_titles:
        i = appendix_titles[0][1][0] - 1
        while i > (question or 0) and cells[i].cell_type == "code" and cells[i].get("outputs"):
            summary.insert(0, i)
            i -= 1

    figure = next((i for i in range(len(cells)) if "headline-figure" in tags[i]), None)
    if figure is None and summary:
        figure = next((i for i in summary if _has_figure(cells[i])), None)
        if figure is None:
            candidates = [i for i in range(len(cells)) if _has_figure(cells[i]) and i not in appendix]
            before = [i for i in candidates if i < summary[0]]
            after = [i for i in candidates if i > summary[-1]]
            figure = before[-1] if before else after[0] if after else None

    # set-up: the code cells between the question and the first heading (parameters, provenance, run log)
    first_section = next((i for i in heading_cells if i > (question or 0)), len(cells))
    placed = set(summary) | set(appendix) | set(tagged_appendix) | {question, figure} - {None}
    setup = [i for i in range((question or 0) + 1, first_section) if i not in placed]
    setup += [i for i in range(len(cells)) if tags[i] & {"parameters", "injected-parameters"} and i not in placed
              and i not in setup]
    placed |= set(setup)
    body = [i for i in range(len(cells)) if i not in placed]
    appendices = []
    if setup:
        appendices.append(("Set-up: parameters, provenance and run log", sorted(setup)))
    if tagged_appendix:
        appendices.append(("Appendix", tagged_appendix))
    appendices += appendix_titles
    return {"question": [] if question is None else [question], "summary": [i for i in summary if i != figure],
            "figure": figure, "body": body, "appendices": appendices}


def stage_run(nb) -> dict | None:
    """How long the stage's notebook ran, from papermill's record in the executed notebook's metadata:
    ``{"seconds": float, "start": str, "end": str}`` (ISO 8601 times), or None for a notebook papermill did not run
    (or whose run has no duration). A report 05 run resumed from its scoring log counts the last sitting only."""
    record = nb.metadata.get("papermill") or {}
    seconds = record.get("duration")
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds < 0:
        return None
    return {"seconds": float(seconds), "start": str(record.get("start_time") or ""),
            "end": str(record.get("end_time") or "")}


def _cell_id(cell) -> str:
    """The ``id`` nbconvert's lab template gives the cell's ``<div>``."""
    return f"cell-id={cell.id}"


def arrange(html: str, nb) -> str:
    """The nbconvert page rearranged by :func:`report_layout`: question, what-we-found box, body, appendices; wide
    tables wrapped in a scrolling box; the layout CSS added to ``<head>``."""
    layout = report_layout(nb)
    soup = bs4.BeautifulSoup(html, "html.parser")
    main = soup.find("main")
    by_id = {div["id"]: div for div in main.find_all("div", recursive=False) if div.get("id")}
    ids = [_cell_id(cell) for cell in nb.cells]
    if len(set(ids)) != len(ids) or not set(ids) <= set(by_id):
        raise ValueError("the rendered page's cells do not match the notebook's cells (missing or repeated cell ids)")
    cell = lambda i: by_id[ids[i]].extract()  # noqa: E731

    parts = [cell(i) for i in layout["question"]]
    if layout["summary"] or layout["figure"] is not None:
        box = soup.new_tag("section", attrs={"class": "what-we-found"})
        text = soup.new_tag("div", attrs={"class": "what-we-found-text"})
        for i in layout["summary"]:
            text.append(cell(i))
        found = [h for h in text.find_all(re.compile("^h[1-4]$")) if re.search(r"what we found", h.get_text(),
                                                                                re.IGNORECASE)]
        if found:  # the box's own heading, above the figure
            heading = found[0].extract()
        else:
            heading = soup.new_tag("h2")
            heading.string = "What we found"
        box.append(heading)
        box.append(text)
        if layout["figure"] is not None:
            figure = soup.new_tag("div", attrs={"class": "what-we-found-figure"})
            figure.append(cell(layout["figure"]))
            box.append(figure)
        parts.append(box)
    parts += [cell(i) for i in layout["body"]]
    for title, indices in layout["appendices"]:
        if all(nb.cells[i].cell_type == "code" and not nb.cells[i].get("outputs") for i in indices):
            for i in indices:  # code cells that printed nothing show nothing (inputs are not shown): no empty fold
                cell(i)
            continue
        details = soup.new_tag("details", attrs={"class": "appendix"})
        summary = soup.new_tag("summary")
        summary.string = title
        details.append(summary)
        for i in indices:
            details.append(cell(i))
        parts.append(details)
    run = stage_run(nb)
    if run is not None:  # the last line of the page; build_index and readme_results read data-run-seconds
        footer = soup.new_tag("p", attrs={"class": "stage-run", "data-run-seconds": f"{run['seconds']:.1f}"})
        started = f", started {run['start'][:16].replace('T', ' ')} UTC" if run["start"] else ""
        footer.string = f"This stage's notebook ran for {run['seconds'] / 60:.1f} min (papermill's record{started})."
        parts.append(footer)
    main.clear()
    for part in parts:
        main.append(part)
    for table in main.find_all("table"):
        if not (table.parent and "table-scroll" in (table.parent.get("class") or [])):
            table.wrap(soup.new_tag("div", attrs={"class": "table-scroll"}))
    style = soup.new_tag("style")
    style.string = _LAYOUT_CSS
    soup.head.append(style)
    # the revision the page was rendered at (the notebook may have run earlier): the index judges the render stage's
    # own deps (this script) from here, and the notebook stage's from the "git revision:" its provenance printed
    soup.head.append(soup.new_tag("meta", attrs={"name": "bsbr-rendered-at", "content": git_revision()}))
    return str(soup)


def render(notebook_path: str | Path) -> str:
    """The HTML report of an executed notebook. Raises ExternalResourceError if it references the network,
    FailedNotebookError if a cell raised."""
    nb = nbformat.read(str(notebook_path), as_version=4)
    nb.metadata.pop("widgets", None)  # widget state needs the CDN widget manager; reports are static
    if any(not cell.get("id") for cell in nb.cells):  # cells written before nbformat 4.5 have no id
        nb.nbformat_minor = max(nb.nbformat_minor, 5)
        for index, cell in enumerate(nb.cells):
            cell.id = cell.get("id") or f"cell-{index}"
    # the outputs the reader sees (the layout is chosen from them): streams coalesced, terminal output left out
    nb, _ = CoalesceStreamsPreprocessor().preprocess(nb, {})
    nb, _ = TerminalOutputFilter().preprocess(nb, {})
    exporter = HTMLExporter(
        template_name="lab",
        template_file=_TEMPLATE,
        extra_loaders=[jinja2.DictLoader({_TEMPLATE: _TEMPLATE_SOURCE})],
        exclude_input=True,
        exclude_input_prompt=True,
        exclude_output_prompt=True,
        embed_images=True,
        require_js_url="",
        mathjax_url="",
    )
    title = next((line.lstrip("# ").strip() for cell in nb.cells if cell.cell_type == "markdown"
                  for line in cell.source.splitlines() if line.startswith("# ")), Path(notebook_path).stem)
    nb.metadata["title"] = title
    html, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": Path(notebook_path).stem}})
    html = arrange(html, nb)
    found = EXTERNAL_RESOURCE.search(html)
    if found:
        context = html[max(0, found.start() - 80): found.end() + 80]
        raise ExternalResourceError(f"rendered HTML would load a remote resource near: {context!r}")
    return html


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebook", type=Path, help="executed notebook (.ipynb)")
    parser.add_argument("html", type=Path, help="output report (.html)")
    args = parser.parse_args(argv)
    if not args.notebook.is_file():
        print(f"error: {args.notebook} does not exist", file=sys.stderr)
        return 2
    try:
        html = render(args.notebook)
    except (ExternalResourceError, FailedNotebookError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    args.html.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.html.with_name(args.html.name + ".tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(args.html)
    print(f"wrote {args.html} ({len(html.encode()) // 1024} KiB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
