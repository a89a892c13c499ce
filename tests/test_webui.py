"""The web chat UI at `/` (api/webui/), driven in headless Chromium against a real server with smollm2.

Needs Debian's `chromium` and `chromium-driver` (or CHROMIUM / CHROMEDRIVER naming the binaries)
and the `selenium` package; each browser test skips, saying which is missing, without them.
LLAMATRON_WEBUI_SCREENSHOT=PATH saves the screenshot the tests take there (docs/webui.png).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from server_fixture import metric, settle, start_server

KEY = "webui-test-key"
XSS = "<img src=x onerror=window.__pwned=1>"
FOREIGN = re.compile(r"""(src|href)\s*=\s*["']?(https?:)?//|from\s+["'](https?:)?//|url\(\s*["']?(https?:)?//""")


def _browser_binaries() -> tuple[str, str] | str:
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver")
    if not chromium:
        return "no Chromium binary (apt-get install chromium, or set CHROMIUM)"
    if not driver:
        return "no chromedriver (apt-get install chromium-driver, or set CHROMEDRIVER)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return chromium, driver


# ---- servers -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server() -> Any:
    srv = start_server()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def key_server() -> Any:
    srv = start_server(api_key=[KEY])
    yield srv
    srv.stop()


def test_page_and_assets_open_without_key_api_needs_it(key_server: Any) -> None:
    base = key_server.base_url
    page = httpx.get(base + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]  # no inline script may run
    for name in ("", "webui/app.js", "webui/api.js", "webui/markdown.js", "webui/store.js", "webui/style.css",
                 "webui/icon.svg"):
        r = httpx.get(f"{base}/{name}")
        assert r.status_code == 200, name
        # nothing loads from another host (no CDN): every src/href/import/url() is this origin's
        assert not FOREIGN.search(r.text), name
    assert httpx.get(base + "/webui/nope.js").status_code == 404
    assert httpx.get(base + "/webui/..%2Fwebui.py").status_code == 404  # only the shipped files
    assert httpx.get(base + "/v1/models").status_code == 401
    ok = httpx.get(base + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200


def test_no_webui_setting() -> None:
    from api.cli_serve import add_serve_args, settings_from_args
    from api.server import load_settings

    assert load_settings({}, env={}).no_webui is False
    assert load_settings({}, env={"LLAMATRON_NO_WEBUI": "true"}).no_webui is True
    import argparse

    p = argparse.ArgumentParser()
    add_serve_args(p)
    assert settings_from_args(p.parse_args(["--no-webui"])).no_webui is True
    srv = start_server(no_webui=True)
    try:
        assert httpx.get(srv.base_url + "/").status_code == 404
        assert httpx.get(srv.base_url + "/webui/app.js").status_code == 404
        assert httpx.get(srv.base_url + "/v1/models").status_code == 200
    finally:
        srv.stop()


def test_assets_are_package_data() -> None:
    """A built (non-editable) package must carry the page: pyproject's package-data covers every file."""
    import fnmatch
    import tomllib

    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["api"]
    files = [p.relative_to(root / "api").as_posix() for p in (root / "api" / "webui").iterdir()]
    assert files and all(any(fnmatch.fnmatch(f, pat) for pat in patterns) for f in files), files


# ---- the browser ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser() -> Any:
    found = _browser_binaries()
    if isinstance(found, str):
        pytest.skip(f"browser tests need Chromium: {found}")
    chromium, driver_path = found
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1100,760", "--force-device-scale-factor=1", "--no-first-run",
                "--disable-extensions", "--disable-background-networking"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(options=opts, service=Service(executable_path=driver_path))
    drv.set_script_timeout(30)
    yield drv
    drv.quit()


def wait_for(cond: Callable[[], Any], timeout: float = 30.0, what: str = "condition", drv: Any = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = cond()
        except Exception:  # noqa: BLE001 - elements re-render while streaming
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            logs = drv.get_log("browser") if drv is not None else []
            raise AssertionError(f"timed out waiting for {what}; browser log: {logs}")
        time.sleep(0.05)


def by_css(drv: Any, sel: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return drv.find_elements(By.CSS_SELECTOR, sel)


def open_page(drv: Any, base: str, fresh: bool = True) -> None:
    drv.get(base + "/")
    if fresh:
        drv.execute_script("localStorage.clear()")
        drv.get(base + "/")
    wait_for(lambda: drv.execute_script("return document.body.dataset.ready === '1'"), what="page ready", drv=drv)


def set_setting(drv: Any, field: str, value: str) -> None:
    """Types into the settings panel (opening it) and commits the change as a person would."""
    from selenium.webdriver.common.by import By

    if by_css(drv, "#settings")[0].get_attribute("hidden") is not None:
        drv.find_element(By.ID, "settings-toggle").click()
    box = drv.find_element(By.ID, field)
    if box.tag_name == "select":
        from selenium.webdriver.support.ui import Select

        Select(box).select_by_value(value)
    else:
        box.clear()
        box.send_keys(value)
        drv.execute_script("arguments[0].dispatchEvent(new Event('change', {bubbles: true}))", box)


def send(drv: Any, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = drv.find_element(By.ID, "input")
    box.click()
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def assistant_messages(drv: Any) -> list[dict[str, Any]]:
    return drv.execute_script("""
        return [...document.querySelectorAll('#messages .msg.assistant')].map(m => ({
          text: (m.querySelector('.content') || {}).textContent || '',
          live: m.classList.contains('live'),
          stats: (m.querySelector('.stats') || {}).textContent || '',
          error: (m.querySelector('.error') || {}).textContent || ''}))""")


def last_answer(drv: Any, timeout: float = 45.0) -> dict[str, Any]:
    def done() -> Any:
        msgs = assistant_messages(drv)
        return msgs and not msgs[-1]["live"] and drv.execute_script("return document.querySelector('#stop').hidden") \
            and msgs[-1]
    return wait_for(done, timeout, "the answer to finish", drv)


def stored(drv: Any) -> list[dict[str, Any]]:
    return json.loads(drv.execute_script("return localStorage.getItem('llamatron.conversations') || '[]'"))


def aborted(base: str) -> float:
    return metric(httpx.get(base + "/metrics").text, 'llamatron:requests_total{finish_reason="abort"}')


# ---- browser tests (in order: they share one page and its localStorage) -----------------------

def test_chat_streams_and_shows_stats(browser: Any, server: Any) -> None:
    drv = browser
    open_page(drv, server.base_url)
    assert "Chat with smollm2" in drv.find_element("css selector", "#messages").text
    set_setting(drv, "max_tokens", "40")
    set_setting(drv, "temperature", "0")
    send(drv, "Write a short poem about the sea.")
    seen: set[int] = set()

    def grew() -> bool:  # partial answers appear while the request is still running
        msgs = assistant_messages(drv)
        if msgs and msgs[-1]["live"] and msgs[-1]["text"].strip():
            seen.add(len(msgs[-1]["text"]))
        return len(seen) >= 2
    wait_for(grew, 30, "streamed partial text", drv)
    ans = last_answer(drv)
    assert ans["text"].strip() and not ans["error"]
    assert "tok/s" in ans["stats"] and "TTFT" in ans["stats"] and "tokens" in ans["stats"], ans
    convs = stored(drv)
    assert len(convs) == 1 and convs[0]["title"] == "Write a short poem about the sea."
    assert [m["role"] for m in convs[0]["messages"]] == ["user", "assistant"]
    assert convs[0]["settings"]["max_tokens"] == 40


def test_stop_aborts_on_the_server(browser: Any, server: Any) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    drv = browser
    settle(server)
    before = aborted(server.base_url)
    set_setting(drv, "max_tokens", "1500")
    set_setting(drv, "temperature", "0.8")
    send(drv, "Write a long story about a dragon.")
    wait_for(lambda: (m := assistant_messages(drv)) and m[-1]["live"] and len(m[-1]["text"]) > 10, 30,
             "the story to start", drv)
    ActionChains(drv).send_keys(Keys.ESCAPE).perform()  # Esc stops, as the Stop button does
    ans = last_answer(drv, 10)
    assert "stopped" in ans["stats"] and ans["text"].strip()
    t0 = time.monotonic()
    wait_for(lambda: aborted(server.base_url) >= before + 1, 10, "/metrics to count the aborted request", drv)
    st = server.wait_idle(10)
    assert st.num_running == 0 and st.num_waiting == 0 and time.monotonic() - t0 < 10
    set_setting(drv, "max_tokens", "24")


def test_regenerate_and_edit_last_message(browser: Any, server: Any) -> None:
    drv = browser
    by_css(drv, ".msg.assistant .regenerate")[-1].click()
    ans = last_answer(drv)
    assert ans["text"].strip() and not ans["error"]
    assert len(stored(drv)[0]["messages"]) == 4  # the stopped answer was replaced
    by_css(drv, ".msg.user .edit")[-1].click()
    box = by_css(drv, ".edit-box")[0]
    box.clear()
    box.send_keys("Name a color.")
    by_css(drv, ".save-edit")[0].click()
    last_answer(drv)
    msgs = stored(drv)[0]["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert msgs[2]["content"] == "Name a color."


def test_reload_finds_the_conversation(browser: Any, server: Any) -> None:
    drv = browser
    before = stored(drv)
    open_page(drv, server.base_url, fresh=False)
    titles = [e.text for e in by_css(drv, "#conversations .conv-title")]
    assert titles == ["Write a short poem about the sea."]
    assert len(by_css(drv, "#messages .msg")) == len(before[0]["messages"])
    assert drv.find_element("id", "title").text == "Write a short poem about the sea."
    by_css(drv, "#new-chat")[0].click()
    assert "Chat with" in drv.find_element("id", "messages").text


def import_json(drv: Any, tmp_path: Path, data: Any) -> None:
    path = tmp_path / "chats.json"
    path.write_text(json.dumps(data))
    drv.execute_script("document.getElementById('import-file').hidden = false")
    drv.find_element("id", "import-file").send_keys(str(path))
    drv.execute_script("document.getElementById('import-file').hidden = true")


IMPORTED = {"format": "llamatron-webui", "version": 1, "conversations": [{
    "id": "imp1", "title": "Imported: markdown and tools", "settings": {"model": "no-such-model", "max_tokens": 16},
    "messages": [
        {"role": "user", "content": "Show me a Python hello world. " + XSS},
        {"role": "assistant", "reasoning_content": "The user wants code.",
         "content": f"Here it is {XSS}:\n\n```python\nprint('hello')\n```\n\n- **bold** item\n- <b>not bold</b>\n"
                    "[link](javascript:alert(1)) and [ok](https://example.com)"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "{\"temp\": 21}"},
        {"role": "assistant", "format": "json_object", "content": "{\"a\":1,\"b\":[true,null]}"},
        {"role": "user", "content": "Thanks! Now say hi."},
    ]}]}


def test_import_renders_markdown_safely(browser: Any, server: Any, tmp_path: Path) -> None:
    drv = browser
    import_json(drv, tmp_path, IMPORTED)
    wait_for(lambda: drv.find_element("id", "title").text == "Imported: markdown and tools", 10, "the import", drv)
    assert drv.execute_script("return document.querySelectorAll('#messages img').length") == 0
    assert drv.execute_script("return window.__pwned === undefined")
    text = drv.find_element("id", "messages").text
    assert XSS in text and "<b>not bold</b>" in text  # shown as the characters the model wrote
    assert by_css(drv, "#messages .code pre code")[0].text == "print('hello')"
    assert by_css(drv, "#messages .code .copy")  # a copy button on every code block
    assert [a.get_attribute("href") for a in by_css(drv, "#messages .content a")] == ["https://example.com/"]
    assert by_css(drv, "#messages strong")[0].text == "bold"
    assert by_css(drv, "details.reasoning")[0].get_attribute("open") is None  # folded
    assert "get_weather" in by_css(drv, "details.tool-call summary")[0].text
    assert "get_weather" in by_css(drv, "details.tool-result summary")[0].text
    pretty = by_css(drv, "#messages .msg.assistant .content .code code")[-1].get_attribute("textContent")
    assert pretty == json.dumps({"a": 1, "b": [True, None]}, indent=2)


def test_model_setting_and_errors(browser: Any, server: Any) -> None:
    """The imported conversation names a model this server does not serve: a clear error, then
    switching the model picker to the served one makes the same conversation work."""
    from selenium.webdriver.support.ui import Select

    drv = browser
    options = [o.get_attribute("value") for o in Select(by_css(drv, "#model")[0]).options]
    assert options == ["smollm2", "no-such-model"]  # /v1/models, plus the conversation's own
    by_css(drv, "#messages .regenerate")[-1].click()  # the import ends with a question: "Answer"
    ans = last_answer(drv)
    assert "does not exist" in ans["error"] and "Pick a model" in ans["error"], ans
    set_setting(drv, "model", "smollm2")
    by_css(drv, ".msg.assistant .regenerate")[-1].click()
    ans = last_answer(drv)
    assert ans["text"].strip() and not ans["error"]
    conv = next(c for c in stored(drv) if c["title"].startswith("Imported"))
    assert conv["settings"]["model"] == "smollm2"


def test_context_too_long_is_explained(browser: Any, server: Any, tmp_path: Path) -> None:
    drv = browser
    long = {"title": "Too long", "settings": {"model": "smollm2", "max_tokens": 16},
            "messages": [{"role": "user", "content": "word " * 3000}]}
    import_json(drv, tmp_path, long)
    wait_for(lambda: drv.find_element("id", "title").text == "Too long", 10, "the import", drv)
    by_css(drv, "#messages .regenerate")[-1].click()
    ans = last_answer(drv)
    assert "too long for the model's context" in ans["error"] and "Start a new conversation" in ans["error"], ans


def test_live_answer_with_html_stays_text(browser: Any, server: Any) -> None:
    """A real streamed answer containing an <img onerror> tag (the grammar makes smollm2 write it):
    it shows as text, and no element is created from it."""
    drv = browser
    grammar = f'root ::= "Sure: {XSS} and **bold**"'
    drv.execute_script("""
        const grammar = arguments[0], real = window.fetch;
        window.fetch = (url, opts) => {
          if (String(url).includes('/chat/completions')) {
            const body = {...JSON.parse(opts.body), grammar, max_tokens: 64};
            opts = {...opts, body: JSON.stringify(body)};
          }
          return real(url, opts);
        };""", grammar)
    by_css(drv, "#new-chat")[0].click()
    send(drv, "Say it.")
    ans = last_answer(drv)
    assert ans["text"] == f"Sure: {XSS} and bold", ans
    assert drv.execute_script("return document.querySelectorAll('#messages img').length") == 0
    assert drv.execute_script("return window.__pwned === undefined")


SHOWCASE = {"title": "Reading a file in Python", "settings": {"model": "smollm2", "max_tokens": 48, "temperature": 0},
            "messages": [
                {"role": "user", "content": "How do I read a text file in Python?"},
                {"role": "assistant", "stats": {"tokens": 61, "tps": 15.2, "ttft_ms": 212},
                 "content": "Open it with a `with` block, so the file is closed for you:\n\n```python\n"
                            "with open(\"notes.txt\", encoding=\"utf-8\") as f:\n    text = f.read()\n```\n\n"
                            "- `f.read()` returns the **whole** file as one string\n"
                            "- iterate `for line in f:` to read it line by line"}]}


def test_screenshot_phone_width_and_dark_theme(browser: Any, server: Any, tmp_path: Path) -> None:
    drv = browser
    open_page(drv, server.base_url, fresh=False)
    import_json(drv, tmp_path, SHOWCASE)
    wait_for(lambda: drv.find_element("id", "title").text == SHOWCASE["title"], 10, "the showcase import", drv)
    send(drv, "And how do I write one?")
    assert last_answer(drv)["text"].strip()
    drv.execute_script("document.getElementById('status').hidden = true")  # the import notice
    out = Path(os.environ.get("LLAMATRON_WEBUI_SCREENSHOT") or tmp_path / "webui.png")
    drv.save_screenshot(str(out))
    assert out.stat().st_size > 10_000
    light = drv.execute_script("return getComputedStyle(document.body).backgroundColor")
    drv.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "dark"}]})
    dark = drv.execute_script("return getComputedStyle(document.body).backgroundColor")
    drv.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
    assert light == "rgb(255, 255, 255)" and dark != light
    drv.set_window_size(390, 800)
    try:
        side = by_css(drv, "#sidebar")[0]
        wait_for(lambda: side.rect["x"] + side.rect["width"] <= 0, 5, "the list to leave the screen", drv)
        assert by_css(drv, "#send")[0].is_displayed() and by_css(drv, "#input")[0].rect["width"] > 200
        width = drv.execute_script("return document.documentElement.scrollWidth")
        assert width <= 390  # nothing wider than the phone
        by_css(drv, "#menu")[0].click()
        wait_for(lambda: side.rect["x"] >= 0, 5, "the drawer to open", drv)
        by_css(drv, "#conversations .conv-title")[0].click()
        wait_for(lambda: side.rect["x"] + side.rect["width"] <= 0, 5, "the drawer to close", drv)
    finally:
        drv.set_window_size(1100, 760)


def test_api_key_server(browser: Any, key_server: Any) -> None:
    from selenium.webdriver.common.by import By

    drv = browser
    drv.get(key_server.base_url + "/")
    drv.execute_script("localStorage.clear()")
    drv.get(key_server.base_url + "/")
    wait_for(lambda: drv.find_element(By.ID, "key-dialog").is_displayed(), 10, "the key dialog", drv)
    drv.find_element(By.ID, "key-input").send_keys("wrong")
    drv.find_element(By.ID, "key-save").click()
    wait_for(lambda: drv.find_element(By.ID, "key-dialog").is_displayed(), 10, "the dialog again after a bad key", drv)
    assert "refused" in drv.find_element(By.ID, "key-reason").text
    box = drv.find_element(By.ID, "key-input")
    box.clear()
    box.send_keys(KEY)
    drv.find_element(By.ID, "key-save").click()
    wait_for(lambda: drv.execute_script("return document.body.dataset.ready === '1'") and
             [o.get_attribute("value") for o in by_css(drv, "#model option")] == ["smollm2"], 10,
             "models after the key", drv)
    set_setting(drv, "max_tokens", "12")
    send(drv, "Say hello.")
    ans = last_answer(drv)
    assert ans["text"].strip() and not ans["error"]
    assert drv.execute_script("return localStorage.getItem('llamatron.apiKey')") == KEY


def test_many_models_picker_loads_the_chosen_model(browser: Any, tmp_path_factory: Any, smollm2_path: Path,
                                                   gemma3_path: Path) -> None:
    """Against the many-model router: the picker lists every model with its state, and a message to
    a model not loaded yet waits for it to load, then streams its answer."""
    from router_fixture import model_folder, router_process

    folder = model_folder(tmp_path_factory.mktemp("webui-models"), {"smollm2": smollm2_path, "gemma3": gemma3_path})
    drv = browser
    with router_process(folder) as r:
        open_page(drv, r.base_url)
        labels = wait_for(lambda: [o.get_attribute("textContent") for o in by_css(drv, "#model option")] or None,
                          10, "the picker", drv)
        assert labels == ["gemma3 (unloaded)", "smollm2 (unloaded)"]
        set_setting(drv, "model", "gemma3")
        set_setting(drv, "max_tokens", "12")
        send(drv, "Once upon a time")
        ans = last_answer(drv, timeout=120)
        assert ans["text"].strip() and not ans["error"], ans
        assert r.status("gemma3") == "loaded" and r.status("smollm2") == "unloaded"
