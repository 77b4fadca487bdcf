"""Report renderings: the text table's notes, JSON, and the self-contained HTML page."""
from __future__ import annotations

import html
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import attnfuse
from attnfuse.report import Candidate, Report, Site
from attnfuse.spec import AttentionSpec, TensorInfo


class Fused(nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) * 0.125, -1) @ v


class ReturnsProbs(nn.Module):
    """The probabilities are a second output: the softmax must stay."""

    def forward(self, q, k, v):
        p = torch.softmax(q @ k.transpose(-1, -2) * 0.125, -1)
        return p @ v, p


def qkv() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(2, 2, 16, 8, generator=g) for _ in range(3))


@pytest.fixture
def report() -> Report:
    r = attnfuse.explain(Fused(), qkv())
    kept = attnfuse.explain(ReturnsProbs(), qkv())
    r.extend(kept)
    assert r.sites[0].kernel is not None and r.sites[1].kernel is None
    return r


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch) -> None:
    """Kernel choices made here must not land in the user's tuning cache."""
    monkeypatch.setenv("ATTNFUSE_CACHE_DIR", str(tmp_path / "cache"))


class _DiffSides(HTMLParser):
    """Collects the text of the before (3rd) and after (6th) cells of each difflib table row."""

    def __init__(self) -> None:
        super().__init__()
        self.before: list[str] = []
        self.after: list[str] = []
        self._cells: list[str] = []
        self._in_diff = self._in_td = False

    def handle_starttag(self, tag, attrs):
        if tag == "table" and ("class", "diff") in attrs:
            self._in_diff = True
        elif self._in_diff and tag == "tr":
            self._cells = []
        elif self._in_diff and tag == "td":
            self._in_td = True
            self._cells.append("")

    def handle_endtag(self, tag):
        if tag == "td":
            self._in_td = False
        elif self._in_diff and tag == "tr" and len(self._cells) == 6:
            self.before.append(self._cells[2])
            self.after.append(self._cells[5])
        elif tag == "table":
            self._in_diff = False

    def handle_data(self, data):
        if self._in_td and self._cells:
            self._cells[-1] += data


def test_html_page(report: Report, tmp_path: Path) -> None:
    report.sites[1].reason = "kept because a <script> & friends said so"
    out = report.to_html(tmp_path / "r.html")
    assert out == tmp_path / "r.html" and [p for p in tmp_path.iterdir() if p.is_file()] == [out]
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page
    # the site table: columns, source locations, decisions
    for text in ("module", "source", "pattern", report.sites[0].kernel, "KEPT", "eager_softmax",
                 "test_report_html.py:"):
        assert text in page, text
    # escaping of user-derived text
    assert "&lt;script&gt; &amp; friends" in page and "<script>" not in page
    # no external assets
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page)
    # the code diff, side by side: softmax before, the fused op after; graph 1 unchanged
    sides = _DiffSides()
    sides.feed(page)
    before, after = "\n".join(sides.before), "\n".join(sides.after)
    assert "torch.softmax" in before and "torch.softmax" not in after
    assert "attnfuse" in after and "attnfuse" not in before  # the fused call names its op
    assert repr(report.sites[0].kernel) in after.replace("\xa0", " ")
    assert "unchanged" in page
    body = report._repr_html_()  # the page's body, for notebooks (difflib's anchor ids differ)
    assert body.startswith('<div class="attnfuse-report">') and "<html" not in body
    assert body.split("<h2>Graphs</h2>")[0] in page


def test_json_round_trip(report: Report) -> None:
    data = json.loads(report.to_json())
    assert data["torch"] == torch.__version__ and data["device"]
    assert "triton" in data
    assert (data["fused"], data["kept"], data["graphs"]) == (1, 1, 2)
    assert [s["kernel"] for s in data["sites"]] == [report.sites[0].kernel, None]
    site = data["sites"][0]
    assert site["spec"]["q"] == {"shape": "2x2x16x8", "dtype": "float32", "device": "cpu",
                                 "stride": "256x128x8x1"}
    assert site["spec"]["mask"]["fill"] == "-inf"  # strict JSON: no Infinity literal
    assert site["shape"] == "[2,2,16,16,8]" and site["decision"] in str(report)
    assert len(site["candidates"]) == len(report.sites[0].candidates)
    assert data["sites"][1]["spec"] is None and "2 users" in data["sites"][1]["reason"]
    json.dumps(data, allow_nan=False)
    assert json.loads(report.to_json(indent=None)) == data


def test_text_notes_have_spec_and_rules(report: Report) -> None:
    text = str(report)
    spec = report.sites[0].spec
    assert spec.describe() in text
    assert "rules: " + ", ".join(spec.rules) in text
    assert "KEPT" in text


def _spec() -> AttentionSpec:
    t = TensorInfo((1, 4, 128, 64), torch.float16, "cuda:0", (32768, 8192, 64, 1))
    return AttentionSpec(q=t, k=t, v=t, scale=0.125, scale_expr="1/8", rules=("softmax->softmax",))


def _hand_report() -> Report:
    cands = [Candidate("flash", predicted_ms=0.45, measured_ms=0.41, config={"BLOCK_M": 64}),
             Candidate("sdpa_cudnn", predicted_ms=0.40, measured_ms=0.38),
             Candidate("sdpa_math", predicted_ms=2.5),
             Candidate("reference", reasons=["head_dim 64 < 128 & <fp16>"])]
    chosen = Site(0, 0, "eager_softmax", "sdpa_cudnn", "fastest measured", _spec(),
                  "model.py:10", "blocks.0.attn", candidates=cands, cache="hit",
                  config={"BLOCK_M": 128, "BLOCK_N": 64})
    sdpa = Site(1, 0, "sdpa", "sdpa", "existing SDPA call kept", _spec(), "model.py:20",
                candidates=[Candidate("sdpa", measured_ms=float("inf"))], cache="pinned")
    flash = Site(2, 0, "eager_softmax", "flash", "forced", _spec(), cache="forced")
    return Report([chosen, sdpa, flash])


def test_candidates_render_in_text() -> None:
    text = str(_hand_report())
    assert "torch sdpa (cudnn)" in text and "sdpa (kept)" in text and "attnfuse::flash" in text
    block = text[text.index("candidates:"):text.index("cache: hit")]
    line = re.sub(r"\s*\n\s*\| ", " | ", block)  # long lists wrap onto "| " lines
    assert all(len(l) <= 110 for l in text.splitlines()[5:])
    assert ("flash 0.41 ms (pred 0.45) | sdpa_cudnn 0.38 ms (pred 0.4) chosen | "
            "sdpa_math pred 2.5 ms | reference rejected: head_dim 64 < 128 & <fp16>") in line
    assert "cache: hit | config: BLOCK_M=128, BLOCK_N=64" in text
    assert "cache: pinned" in text and "cache: forced" in text
    assert "sdpa inf ms chosen" in text


def test_candidates_render_in_html_and_json(tmp_path: Path) -> None:
    r = _hand_report()
    page = r.to_html(tmp_path / "hand.html").read_text(encoding="utf-8")
    assert html.escape("reference rejected: head_dim 64 < 128 & <fp16>") in page
    assert "<fp16>" not in page
    assert "sdpa_cudnn 0.38 ms (pred 0.4) chosen" in page and "torch sdpa (cudnn)" in page
    assert "BLOCK_M=128, BLOCK_N=64" in page and ">hit<" in page
    assert page.count('class="diff"') == 0  # no graphs captured: no diff tables
    data = json.loads(r.to_json())
    c = data["sites"][0]["candidates"]
    assert [x["kernel"] for x in c] == ["flash", "sdpa_cudnn", "sdpa_math", "reference"]
    assert [x["eligible"] for x in c] == [True, True, True, False]
    assert c[0]["config"] == {"BLOCK_M": 64} and data["sites"][0]["cache"] == "hit"
    assert data["sites"][1]["candidates"][0]["measured_ms"] == "inf"
    assert data["sites"][0]["spec"]["q"]["dtype"] == "float16"


def test_empty_report_renders(tmp_path: Path) -> None:
    r = Report()
    assert "0 attention site(s)" in str(r)
    assert json.loads(r.to_json())["sites"] == []
    assert "0 attention site(s)" in r.to_html(tmp_path / "e.html").read_text(encoding="utf-8")


def test_drawing_degrades_to_the_diff(report: Report, tmp_path: Path, monkeypatch) -> None:
    """Where pydot or Graphviz is missing or fails, the page keeps the diff and has no drawing."""
    import importlib.util

    import attnfuse.report as R
    real = importlib.util.find_spec
    monkeypatch.setattr(R.shutil, "which", lambda name: "/usr/bin/dot")
    monkeypatch.setattr(R.importlib.util, "find_spec",
                        lambda name, *a: object() if name == "pydot" else real(name, *a))
    import torch.fx.passes.graph_drawer as gd

    def broken(*args, **kwargs):
        raise RuntimeError("no graphviz here")

    monkeypatch.setattr(gd, "FxGraphDrawer", broken)
    page = report.to_html(tmp_path / "r.html").read_text(encoding="utf-8")
    assert 'class="diff"' in page and "<svg" not in page


def test_drawing_embedded_inline(report: Report, tmp_path: Path, monkeypatch) -> None:
    import importlib.util

    import attnfuse.report as R
    import torch.fx.passes.graph_drawer as gd
    real = importlib.util.find_spec
    monkeypatch.setattr(R.shutil, "which", lambda name: "/usr/bin/dot")
    monkeypatch.setattr(R.importlib.util, "find_spec",
                        lambda name, *a: object() if name == "pydot" else real(name, *a))
    svg = (b'<?xml version="1.0"?>\n<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" '
           b'"http://www.w3.org/Graphics/SVG/1.1/DTD/svg11.dtd">\n<svg id="drawn"></svg>')

    class Drawer:
        def __init__(self, gm, name):
            self.name = name

        def get_dot_graph(self):
            return type("Dot", (), {"create_svg": lambda self: svg})()

    monkeypatch.setattr(gd, "FxGraphDrawer", Drawer)
    page = report.to_html(tmp_path / "r.html").read_text(encoding="utf-8")
    assert page.count('<svg id="drawn">') == 1  # the changed graph only
    assert "<?xml" not in page and "DTD" not in page
