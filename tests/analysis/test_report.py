"""report.html: self-contained (inline images and styles, nothing from another host), well-formed, user
text escaped, and the sections a run's files call for."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

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


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """One headless Chromium (Debian's ``chromium`` + ``chromium-driver`` through Selenium), as
    tests/serve/test_web_page.py starts it; skips naming what is missing."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if binary is None or driver_path is None:
        pytest.skip(
            "no chromium / chromedriver: apt-get install chromium chromium-driver (scripts/setup.sh --test)"
        )
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="selenium is not installed (pip install selenium)"
    )
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1200,900", "--no-first-run", "--disable-extensions"):  # fmt: skip
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=driver_path))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.mark.slow
def test_report_renders_in_chromium(tmp_path: Path, chromium: Any) -> None:
    """The page of a run with curves, validation, a study's plot and a hostile sample, opened from disk in
    headless Chromium: no console errors, every figure decoded and laid out, the sample shown as text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [
        {"step": s, "loss": 5 - s / 10, "lr": 1e-3 * s, "tokens_per_s": 900.0 + s, "mfu": 0.1}
        for s in range(1, 11)
    ]
    rows += [{"step": 10, "val_loss": 4.5, "val_ppl": 90.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "run.yaml").write_text("model:\n  n_layers: 2\n")
    (tmp_path / "samples.jsonl").write_text(json.dumps({"answer": "<script>alert(1)</script>"}) + "\n")
    (tmp_path / "trials.csv").write_text("trial,state,val_loss\n0,COMPLETE,4.5\n")
    (tmp_path / "plots").mkdir()
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1], [1, 0])
    fig.savefig(tmp_path / "plots" / "history.png")
    plt.close(fig)
    page = write_report(tmp_path)
    chromium.get(page.resolve().as_uri())
    assert [e["message"] for e in chromium.get_log("browser") if e["level"] in ("SEVERE", "WARNING")] == []
    images = chromium.execute_script(
        "return [...document.images].map(i => [i.complete, i.naturalWidth, i.getBoundingClientRect().width])"
    )
    assert len(images) == 3 and all(done and natural > 0 and shown > 0 for done, natural, shown in images)
    assert chromium.execute_script("return document.scripts.length") == 0
    assert "<script>alert(1)</script>" in chromium.find_element("tag name", "body").text
