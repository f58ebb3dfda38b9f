"""The chat page at / in a real headless Chromium (Debian's chromium + chromium-driver, through
selenium) against a real `pagoda serve` with --api-key and --root-path.

Checked: the page and its assets load without the key and stay out of the schema while the API
keeps its protection; without a key the page's API calls get 401 and it asks for the key, which it
then remembers and sends; a question to the bundled model streams into the page (the answer grows
over several DOM updates); Stop aborts a long answer mid-stream and the server counts it as aborted
(/metrics); the markdown renderer escapes hostile input; the image button follows the model card;
--disable-frontend removes the page. The conversation's screenshot is saved as docs/chat_page.png
(the README shows it).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

from server_utils import PagodaServer, metric, parse_metrics

pytestmark = pytest.mark.slow

KEY = "sk-chat-page"
AUTH = {"Authorization": f"Bearer {KEY}"}
PREFIX = "/llm"  # --root-path; the browser goes through the prefix, as behind a forwarding proxy
# the README's picture; a run saves it to a temp file unless PAGODA_UPDATE_SCREENSHOTS=1, so that
# `make test` leaves the checkout clean
SCREENSHOT = (Path(__file__).resolve().parents[1] / "docs" / "chat_page.png"
              if os.environ.get("PAGODA_UPDATE_SCREENSHOTS") == "1"
              else Path(tempfile.gettempdir()) / "pagoda_chat_page.png")
ANSWER_TIMEOUT_S = 240  # a busy 2-core machine
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,960")
ASSETS = ("/static/chat.js", "/static/markdown.js", "/static/chat.css")


@pytest.fixture(scope="module")
def server():
    with PagodaServer(["--api-key", KEY, "--root-path", PREFIX, "--max-model-len", "4096",
                       "--disable-log-stats"]) as s:
        yield s


@pytest.fixture(scope="module")
def browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("chromium / chromedriver not installed (scripts/ci_system_deps.sh installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="pagoda-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    b = webdriver.Chrome(options=options, service=Service(driver))
    b.set_script_timeout(30)
    try:
        yield b
    finally:
        b.quit()
        shutil.rmtree(profile, ignore_errors=True)


def page_url(server) -> str:
    return server.url + PREFIX + "/"


def scrape(server) -> dict[str, float]:
    return parse_metrics(httpx.get(server.url + "/metrics", headers=AUTH, timeout=30).text)


def open_page(b, server, key: str | None):
    """A fresh page load with only ``key`` (or nothing) in localStorage."""
    b.get(page_url(server))
    b.execute_script("localStorage.clear(); if (arguments[0]) localStorage.setItem('pagoda.apiKey', arguments[0]);",
                     key)
    b.get(page_url(server))
    WebDriverWait(b, 30).until(lambda d: d.find_element(By.ID, "model").get_attribute("value")
                               or d.find_element(By.ID, "key-panel").is_displayed())


def assistant_text(b) -> str:
    found = b.find_elements(By.CSS_SELECTOR, ".message.assistant .content")
    return found[-1].text if found else ""


def watch_answers(b) -> None:
    """Record the length of the latest answer at every DOM change (window.__lengths)."""
    b.execute_script("""
        window.__lengths = [];
        new MutationObserver(() => {
          const answers = document.querySelectorAll('.message.assistant .content');
          if (answers.length) window.__lengths.push(answers[answers.length - 1].textContent.length);
        }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
    """)


def set_value(b, element_id: str, value: str, event: str) -> None:
    b.execute_script("const e = document.getElementById(arguments[0]); e.value = arguments[1];"
                     "e.dispatchEvent(new Event(arguments[2]));", element_id, value, event)


def ask(b, text: str) -> None:
    prompt = b.find_element(By.ID, "prompt")
    prompt.send_keys(text)
    prompt.send_keys(Keys.ENTER)


def idle(b) -> bool:
    return b.find_element(By.ID, "send").is_displayed()


# ------------------------------------------------------------------------------------ HTTP
def test_page_is_public_the_api_is_not(server):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for path in ("/", "/chat", PREFIX + "/", PREFIX + "/chat"):
            r = http.get(path)
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), path
            assert 'src="static/chat.js"' in r.text and 'href="static/chat.css"' in r.text  # relative
            assert "script-src 'self'" in r.headers["content-security-policy"]
        for path in ASSETS:
            for prefix in ("", PREFIX):
                r = http.get(prefix + path)
                assert r.status_code == 200 and len(r.content) > 500, prefix + path
        assert "javascript" in http.get("/static/chat.js").headers["content-type"]
        assert http.get("/static/chat.css").headers["content-type"].startswith("text/css")
        # the prefix without its slash: redirected, so the page's relative URLs keep the prefix
        r = http.get(PREFIX)
        assert r.status_code == 307 and r.headers["location"].endswith(PREFIX + "/")
        # only the page's own files are open: everything else still needs the key
        for method, path in (("GET", "/v1/models"), ("GET", "/static/other.js"), ("GET", "/static/"),
                             ("GET", "/chat/x"), ("GET", "/metrics"), ("GET", "/openapi.json"),
                             ("POST", "/v1/chat/completions")):
            assert http.request(method, path).status_code == 401, (method, path)
        assert http.post("/", json={}).status_code == 405  # no key needed, but nothing there either
        paths = http.get("/openapi.json", headers=AUTH).json()["paths"]
        assert "/v1/chat/completions" in paths and not {"/", "/chat", *ASSETS} & set(paths)


def test_disable_frontend_gives_404():
    with PagodaServer(["--disable-frontend", "--disable-log-stats"]) as s:
        with httpx.Client(base_url=s.url, timeout=30) as http:
            for path in ("/", "/chat", *ASSETS):
                r = http.get(path)
                assert r.status_code == 404, path
                assert r.json()["error"]["message"] == f"Route GET {path} not found."
            assert http.get("/v1/models").status_code == 200  # the API itself is unchanged


# --------------------------------------------------------------------------------- browser
def test_without_the_key_the_page_asks_for_it_and_remembers_it(server, browser):
    refused = lambda m: metric(m, "pagoda:http_requests_total", route="/v1/models", status="401")
    before = scrape(server)
    open_page(browser, server, key=None)
    panel = browser.find_element(By.ID, "key-panel")
    assert panel.is_displayed()  # the page loaded, its API call got 401, and it asks for the key
    assert "API key" in browser.find_element(By.ID, "status").text
    assert browser.find_element(By.ID, "model").get_attribute("value") == ""
    assert refused(scrape(server)) >= refused(before) + 1

    key_field = browser.find_element(By.ID, "api-key")
    key_field.send_keys("wrong-key", Keys.ENTER)
    WebDriverWait(browser, 30).until(
        lambda d: "refused" in d.find_element(By.ID, "status").text)
    key_field.clear()
    key_field.send_keys(KEY, Keys.ENTER)
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "model").get_attribute("value"))
    assert Select(browser.find_element(By.ID, "model")).options[0].text == "SmolLM2-135M-Instruct"
    assert browser.execute_script("return localStorage.getItem('pagoda.apiKey')") == KEY

    browser.refresh()  # remembered: the models load at once, with the key
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "model").get_attribute("value"))
    assert browser.find_element(By.ID, "api-key").get_attribute("value") == KEY
    assert browser.find_element(By.ID, "status").text == ""


def test_streamed_answer_then_stop_aborts_on_the_server(server, browser):
    open_page(browser, server, key=KEY)
    set_value(browser, "temperature", "0", "input")  # greedy: the answer is the model's best
    watch_answers(browser)
    finished = lambda m, why: metric(m, "pagoda:request_success_total", finished_reason=why)
    before = scrape(server)

    ask(browser, "What is the capital of France?")
    WebDriverWait(browser, ANSWER_TIMEOUT_S).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, ".message.assistant") and idle(d))
    answer = assistant_text(browser)
    assert "Paris" in answer, answer
    lengths = browser.execute_script("return window.__lengths")
    grew = sorted({n for n in lengths if n > 0})
    assert len(grew) >= 3 and grew[-1] == len(answer), lengths  # streamed: several updates
    after_first = scrape(server)
    assert finished(after_first, "stop") == finished(before, "stop") + 1
    assert browser.find_elements(By.CSS_SELECTOR, ".message.user .content")[-1].text == \
        "What is the capital of France?"

    # markdown from the model is rendered: its fenced code becomes a code block
    ask(browser, "Give me a Python function that reverses a string, in a code block.")
    WebDriverWait(browser, ANSWER_TIMEOUT_S).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, ".message.assistant")) == 2 and idle(d))
    code = browser.find_elements(By.CSS_SELECTOR, ".message.assistant")[-1].find_elements(
        By.CSS_SELECTOR, "pre code")
    assert code and "return" in code[0].text, assistant_text(browser)
    assert "```" not in assistant_text(browser)
    before_stop = scrape(server)

    # a long answer, stopped mid-stream
    max_tokens = 2000
    set_value(browser, "max-tokens", str(max_tokens), "change")
    watch_answers(browser)
    ask(browser, "Write a very long and detailed essay about the history of Paris, "
                 "with many sections and examples.")
    WebDriverWait(browser, ANSWER_TIMEOUT_S).until(
        lambda d: len({n for n in d.execute_script("return window.__lengths") if n > 0}) >= 3
        and len(assistant_text(d)) >= 60)
    assert not idle(browser), "the answer ended before Stop could be pressed"
    browser.find_element(By.ID, "stop").click()
    WebDriverWait(browser, 30).until(idle)
    assert browser.find_elements(By.CSS_SELECTOR, ".message.assistant .note")[-1].text == "stopped"

    deadline = time.monotonic() + 60
    while True:  # the server notices the closed connection, aborts, and frees the slot
        m = scrape(server)
        done = (finished(m, "abort") > finished(before_stop, "abort")
                and metric(m, "pagoda:num_requests_running") == 0)
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert finished(m, "abort") == finished(before_stop, "abort") + 1
    for why in ("stop", "length"):
        assert finished(m, why) == finished(before_stop, why), why
    assert metric(m, "pagoda:num_requests_running") == 0
    generated = (metric(m, "pagoda:request_generation_tokens_sum")
                 - metric(before_stop, "pagoda:request_generation_tokens_sum"))
    assert 0 < generated < max_tokens
    stopped_at = assistant_text(browser)
    time.sleep(1.5)
    assert assistant_text(browser) == stopped_at  # nothing arrives after Stop

    SCREENSHOT.parent.mkdir(exist_ok=True)
    browser.save_screenshot(str(SCREENSHOT))
    with Image.open(SCREENSHOT) as img:
        assert img.size[0] >= 1000 and img.getextrema() != ((255, 255),) * 3


HOSTILE = [
    "<script>window.__pwned = 1</script>",
    "<img src=x onerror=\"window.__pwned = 1\">",
    "```html\n<script>window.__pwned = 1</script>\n```",
    "`<iframe src=\"javascript:window.__pwned=1\"></iframe>`",
    "[click](javascript:window.__pwned=1) [data](data:text/html,<script>x</script>)",
    "[quote](https://example.com/\" onmouseover=\"window.__pwned=1)",
    "**<svg onload=window.__pwned=1>** *<style>body{}</style>*",
    "- <a href=\"javascript:1\">x</a>\n- [ok](https://example.com/a?b=1&c=2)",
    "> <math><mi xlink:href=\"javascript:1\">x</mi></math>",
    "| <b>h</b> | x |\n|---|---|\n| <object data=x> | <embed src=x> |",
    "# <base href=\"https://evil.test/\">\n<meta http-equiv=refresh content=0>\n<form><input></form>",
]


def test_markdown_renderer_escapes_html(server, browser):
    open_page(browser, server, key=KEY)
    check = browser.execute_script("""
        const box = document.createElement('div');
        document.body.append(box);
        const out = [];
        for (const text of arguments[0]) {
          const html = PagodaMarkdown.render(text);
          box.innerHTML = html;
          const tags = [...box.querySelectorAll('*')].map(e => e.tagName.toLowerCase());
          const attrs = [...box.querySelectorAll('*')].flatMap(e => [...e.attributes].map(a => a.name));
          const hrefs = [...box.querySelectorAll('a')].map(a => a.getAttribute('href'));
          out.push({text, html, tags, attrs, hrefs, shown: box.textContent});
        }
        box.remove();
        return out;
    """, HOSTILE)
    allowed = {"p", "br", "pre", "code", "strong", "em", "del", "a", "ul", "ol", "li", "blockquote",
               "h1", "h2", "h3", "h4", "h5", "h6", "hr", "table", "thead", "tbody", "tr", "th", "td"}
    for c in check:
        assert set(c["tags"]) <= allowed, c
        assert set(c["attrs"]) <= {"href", "target", "rel", "class", "data-lang", "start"}, c
        assert all(h.startswith(("https://", "http://")) and '"' not in h for h in c["hrefs"]), c
        assert "<script" not in c["html"] and "<img" not in c["html"], c
    first = check[0]
    assert first["html"] == "<p>&lt;script&gt;window.__pwned = 1&lt;/script&gt;</p>"
    assert first["shown"] == HOSTILE[0]  # shown as text, exactly
    assert check[2]["tags"] == ["pre", "code"] and "<script>" in check[2]["shown"]
    assert check[4]["hrefs"] == []  # javascript: and data: links stay text
    assert check[7]["hrefs"] == ["https://example.com/a?b=1&c=2"]
    time.sleep(0.5)
    assert browser.execute_script("return window.__pwned") is None


def test_markdown_renderer_formats(server, browser):
    open_page(browser, server, key=KEY)
    render = lambda text: browser.execute_script("return PagodaMarkdown.render(arguments[0])", text)
    assert render("**bold**, *it*, `x < y`, ~~old~~ and snake_case_name") == (
        "<p><strong>bold</strong>, <em>it</em>, <code>x &lt; y</code>, <del>old</del> and "
        "snake_case_name</p>")
    assert render("```python\nif a < b:\n    print(a)\n```") == (
        '<pre><code class="language-python" data-lang="python">if a &lt; b:\n    print(a)</code></pre>')
    assert render("```\nstill streaming") == "<pre><code>still streaming</code></pre>"
    assert render("## Title\n\n1. one\n2. two\n   - sub\n\n3. three") == (
        "<h2>Title</h2>\n<ol><li>one</li><li>two<ul><li>sub</li></ul></li><li>three</li></ol>")
    assert render("see [docs](https://example.com/x) now\nnext line") == (
        '<p>see <a href="https://example.com/x" target="_blank" rel="noopener noreferrer">docs</a> '
        "now<br>next line</p>")
    assert render("| a | b |\n|---|:-:|\n| 1 | **2** |") == (
        "<table><thead><tr><th>a</th><th>b</th></tr></thead><tbody><tr><td>1</td><td><strong>2"
        "</strong></td></tr></tbody></table>")
    assert render("> quoted *text*\n\n---") == "<blockquote><p>quoted <em>text</em></p></blockquote>\n<hr>"
    assert render("2*3*4 = 24") == "<p>2*3*4 = 24</p>"


def test_image_button_follows_the_model_card(server, browser, tmp_path):
    open_page(browser, server, key=KEY)
    attach = browser.find_element(By.ID, "attach")
    # the bundled model is text-only: its card has no "vision" capability
    assert not attach.is_displayed()
    assert browser.execute_script("return document.body.dataset.vision") == "false"

    browser.execute_script("PagodaChat.setModels([{id: 'text-model'}, "
                           "{id: 'vl-model', capabilities: ['vision']}])")
    picker = Select(browser.find_element(By.ID, "model"))
    picker.select_by_value("vl-model")
    assert attach.is_displayed() and browser.execute_script("return document.body.dataset.vision") == "true"

    png, txt = tmp_path / "dot.png", tmp_path / "notes.txt"
    Image.new("RGB", (8, 8), (200, 30, 30)).save(png)
    txt.write_text("not an image")
    file_input = browser.find_element(By.ID, "file")
    file_input.send_keys(f"{png}\n{txt}")
    WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#attachments img"))
    thumbs = browser.find_elements(By.CSS_SELECTOR, "#attachments img")
    assert len(thumbs) == 1 and thumbs[0].get_attribute("src").startswith("data:image/png;base64,")
    parts = browser.execute_script("return PagodaChat.userContent('what is this?', [arguments[0]])",
                                   thumbs[0].get_attribute("src"))
    assert parts == [{"type": "text", "text": "what is this?"},
                     {"type": "image_url", "image_url": {"url": thumbs[0].get_attribute("src")}}]
    assert browser.execute_script("return PagodaChat.userContent('hi', [])") == "hi"

    picker.select_by_value("text-model")  # a text model: no button, and the images are dropped
    assert not attach.is_displayed()
    assert browser.find_elements(By.CSS_SELECTOR, "#attachments img") == []


def test_request_body_carries_the_settings(server, browser):
    open_page(browser, server, key=KEY)
    set_value(browser, "system", "Answer in French.", "change")
    set_value(browser, "temperature", "1.25", "input")
    set_value(browser, "max-tokens", "64", "change")
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "salut"}]
    body = browser.execute_script("return PagodaChat.requestBody('m', arguments[0])", history)
    assert body == {"model": "m", "stream": True, "stream_options": {"include_usage": True},
                    "temperature": 1.25, "max_tokens": 64,
                    "messages": [{"role": "system", "content": "Answer in French."}, *history]}
    browser.refresh()  # the settings are remembered
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "model").get_attribute("value"))
    assert browser.find_element(By.ID, "system").get_attribute("value") == "Answer in French."
    assert browser.find_element(By.ID, "temperature-value").text == "1.25"
    assert browser.find_element(By.ID, "max-tokens").get_attribute("value") == "64"


def test_a_refused_request_shows_the_error_and_keeps_the_question(server, browser):
    open_page(browser, server, key=KEY)
    set_value(browser, "max-tokens", "100000", "change")  # more than --max-model-len 4096
    body = browser.execute_script("return PagodaChat.requestBody(arguments[0], "
                                  "[{role: 'user', content: 'Hello there'}])", "SmolLM2-135M-Instruct")
    r = httpx.post(server.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 400
    expected = r.json()["error"]["message"]

    ask(browser, "Hello there")
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "status").text)
    status = browser.find_element(By.ID, "status")
    assert status.text == expected and status.get_attribute("class") == "error"
    assert browser.find_elements(By.CSS_SELECTOR, ".message") == []  # the turn is taken back ...
    assert browser.find_element(By.ID, "prompt").get_attribute("value") == "Hello there"  # ... to resend
    assert idle(browser)
