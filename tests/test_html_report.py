"""report.html: one self-contained page (tables, every plot as a PNG data URI, each run's settings), strings
from files escaped; and, where a Chromium binary exists, the page rendered by a real browser."""

import base64
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from rkif import html_report
from rkif.cli import main
from rkif.report import grid_report, report
from tests.test_failures import _results, _write_run

PNG = b"\x89PNG\r\n\x1a\n"
HOSTILE = '<script>alert("x")</script>&'          # a string from a file that must stay text


class Page(HTMLParser):
    """What a browser would see: tags, img sources, links, and the text."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags, self.imgs, self.urls, self.text = [], [], [], []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if tag == "img":
            self.imgs.append(attrs["src"])
        self.urls += [v for k, v in attrs.items() if k in ("href", "src") and tag != "img"]

    def handle_data(self, data):
        self.text.append(data)


def _run(folder: Path, method: str, **extra) -> Path:
    r = {**_results(method=method), **extra}
    r["config"] = {"method": method, "seed": 42, "precision": "fp32", "method_options": {"note": HOSTILE},
                   "backbone": {"model": "minilm", "lora_r": 8}}
    r["versions"] = {"torch": "2.13.0+cpu"}
    r["diagnostics"] = {"rounds": [{"stage": s, "in_only": 0.1, "out_only": 0.1, "shared": 0.1, "neither": 0.7}
                                   for s in (0, 0, 1, 2)]}
    return _write_run(folder, r)


def _check_page(path: Path, out: Path, labels: list[str], made_by_run: bool = True) -> Page:
    """The page parses; its images are exactly the PNGs written, each a data URI of a PNG; nothing is loaded
    from elsewhere; every run and its settings appear; no string from a file became markup."""
    page = Page(path.read_text(encoding="utf-8"))
    pngs = sorted(out.rglob("*.png"))
    assert len(page.imgs) == len(pngs) > 0
    embedded = []
    for src in page.imgs:
        assert src.startswith("data:image/png;base64,")
        embedded.append(base64.b64decode(src.split(",", 1)[1], validate=True))
        assert embedded[-1].startswith(PNG)
    assert sorted(embedded) == sorted(p.read_bytes() for p in pngs)          # every plot, each once
    assert page.urls == [] and not {"script", "link", "iframe"} & set(page.tags)
    text = "".join(page.text)
    for label in labels:
        assert label in text
    assert page.tags.count("details") >= 2 * len(labels)                  # per run: the run, its settings
    if made_by_run:
        assert HOSTILE in text                                             # shown as text, not run
        assert "2.13.0+cpu" in text and "backbone.lora_r" in text
    return page


def test_report_html_is_one_self_contained_page(tmp_path):
    runs = [_run(tmp_path / "rkif" / "order1-seed42", "rkif"), _run(tmp_path / "replay" / "order1-seed42", "replay"),
            _run(tmp_path / "x&<b>y", HOSTILE)]              # a folder name and a method that look like markup
    out = tmp_path / "rep"
    table = report(runs, out, html=True)
    page = _check_page(out / "report.html", out, ["rkif/order1-seed42", "replay/order1-seed42", "x&<b>y"])
    assert "b" not in page.tags
    rows = sum(1 for line in table.splitlines() if line.startswith("| ") and "---" not in line)
    assert page.tags.count("tr") >= rows + 3 * 10            # the summary table, then each run's settings rows
    assert (out / "report.html").stat().st_mode & 0o044 == 0o044        # others may read it (a shared report)


def test_report_writes_html_only_when_asked(tmp_path, capsys):
    run = _run(tmp_path / "run", "seqlora")
    assert main(["report", str(run), "--out", str(tmp_path / "plain")]) == 0
    assert not (tmp_path / "plain" / "report.html").exists()
    assert main(["report", str(run), "--out", str(tmp_path / "rep"), "--html"]) == 0
    assert (tmp_path / "rep" / "report.html").exists() and "report.html" in capsys.readouterr().out


def test_grid_report_html_names_each_run_and_every_order(tmp_path):
    runs = []
    for method in ("rkif", "replay"):
        for order in (1, 2):
            folder = _run(tmp_path / "runs" / method / f"order{order}-seed42", method, order=order)
            runs.append(SimpleNamespace(output_dir=folder))
    out = tmp_path / "grid"
    table = grid_report(out, runs, "standard", html=True, title="mygrid")
    page = _check_page(out / "report.html", out / "plots", ["rkif", "replay"])
    text = "".join(page.text)
    assert "rkif bench: mygrid (standard)" in text and "order 1" in text and "order 2" in text
    assert "78.4" in table and "78.4" in text                                  # the paper's column, from the table


def test_bench_report_html_holds_the_paired_table(tmp_path, monkeypatch, capsys):
    from rkif import runner
    from tests.test_grid_variants import VARIANTS, _acc, _result, write

    monkeypatch.setattr(runner, "run_experiment", lambda run: pytest.fail("--report runs nothing"))
    out = tmp_path / "out"
    for name, bump in (("rkif", 0.0), ("random", -0.1)):
        for order in (1, 2):
            _write_run(out / "runs" / name / f"order{order}-seed1", _result(name, order, 1, _acc(0.6 + bump, 0.7)))
    assert main(["bench", str(write(tmp_path / "g.toml", VARIANTS)), "--report", "--html", "--out", str(out)]) == 0
    page = _check_page(out / "report.html", out / "plots", ["rkif", "random"], made_by_run=False)
    text = "".join(page.text)
    assert "rkif bench: controls (standard)" in text and "Paired differences to rkif" in text
    assert page.tags.count("table") == 2 + 4                     # the grid table, the paired one, 4 runs' settings


def test_markdown_to_html_tables_paragraphs_and_code():
    md = "| method | OP |\n|---|---|\n| a<b | 61.2 ± 1.3 |\n| c | - |\n\nPaired to `rkif` (Δ):\n\n### x & y"
    out = html_report.markdown_to_html(md)
    assert "<th>method</th>" in out and "<td>a&lt;b</td>" in out
    assert '<td class="num">61.2 ± 1.3</td>' in out and '<td class="num">-</td>' in out
    assert "<p>Paired to <code>rkif</code> (Δ):</p>" in out
    assert "<h4>x &amp; y</h4>" in out


def test_png_data_uri_refuses_other_files(tmp_path):
    (tmp_path / "a.png").write_text("not a png")
    with pytest.raises(ValueError, match="a.png: not a PNG"):
        html_report.png_data_uri(tmp_path / "a.png")


# -- in a real browser (Debian: apt-get install chromium); CI has none, so this skips there ---------------------------

def chromium() -> str | None:
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


def browse(page: Path, out: Path, width: int = 1280, height: int = 2000) -> tuple[Path, int]:
    """Screenshot ``page`` in headless Chromium into ``out``; return the PNG and the page's width in CSS pixels
    (``document.documentElement.scrollWidth``, read from a copy with one line of script added)."""
    args = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            f"--window-size={width},{height}"]
    shot = out / "screenshot.png"
    subprocess.run([*args, f"--screenshot={shot}", page.resolve().as_uri()], check=True, capture_output=True,
                   timeout=120)
    probe = out / "probe.html"
    probe.write_text(page.read_text(encoding="utf-8").replace(
        "</body>", "<script>document.body.dataset.w = document.documentElement.scrollWidth</script></body>"),
        encoding="utf-8")
    dom = subprocess.run([*args, "--dump-dom", probe.resolve().as_uri()], check=True, capture_output=True,
                         text=True, timeout=120).stdout
    return shot, int(dom.split('data-w="', 1)[1].split('"', 1)[0])


@pytest.mark.slow
@pytest.mark.skipif(chromium() is None, reason="no chromium binary (apt-get install chromium)")
def test_report_html_renders_in_chromium(tmp_path):
    from PIL import Image

    runs = [_run(tmp_path / m / "order1-seed42", m) for m in ("rkif", "replay")]
    report(runs, tmp_path / "rep", html=True)
    for width in (1280, 700):
        shot, page_width = browse(tmp_path / "rep" / "report.html", tmp_path, width)
        assert page_width <= width                                # nothing wider than the window
        hsv = np.asarray(Image.open(shot).convert("HSV")).reshape(-1, 3)
        colourful = ((hsv[:, 1] > 100) & (hsv[:, 2] > 60)).mean()
        assert colourful > 0.005                                  # the plots are drawn (viridis, bars), not alt text
