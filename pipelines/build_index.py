"""Build reports/index.html: one row per report with its headline numbers, and the provenance of the run.

    python pipelines/build_index.py [--reports reports] [--params params.yaml]

Reports are the ``NN_name.html`` files in ``--reports`` (sorted by name); each row links the report, shows its
title (the HTML ``<title>``) and the numbers of ``reports/metrics/NN_name.json`` (nested keys joined with ``.``;
the ``machine`` header is shown once, under provenance). Provenance: git revision (``+dirty`` if tracked files
changed), torch version, CPU model, torch threads, and every params.yaml section.
The page is self-contained (inline CSS, no scripts, relative links) and deterministic apart from the provenance.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import sys
from pathlib import Path

from dvc.utils.serialize import parse_yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bsbr.provenance import git_revision, machine_info  # noqa: E402

REPORT_NAME = re.compile(r"^\d\d_[\w-]+\.html$")

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.35em 0.7em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { font-family: ui-monospace, monospace; white-space: nowrap; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; }
"""


def flatten(metrics: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; the ``machine`` header at the top level is left out."""
    flat = {}
    for key, value in metrics.items():
        if not prefix and key == "machine":
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def format_value(name: str, value) -> str:
    """Human-readable number: bytes as MiB, seconds with 4 significant digits, None as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if name.endswith("_bytes"):
        return f"{value / 2**20:,.1f} MiB"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def report_title(path: Path) -> str:
    match = re.search(r"<title>(.*?)</title>", path.read_text(encoding="utf-8"), re.DOTALL)
    return html.unescape(match.group(1).strip()) if match else path.stem


def collect(reports_dir: Path) -> list[dict]:
    """One dict per report: name, file, title, metrics (flat dict; empty if no metrics file), machine."""
    rows = []
    for path in sorted(p for p in reports_dir.glob("*.html") if REPORT_NAME.match(p.name)):
        metrics_path = reports_dir / "metrics" / f"{path.stem}.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        rows.append({"name": path.stem, "file": path.name, "title": report_title(path),
                     "metrics": flatten(metrics), "machine": metrics.get("machine")})
    return rows


def build_index(reports_dir: Path, params_file: Path) -> str:
    """The index page as an HTML string."""
    esc = html.escape
    rows = collect(reports_dir)
    body = ["<h1>BSBR experiment reports</h1>",
            "<p>Each report is a notebook run by <code>dvc repro</code> and rendered without code; "
            "numbers are the headline metrics each notebook writes to <code>reports/metrics/</code>.</p>",
            "<table>", "<tr><th>report</th><th>title</th><th>headline numbers</th></tr>"]
    for row in rows:
        numbers = "".join(f"<tr><td>{esc(key)}</td><td class='num'>{esc(format_value(key, value))}</td></tr>"
                          for key, value in sorted(row["metrics"].items()))
        numbers = f"<table>{numbers}</table>" if numbers else "<em>no metrics file</em>"
        body.append(f"<tr><td><a href='{esc(row['file'])}'>{esc(row['name'])}</a></td>"
                    f"<td>{esc(row['title'])}</td><td>{numbers}</td></tr>")
    body.append("</table>")

    here = machine_info()
    provenance = [("git revision", git_revision(REPO_ROOT)), ("torch", here["torch"]),
                  ("CPU", f"{here['cpu']} ({here['cores']} logical CPUs)"),
                  ("torch threads (default here)", str(here["threads"])), ("python", here["python"])]
    for row in rows:
        if row["machine"]:
            provenance.append((f"machine header of {row['name']}",
                               ", ".join(f"{k}={v}" for k, v in sorted(row["machine"].items()))))
    body += ["<h2>Provenance</h2>", "<table>"]
    body += [f"<tr><th>{esc(key)}</th><td>{esc(value)}</td></tr>" for key, value in provenance]
    body.append("</table>")
    # read as DVC reads it (YAML 1.2): the values dvc.lock records, e.g. 1e-3 is 0.001
    params = parse_yaml(params_file.read_text(), str(params_file)) if params_file.is_file() else {}
    body += [f"<h3>{esc(params_file.name)}</h3>", "<table>", "<tr><th>section</th><th>key</th><th>value</th></tr>"]
    for section, values in (params or {}).items():
        items = values.items() if isinstance(values, dict) else [("", values)]
        for key, value in items:
            body.append(f"<tr><td>{esc(str(section))}</td><td>{esc(str(key))}</td>"
                        f"<td class='num'>{esc(json.dumps(value))}</td></tr>")
    body.append("</table>")
    return ("<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
            "<title>BSBR experiment reports</title>\n"
            f"<style>{_CSS}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reports", type=Path, default=REPO_ROOT / "reports")
    parser.add_argument("--params", type=Path, default=REPO_ROOT / "params.yaml")
    parser.add_argument("--out", type=Path, default=None, help="default: REPORTS/index.html")
    args = parser.parse_args(argv)
    out = args.out or args.reports / "index.html"
    page = build_index(args.reports, args.params)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
