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
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import jinja2
import nbformat
from nbconvert import HTMLExporter
from nbconvert.preprocessors import CoalesceStreamsPreprocessor, Preprocessor

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


def render(notebook_path: str | Path) -> str:
    """The HTML report of an executed notebook. Raises ExternalResourceError if it references the network,
    FailedNotebookError if a cell raised."""
    nb = nbformat.read(str(notebook_path), as_version=4)
    nb.metadata.pop("widgets", None)  # widget state needs the CDN widget manager; reports are static
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
    exporter.register_preprocessor(CoalesceStreamsPreprocessor(), enabled=True)
    exporter.register_preprocessor(TerminalOutputFilter(), enabled=True)  # after coalescing: whole lines
    title = next((line.lstrip("# ").strip() for cell in nb.cells if cell.cell_type == "markdown"
                  for line in cell.source.splitlines() if line.startswith("# ")), Path(notebook_path).stem)
    nb.metadata["title"] = title
    html, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": Path(notebook_path).stem}})
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
