"""report.html: self-contained (inline images and styles, nothing from another host), well-formed, user
text escaped, and the sections a run's files call for."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

from lamina.analysis.report import write_report

VOID = {"meta", "img", "br", "hr", "link", "input"}


class _Checker(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(f"unbalanced </{tag}>")


def test_report_of_a_run_folder(tmp_path: Path) -> None:
    rows = [
        {"step": s, "loss": 5 - s / 10, "lr": 1e-3, "tokens_per_s": 900.0 + s, "mfu": 0.1}
        for s in range(1, 11)
    ]
    rows += [{"step": 5, "val_loss": 4.8, "val_ppl": 121.5}, {"step": 10, "val_loss": 4.5, "val_ppl": 90.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 11, "lo')
    (tmp_path / "run.yaml").write_text("model:\n  n_layers: 2\n")
    (tmp_path / "samples.jsonl").write_text(json.dumps({"answer": "<script>alert(1)</script>"}) + "\n")
    (tmp_path / "trials.csv").write_text("trial,state,val_loss\n0,COMPLETE,4.5\n")
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "history.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")
    page = write_report(tmp_path, title="run <1>").read_text()
    checker = _Checker()
    checker.feed(page)
    assert not checker.errors and not checker.stack
    tags = [t for t, _ in checker.tags]
    assert "script" not in tags and "&lt;script&gt;" in page and "run &lt;1&gt;" in page
    for tag, attrs in checker.tags:
        for key in ("src", "href"):
            assert not (attrs.get(key) or "data:").lower().startswith(("http:", "https:", "//")), (tag, attrs)
    assert all(
        (attrs.get("src") or "").startswith("data:image/png;base64,")
        for t, attrs in checker.tags
        if t == "img"
    )
    assert tags.count("img") == 3  # loss/lr, throughput/MFU, the study's plot
    for heading in ("Summary", "Curves", "Validation", "Trials", "Samples", "Config", "Environment"):
        assert f"<h2>{heading}" in page
    assert "4.5" in page and "best validation loss" in page
