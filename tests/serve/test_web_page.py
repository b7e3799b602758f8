"""The chat page at ``/`` in a real headless Chromium (Debian's ``chromium`` + ``chromium-driver``, driven by
Selenium) against a live server of two tiny random models: a streamed reply grows, Stop cancels the
generation on the server, switching models and changing a control reach the request, a reload finds the
conversation, model output holding ``<script>`` renders as text, side by side, the API-key form, readable
errors (401, 429, a failed engine, an unreachable server), no console errors, no request to another host,
a first load under 200 KB, and screenshots (1440 px and 375 px) under the test's tmp folder.

Skips with the reason when Chromium, chromedriver or Selenium is missing (``bash scripts/setup.sh --test``
installs them)."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from tiny_chat import tiny_lm, tiny_tokenizer

pytestmark = pytest.mark.slow

SCRIPT = "<script>alert(1)</script>"  # one added token of the tiny tokenizer
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


def _lm(seed: int, temperature: float, top_k: int) -> Any:
    """A random 2-layer decoder over the word-level chat tokenizer (plus the token ``SCRIPT``), with a
    4096-token context (long generations to stop) and decoding defaults of its own."""
    import torch

    from lamina.checkpoint.load import LoadedModel
    from lamina.checkpoint.registry import ModelEntry
    from lamina.config import GenerationConfig, ModelConfig
    from lamina.model.transformer import Transformer

    tok = tiny_tokenizer()
    tok.backend.add_tokens([SCRIPT])
    torch.manual_seed(seed)
    cfg = ModelConfig.preset("llama-tiny", vocab_size=tok.vocab_size, max_seq_len=4096)
    gen = GenerationConfig(
        eos_token_ids=[tok.eos_token_id], temperature=temperature, top_k=top_k, max_new_tokens=40
    )
    return LoadedModel(Transformer(cfg).eval(), tok, gen, ModelEntry("tiny", Path("."), "path", "lamina"))


@pytest.fixture(scope="module")
def models() -> dict[str, Any]:
    encoder = tiny_lm(arch="encoder", pos_encoding="learned", head="none")
    return {"tiny-a": _lm(0, 0.7, 20), "tiny-b": _lm(1, 0.3, 5), "tiny-embed": encoder}


@pytest.fixture(scope="module")
def server(models: dict[str, Any]) -> Iterator[Any]:
    from lamina.serve import BackgroundServer, ServeConfig

    with BackgroundServer(models, ServeConfig(timeout=60.0, max_batch_size=4)) as s:
        yield s


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One headless Chromium for the module (its screenshots go to ``.shots``)."""
    if CHROMIUM is None or DRIVER is None:
        pytest.skip(
            "no chromium / chromedriver: apt-get install chromium chromium-driver (scripts/setup.sh --test)"
        )
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="selenium is not installed (pip install selenium)"
    )
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1440,900", "--no-first-run", "--disable-extensions"):  # fmt: skip
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=DRIVER))
    driver.set_page_load_timeout(30)
    driver.shots = tmp_path_factory.mktemp("web_page_screenshots")
    try:
        yield driver
    finally:
        driver.quit()


def _wait(
    cond: Callable[[], Any], timeout: float = 20.0, what: str | Callable[[], str] = "the condition"
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what() if callable(what) else what}"
        time.sleep(0.02)


def _requests(driver: Any) -> list[dict[str, Any]]:
    """The requests the page sent since the last call (Chrome's performance log)."""
    out = []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] == "Network.requestWillBeSent":
            out.append(msg["params"]["request"])
    return out


def _console_errors(driver: Any) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _el(driver: Any, css: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, css)


def _set(driver: Any, id_: str, value: str) -> None:
    el = _el(driver, "#" + id_)
    el.clear()
    if value:
        el.send_keys(value)


def _open(driver: Any, url: str) -> None:
    driver.get(url)
    _wait(lambda: driver.execute_script("return document.querySelector('#model').options.length"),
          what="the model list")  # fmt: skip


def _replies(driver: Any, pane: str = "#pane-a") -> list[str]:
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0] + ' .msg.assistant .body')].map(e => e.textContent)",
        pane,
    )


def _idle(driver: Any) -> None:
    _wait(lambda: driver.execute_script("return window.lamina.state.running.length === 0"), what="the reply")


def _send(driver: Any, text: str) -> None:
    from selenium.webdriver.common.keys import Keys

    box = _el(driver, "#prompt")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def _sent_bodies(driver: Any) -> list[dict[str, Any]]:
    return [
        json.loads(r["postData"])
        for r in _requests(driver)
        if r["url"].endswith("/v1/chat/completions") and "postData" in r
    ]


@pytest.fixture(scope="module")
def page(browser: Any, server: Any) -> Any:
    """The page loaded once with a clean storage; the tests below run in order on it."""
    _open(browser, server.url + "/")
    browser.execute_script("localStorage.clear(); sessionStorage.clear()")
    _open(browser, server.url + "/")
    _el(browser, "#toggle-settings").click()
    return browser


def test_the_page_is_small_strict_and_shows_the_models_defaults(page: Any, server: Any) -> None:
    r = httpx.get(server.url + "/")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe" not in csp and "default-src 'none'" in csp
    assert "<script>" not in r.text  # no inline script: the CSP forbids it
    options = page.execute_script("return [...document.querySelectorAll('#model option')].map(o => o.value)")
    assert options == ["tiny-a", "tiny-b"]
    assert not _el(page, "#rag").is_displayed()  # no --index: no grounding offered
    assert _el(page, "#temperature").get_attribute("value") == "0.7"
    assert _el(page, "#top_k").get_attribute("value") == "20"
    assert _el(page, "#max_tokens").get_attribute("value") == "40"
    weight = page.execute_script(
        "const n = performance.getEntriesByType('navigation')[0];"
        "return [n, ...performance.getEntriesByType('resource')]"
        ".reduce((s, e) => s + Math.max(e.transferSize, e.encodedBodySize + 300), 0)"  # cached: body + headers
    )
    assert 0 < weight < 200_000, weight
    print(f"first load: {weight} bytes")
    config = httpx.get(server.url + "/lamina/config").json()
    assert config["auth"] is False and config["models"][1]["defaults"]["temperature"] == 0.3


def test_a_reply_streams_in_and_shows_its_figures(page: Any) -> None:
    page.execute_script(  # record the reply's length at every change of the page
        "window.lengths = []; new MutationObserver(() => { const b = document.querySelectorAll("
        "'#pane-a .msg.assistant .body'); if (b.length) window.lengths.push(b[b.length-1].textContent.length) })"
        ".observe(document.querySelector('#pane-a'), {subtree: true, childList: true, characterData: true})"
    )
    _set(page, "max_tokens", "150")
    _set(page, "extra", '{"ignore_eos": true}')
    _requests(page)
    _send(page, "hello world")
    _idle(page)
    lengths = [n for n in page.execute_script("return window.lengths") if n > 0]
    assert len(set(lengths)) >= 3 and lengths == sorted(lengths), lengths  # it grew, chunk by chunk
    (body,) = _sent_bodies(page)
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["model"] == "tiny-a" and body["temperature"] == 0.7 and body["max_tokens"] == 150
    stats = _el(page, "#pane-a .stats").text
    assert "completion 150 tok" in stats and "first token" in stats and "tok/s" in stats, stats
    assert "prompt " in stats
    page.save_screenshot(str(page.shots / "chat-1440.png"))


def test_stop_cancels_the_generation_on_the_server(page: Any, server: Any) -> None:
    from selenium.webdriver.common.keys import Keys

    engine = server.registry.get("tiny-a").scheduler.engine
    _set(page, "max_tokens", "3000")
    _send(page, "tell a long story")
    _wait(lambda: engine.num_running == 1 and len(_replies(page)[-1]) > 20, what="the long reply")
    _el(page, "#prompt").send_keys(Keys.ESCAPE)  # Esc stops
    _wait(lambda: not engine.has_work(), timeout=10, what="the sequence to leave the batch")
    assert httpx.get(server.url + "/health").json()["running"] == 0
    _idle(page)
    assert "stopped" in _el(page, "#pane-a .stats").text
    metrics = httpx.get(server.url + "/metrics").text
    assert 'lamina_sequences_finished_total{finish_reason="abort",model="tiny-a"} 1' in metrics


def test_switching_models_and_a_control_reach_the_request(page: Any) -> None:
    from selenium.webdriver.support.ui import Select

    Select(_el(page, "#model")).select_by_value("tiny-b")
    assert _el(page, "#temperature").get_attribute("value") == "0.3"  # tiny-b's own defaults
    _set(page, "top_k", "7")
    _set(page, "seed", "11")
    _set(page, "stop", "")
    _requests(page)
    _send(page, "the cat")
    _idle(page)
    (body,) = _sent_bodies(page)
    assert body["model"] == "tiny-b" and body["top_k"] == 7 and body["seed"] == 11
    assert body["temperature"] == 0.3
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user", "assistant", "user"]
    assert "tiny-b" in _el(page, "#pane-a .stats").text


def test_regenerate_and_edit_the_last_message(page: Any) -> None:
    n = len(_replies(page))
    _requests(page)
    _el(page, "#pane-a .tools .regenerate").click()
    _idle(page)
    assert len(_replies(page)) == n
    (body,) = _sent_bodies(page)
    assert body["messages"][-1] == {"role": "user", "content": "the cat"}
    _el(page, "#pane-a .tools .edit").click()
    assert _el(page, "#prompt").get_attribute("value") == "the cat"
    assert len(_replies(page)) == n - 1
    _el(page, "#prompt").send_keys(" sat")
    _send(page, "")
    _idle(page)
    (body,) = _sent_bodies(page)
    assert body["messages"][-1] == {"role": "user", "content": "the cat sat"}


def test_a_reload_finds_the_conversation_and_exports_it(page: Any, server: Any) -> None:
    before = _replies(page)
    _open(page, server.url + "/")
    assert _replies(page) == before
    exported = json.loads(page.execute_script("return window.lamina.exportJSON()"))
    (conv,) = exported["conversations"]
    assert conv["title"] == "hello world" and conv["messages"][0]["content"] == "hello world"
    _el(page, "#toggle-settings").click()


def test_model_output_with_markup_renders_as_text(page: Any, models: dict[str, Any]) -> None:
    from selenium.common.exceptions import NoAlertPresentException

    script_id = models["tiny-a"].tokenizer.backend.token_to_id(SCRIPT)
    _set(page, "extra", json.dumps({"logit_bias": {str(script_id): 100}}))
    _set(page, "max_tokens", "3")
    _send(page, "say script")
    _idle(page)
    assert SCRIPT in _replies(page)[-1]
    assert (
        page.execute_script("return document.querySelectorAll('.messages script, .messages img').length") == 0
    )
    with pytest.raises(NoAlertPresentException):
        page.switch_to.alert.text  # noqa: B018 - nothing ran
    nasty = [
        SCRIPT, "<img src=x onerror=alert(1)>", "[x](javascript:alert(1))", '[x](http://a" onmouseover="b)',
        "```html\n<script>x()</script>\n```", "`<b>`", "**<i>x</i>**", "- <svg onload=alert(1)>",
        "[ok](https://example.com/?a=1&b=2) and *em* _em_", "```\nunterminated <script>",
        "[`<b>` x](https://a.b/)", "# <h1>title</h1>\n1. <li>one",
    ]  # fmt: skip
    checked = page.execute_script(
        "const bad = []; for (const t of arguments[0]) { const d = new DOMParser().parseFromString("
        "'<div>' + window.lamina.renderMarkdown(t) + '</div>', 'text/html');"
        "for (const e of d.body.querySelectorAll('*')) {"
        "  if (!['DIV','P','BR','PRE','CODE','STRONG','EM','UL','OL','LI','A','H3','H4','H5','H6'].includes(e.tagName))"
        "    bad.push(t + ' -> ' + e.tagName);"
        "  for (const a of e.attributes) if (!['href','class','target','rel'].includes(a.name)"
        "    || (a.name === 'href' && !/^https?:\\/\\//.test(a.value))) bad.push(t + ' -> ' + a.name + '=' + a.value);"
        "}} return bad",
        nasty,
    )
    assert checked == []
    html = page.execute_script("return window.lamina.renderMarkdown(arguments[0])", nasty[8])
    assert '<a href="https://example.com/?a=1&amp;b=2"' in html and html.count("<em>") == 2


def test_side_by_side_streams_two_models(page: Any) -> None:
    from selenium.webdriver.support.ui import Select

    _el(page, "#new-chat").click()
    _el(page, "#compare").click()
    Select(_el(page, "#model")).select_by_value("tiny-a")
    Select(_el(page, "#model-b")).select_by_value("tiny-b")
    _set(page, "extra", "")
    _set(page, "max_tokens", "12")
    _set(page, "extra-b", '{"temperature": 0}')
    _requests(page)
    _send(page, "red green blue")
    _idle(page)
    bodies = sorted(_sent_bodies(page), key=lambda b: b["model"])
    assert [b["model"] for b in bodies] == ["tiny-a", "tiny-b"]
    assert bodies[0]["temperature"] == 0.7 and bodies[1]["temperature"] == 0
    assert _replies(page, "#pane-a")[-1] and _replies(page, "#pane-b")[-1]
    assert "tiny-b" in _el(page, "#pane-b .stats").text
    page.save_screenshot(str(page.shots / "side-by-side-1440.png"))


def test_the_embeddings_view_shows_a_similarity_matrix(page: Any) -> None:
    _el(page, "#toggle-embed").click()
    assert not _el(page, "#prompt").is_displayed()
    assert _el(page, "#embed-model").get_attribute("value") == "tiny-embed"
    _set(page, "embed-texts", "the cat sat\nthe cat sat on a mat\nred green blue")
    _requests(page)
    _el(page, "#embed-run").click()
    cells = _wait(lambda: page.execute_script(
        "return [...document.querySelectorAll('#embed-result tr')].slice(1).map(r => [...r.cells].slice(1).map(c => Number(c.textContent)))"
    ), what="the matrix")  # fmt: skip
    assert len(cells) == 3 and all(len(row) == 3 for row in cells)
    assert all(abs(cells[i][i] - 1) < 1e-3 for i in range(3))
    assert all(abs(cells[i][j] - cells[j][i]) < 1e-3 for i in range(3) for j in range(3))
    (body,) = [json.loads(r["postData"]) for r in _requests(page) if r["url"].endswith("/v1/embeddings")]
    assert body["model"] == "tiny-embed" and len(body["input"]) == 3
    page.save_screenshot(str(page.shots / "embeddings-1440.png"))
    _el(page, "#toggle-embed").click()
    assert _el(page, "#prompt").is_displayed()


def test_the_page_works_under_a_proxys_path_prefix(page: Any, server: Any) -> None:
    """Behind a proxy that serves the server under /chat/ (and strips it): every request keeps the prefix."""
    import socket

    import uvicorn
    from starlette.responses import PlainTextResponse

    async def proxy(scope: Any, receive: Any, send: Any) -> None:
        if not scope["path"].startswith("/chat/"):
            return await PlainTextResponse("outside the prefix", 404)(scope, receive, send)
        path = scope["path"][len("/chat") :]
        await server.app({**scope, "path": path, "raw_path": path.encode()}, receive, send)

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    proxied = uvicorn.Server(uvicorn.Config(proxy, lifespan="off", log_level="warning"))
    thread = threading.Thread(target=proxied.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}/chat/"
    try:
        _wait(lambda: proxied.started, what="the proxy")
        _requests(page)
        _open(page, base)
        _send(page, "hello")
        _idle(page)
        assert _replies(page)[-1] and _el(page, "#error").is_displayed() is False
        urls = [r["url"] for r in _requests(page) if not r["url"].startswith("data:")]
        assert len(urls) >= 5 and all(u.startswith(base) for u in urls), urls
    finally:
        proxied.should_exit = True
        thread.join(10)
        sock.close()
    _open(page, server.url + "/")


def test_no_console_errors_no_other_host_and_a_narrow_screen(page: Any, server: Any) -> None:
    hosts = {urlsplit(r["url"]).netloc for r in _requests(page) if not r["url"].startswith("data:")}
    assert hosts <= {urlsplit(server.url).netloc}, hosts
    _open(page, server.url + "/")
    hosts = {urlsplit(r["url"]).netloc for r in _requests(page) if not r["url"].startswith("data:")}
    assert hosts == {urlsplit(server.url).netloc}, hosts
    assert _console_errors(page) == []
    page.set_window_size(375, 812)
    try:
        assert page.execute_script("return document.documentElement.scrollWidth") <= 375
        assert _el(page, "#send").is_displayed() and _el(page, "#prompt").is_displayed()
        page.save_screenshot(str(page.shots / "chat-375.png"))
    finally:
        page.set_window_size(1440, 900)
    shots = sorted(p.name for p in page.shots.iterdir())
    assert shots == ["chat-1440.png", "chat-375.png", "embeddings-1440.png", "side-by-side-1440.png"]
    print(f"screenshots in {page.shots}")


def test_api_key_and_readable_errors_keep_the_conversation(browser: Any, models: dict[str, Any]) -> None:
    from lamina.serve import BackgroundServer, ServeConfig

    cfg = ServeConfig(api_keys=["sesame"], timeout=60.0, max_batch_size=1, max_queue=1)
    server = BackgroundServer({"tiny-a": models["tiny-a"]}, cfg).start()
    try:
        browser.get(server.url + "/")
        browser.execute_script("localStorage.clear(); sessionStorage.clear()")
        browser.get(server.url + "/")
        _wait(lambda: _el(browser, "#key-dialog").is_displayed(), what="the API-key form")
        _el(browser, "#api-key").send_keys("wrong\n")
        _wait(lambda: "401" in _el(browser, "#error").text, what="the 401 message")
        _el(browser, "#api-key").send_keys("sesame\n")
        _wait(lambda: _el(browser, "#model").get_attribute("value") == "tiny-a", what="the model list")
        _send(browser, "hello")
        _idle(browser)
        assert len(_replies(browser)) == 1

        # 429: one long request runs, one waits, the page's is one too many
        long = {"model": "tiny-a", "prompt": "a", "max_tokens": 4000, "ignore_eos": True, "stream": True}
        auth = {"Authorization": "Bearer sesame"}
        release = threading.Event()
        held: list[str] = []  # what each long request got
        holders = [
            threading.Thread(target=_hold, args=(server.url, long, auth, release, held), daemon=True)
            for _ in range(2)
        ]
        engine = server.registry.get("tiny-a").scheduler.engine
        for k, t in enumerate(holders):  # one after the other: the first runs, the second waits
            t.start()
            _wait(
                lambda k=k: engine.num_running == 1 and engine.num_queued == k,
                what=lambda: (
                    f"a full queue ({engine.num_running} running, {engine.num_queued} queued, {held})"
                ),
            )
        _send(browser, "are you busy")
        _wait(lambda: "429" in _el(browser, "#error").text, what="the 429 message")
        assert "busy" in _el(browser, "#error").text
        release.set()
        for t in holders:
            t.join(20)
        _wait(lambda: not engine.has_work(), what="the long requests to leave")
        sched = server.registry.get("tiny-a").scheduler

        # a failed engine step: the stream's error event
        def boom(**_: Any) -> Any:
            raise RuntimeError("simulated failure")

        sched.engine.step = boom
        _send(browser, "and now")
        _wait(lambda: "500" in _el(browser, "#error").text, what="the 500 message")
        assert "simulated failure" in _el(browser, "#error").text
        _wait(lambda: sched.alive, what="the engine to come back")
    finally:
        server.stop()
    _send(browser, "anyone there")  # the server is gone
    _wait(lambda: "Cannot reach the server" in _el(browser, "#error").text, what="the unreachable message")
    users = browser.execute_script(
        "return [...document.querySelectorAll('#pane-a .msg.user .body')].map(e => e.textContent)"
    )
    assert users == ["hello", "are you busy", "and now", "anyone there"]  # the conversation is kept
    urls = [r["url"] for r in _requests(browser)]
    assert urls and not any("sesame" in u for u in urls)  # the key is never in a URL
    expected = ("401", "429", "ERR_CONNECTION_REFUSED")
    assert [e for e in _console_errors(browser) if not any(x in e for x in expected)] == []


def _hold(
    url: str, body: dict[str, Any], headers: dict[str, str], release: threading.Event, held: list[str]
) -> None:
    """Stream a request until ``release`` is set, then hang up (the server cancels it)."""
    with httpx.stream("POST", url + "/v1/completions", json=body, headers=headers, timeout=60) as r:
        line = ""
        for line in r.iter_lines():  # noqa: B007 - the last line read is reported
            if release.is_set():
                break
        held.append(f"{r.status_code}: {line[:200]}")


def test_grounded_replies_show_clickable_sources(
    browser: Any, models: dict[str, Any], tmp_path: Path
) -> None:
    """A server with ``--index``: the page offers "sources", sends ``rag``, links the reply's [1] to its
    source (document, span), which a click opens; a passage holding markup shows it as text."""
    from tiny_index import DOCS, build_index, chat_lm

    from lamina.serve import BackgroundServer, ServeConfig

    index = build_index(tmp_path / "tiny.sqlite", models["tiny-embed"])
    chat = chat_lm()
    cfg = ServeConfig(index=str(index), timeout=60.0)
    with BackgroundServer({"chat": chat, "tiny-embed": models["tiny-embed"]}, cfg) as server:
        browser.get(server.url + "/")
        browser.execute_script("localStorage.clear(); sessionStorage.clear()")
        _open(browser, server.url + "/")
        assert _el(browser, "#rag").is_displayed() and "index of" in _el(browser, "#about").get_attribute(
            "textContent"
        )
        _el(browser, "#rag").click()
        _el(browser, "#toggle-settings").click()
        _set(browser, "rag_top_k", "4")
        _set(browser, "max_tokens", "3")
        cite = chat.tokenizer.backend.token_to_id("[1]")
        _set(browser, "extra", json.dumps({"logit_bias": {str(cite): 100}, "temperature": 0}))
        _requests(browser)
        _send(browser, "hello world")
        _idle(browser)
        (body,) = _sent_bodies(browser)
        assert body["rag"] == {"top_k": 4} and body["model"] == "chat"
        links = browser.execute_script(
            "return [...document.querySelectorAll('#pane-a .msg.assistant .body a.cite')]"
            ".map(a => [a.textContent, a.getAttribute('href')])"
        )
        assert links and all(link == ["1", "#source-0-1-1"] for link in links), links
        summaries = browser.execute_script(
            "return [...document.querySelectorAll('#pane-a .sources summary')].map(s => s.textContent)"
        )
        assert len(summaries) == 4 and summaries[0].startswith("[1] ") and ", chars " in summaries[0]
        assert any("greet.md" in s for s in summaries), summaries
        assert (
            browser.execute_script("return document.querySelectorAll('.sources b, .sources script').length")
            == 0
        )
        passages = browser.execute_script(
            "return [...document.querySelectorAll('#pane-a .sources .passage')].map(p => p.textContent)"
        )
        assert DOCS["greet.md"] in passages  # its <b> is text
        assert not browser.execute_script(
            "return document.getElementById('source-0-1-1').querySelector('details').open"
        )
        _el(browser, "#pane-a .body a.cite").click()
        _wait(lambda: browser.execute_script(
            "return document.getElementById('source-0-1-1').querySelector('details').open"
        ), what="the cited source to open")  # fmt: skip
        assert "cited" in _el(browser, "#source-0-1-1").get_attribute("class")
        nasty = [
            "[1](javascript:alert(1))",
            "[1]<script>x()</script>[2]",
            '[1, 9]" onclick="x',
            "`[1]` [2](http://a)",
            "sys.argv[1] and f(x)[2] are code; [1][2] cite",
        ]
        html = browser.execute_script(
            "return arguments[0].map(t => window.lamina.renderMarkdown(t, {numbers: [1, 2], prefix: 'p'}))",
            nasty,
        )
        assert (
            html[0].startswith('<p>[<a class="cite" href="#p-1">1</a>](javascript:')
            and "<script" not in html[1]
        )
        assert '[<a class="cite" href="#p-1">1</a>, 9]&quot; onclick=&quot;x' in html[2]
        assert (
            "<code>[1]</code>" in html[3] and 'href="http://a"' in html[3]
        )  # code and links stay themselves
        assert "argv[1]" in html[4] and "f(x)[2]" in html[4] and html[4].count('class="cite"') == 2
        browser.save_screenshot(str(browser.shots / "sources-1440.png"))
        _open(browser, server.url + "/")  # a reload keeps the sources and the links
        assert len(browser.execute_script("return document.querySelectorAll('#pane-a .sources li')")) == 4
        assert browser.execute_script("return document.querySelectorAll('#pane-a a.cite').length") == len(
            links
        )
    errors = [e for e in _console_errors(browser) if "ERR_CONNECTION_REFUSED" not in e]
    assert errors == []
