"""One self-contained HTML page of a report (``report.html`` beside ``table.md``).

The page holds the markdown table as HTML tables, every plot as a base64 PNG data URI and each
run's settings (its ``config``, ``method_config`` and library versions from results.json) in a
collapsible block. It loads nothing: no external CSS, script or font, so it reads offline and can be
mailed as one file. Every string taken from a file is escaped.
"""

from __future__ import annotations

import base64
import json
import re
from html import escape
from pathlib import Path

from rkif import io
from rkif.report import percent, sequence_label

MAX_OPEN_RUNS = 4      # up to this many runs, each run's plots are shown open; more: collapsed, one line per run

CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1200px;
 padding:1em 1.5em;color:#222}
h1{font-size:1.5em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
.sub{color:#666;margin-top:0}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}tr:nth-child(even) td{background:#fafafa}
td:first-child{white-space:nowrap}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.settings td:first-child{font-family:ui-monospace,monospace;white-space:nowrap}
table.settings td{overflow-wrap:anywhere}
table.settings th[colspan]{background:#e8eef6}
code{background:#f3f3f3;padding:0 .2em;border-radius:3px}
figure{margin:.6em 0;display:inline-block;vertical-align:top;max-width:100%}
figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#666;font-size:.85em}
details{margin:.3em 0}details.run{border:1px solid #ddd;border-radius:4px;padding:.3em .7em}
summary{cursor:pointer}details.run>summary{font-weight:600}
details.run>summary span{font-weight:normal;color:#555}
"""

_NUMBER = re.compile(r"^([+\-−]?(\d|\.\d)|-$)")          # a number, or "-" for none
_RULE = re.compile(r"^\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?$")


def _inline(text: str) -> str:
    """Escaped text with markdown ``code`` spans as <code>."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escape(text.strip()))


def _cells(line: str) -> list[str]:
    line = line.strip()
    return [c.strip() for c in line[1 if line.startswith("|") else 0: -1 if line.endswith("|") else None].split("|")]


def _table(lines: list[str]) -> str:
    """A markdown table (header, ``|---|`` rule, rows) as an HTML table; numeric cells right-aligned."""
    rows = [line for line in lines if not _RULE.match(line.strip())]
    head = "".join(f"<th>{_inline(c)}</th>" for c in _cells(rows[0]))
    body = "".join("<tr>" + "".join(f'<td class="num">{_inline(c)}</td>' if _NUMBER.match(c) else
                                    f"<td>{_inline(c)}</td>" for c in _cells(row)) + "</tr>\n" for row in rows[1:])
    return f'<div class="scroll"><table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody></table></div>'


def markdown_to_html(md: str) -> str:
    """The markdown rkif's tables use as HTML: ``|`` tables, ``#`` headings, paragraphs, ``code`` spans."""
    blocks, lines = [], md.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if not line:
            i += 1
        elif line.startswith("|"):
            j = i
            while j < len(lines) and lines[j].strip().startswith("|"):
                j += 1
            blocks.append(_table(lines[i:j]))
            i = j
        elif line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")) + 1, 6)       # "#" is h2: the page's h1 is its title
            blocks.append(f"<h{level}>{_inline(line.lstrip('#'))}</h{level}>")
            i += 1
        else:
            j = i
            while j < len(lines) and lines[j].strip() and not lines[j].strip().startswith(("|", "#")):
                j += 1
            blocks.append("<p>" + "<br>\n".join(_inline(x) for x in lines[i:j]) + "</p>")
            i = j
    return "\n".join(blocks)


def png_data_uri(path: Path) -> str:
    """``data:image/png;base64,...`` of a PNG file (refused if the file is not a PNG)."""
    data = Path(path).read_bytes()
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError(f"{path}: not a PNG file")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _figure(path: Path, caption: str = "") -> str:
    """A PNG embedded as a data URI, captioned with ``caption`` and its file name."""
    name = escape(Path(path).name)
    text = f"{escape(caption)} ({name})" if caption else name
    return (f'<figure><img src="{png_data_uri(path)}" alt="{escape(caption) or name}">'
            f"<figcaption>{text}</figcaption></figure>")


def _flat(prefix: str, value) -> list[tuple[str, str]]:
    """Nested dicts as (dotted key, value) rows; a value that is not a string as JSON."""
    if isinstance(value, dict) and value:
        return [row for k, v in value.items() for row in _flat(f"{prefix}.{k}" if prefix else str(k), v)]
    return [(prefix, value if isinstance(value, str) else json.dumps(value))]


def settings_table(r: dict) -> str:
    """A run's settings from its results.json: tasks, ``config``, ``method_config`` and ``versions``."""
    run = [(key, r.get(key)) for key in ("method", "model", "benchmark", "order") if r.get(key) is not None]
    run += [("tasks", ", ".join(map(str, r.get("tasks", [])))),
            ("finished stages", f"{r.get('finished_stages', '?')} of {len(r.get('stages', []))}"),
            ("minutes", f"{r.get('seconds', 0.0) / 60:.1f}")]
    groups = [("run", run),
              *((key, _flat("", r[key])) for key in ("config", "method_config", "versions") if r.get(key))]
    rows = []
    for title, items in groups:
        if items:
            rows.append(f'<tr><th colspan="2">{escape(title)}</th></tr>')
            rows += [f"<tr><td>{escape(str(k))}</td><td>{escape(str(v))}</td></tr>" for k, v in items]
    return '<div class="scroll"><table class="settings">\n' + "\n".join(rows) + "\n</table></div>"


def _run_summary(r: dict) -> str:
    """One line: OP, BWT, model, order (or tasks), seed, precision (what tells runs apart at a glance)."""
    config = r.get("config") or {}
    state = f"OP {percent(r.get('op'))} · BWT {percent(r.get('bwt'))}" if r.get("complete") else \
        f"{r.get('finished_stages')}/{len(r.get('stages', []))} stages"
    parts = [state, r.get("model"), sequence_label(r), f"seed {config.get('seed')}",
             config.get("precision")]
    return " · ".join(escape(str(p)) for p in parts if p is not None)


Figure = tuple[Path, str]      # a PNG file and its caption


def run_section(label: str, r: dict, plots: list[Figure], open_: bool) -> str:
    """A run as a <details> block: its plots, then its settings (collapsed)."""
    figures = "\n".join(_figure(*f) for f in plots)
    return (f'<details class="run"{" open" if open_ else ""}><summary>{escape(label)} <span>— {_run_summary(r)}'
            f'</span></summary>\n{figures}\n<details><summary>settings</summary>\n{settings_table(r)}\n</details>'
            f"\n</details>")


def render(title: str, table_md: str, figures: list[Figure], runs: list[tuple[str, dict, list[Figure]]]) -> str:
    """The page: title, the table, the plots of all runs, then one collapsible section per run (label,
    results.json, plots)."""
    open_ = len(runs) <= MAX_OPEN_RUNS
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
             f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
             f"<title>{escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>",
             f"<h1>{escape(title)}</h1>",
             f'<p class="sub">{len(runs)} run{"s" if len(runs) != 1 else ""}; scores in %; '
             f'made by <code>rkif</code> from each run\'s results.json</p>',
             "<h2>Results</h2>", markdown_to_html(table_md)]
    if figures:
        parts += ["<h2>Plots</h2>", "\n".join(_figure(*f) for f in figures)]
    parts += ["<h2>Runs</h2>", f'<p class="sub">{"" if open_ else "Click a run for its plots. "}'
                               f"A run's settings: its config, method options and library versions.</p>"]
    parts += [run_section(label, r, plots, open_) for label, r, plots in runs]
    parts.append("</body>\n</html>\n")
    return "\n".join(parts)


def write_html(path: Path, title: str, table_md: str, figures: list[Figure],
               runs: list[tuple[str, dict, list[Figure]]]) -> Path:
    """Write ``render(...)`` to ``path`` atomically; return the path."""
    io.write_text(Path(path), render(title, table_md, figures, runs))
    return Path(path)
