"""`adapt ui` in a real browser: Chromium (Debian's `chromium` + `chromium-driver`, installed by
`.ci/run`) driven by Selenium over real HTTP against `adapt ui` started as a command.

The registry is built through the real flow on the tiny base: base, two variants, a trained
and a converted adapter, a pack, a merge, a prompt, a failed run. Every wait is for an element
or a condition, never for a time.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

import pytest

from adapterhub_c import api
from adapterhub_c.registry import Registry
from adapterhub_c.registry.models import Artifact, BaseModel
from adapterhub_c.registry.runs import record_run

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
TASK = "builtin:task/reverse-words"
FAST = dict(steps=4, lr=3e-3, batch_size=2, seq_len=48, max_eval_tokens=300, max_eval_examples=2)
HOSTILE = "<script>window.__pwned = 1; alert('x')</script>"

pytestmark = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
    reason=f"needs Chromium and its driver ({CHROMIUM}, {CHROMEDRIVER}: Debian chromium + chromium-driver, "
           "which .ci/run installs as root)")


def build_world(home: Path) -> dict:
    """The registry of the browser tests, made with the public API (the same calls as the commands)."""
    reg = Registry(home=home)
    api.add_base("builtin:tiny-llama", registry=reg)
    v1 = api.create_variant("builtin:tiny-llama", quant="nf4", prune="wanda", sparsity=0.5, calib_samples=4,
                            calib_seq_len=64, eval_tokens=256, registry=reg)
    v2 = api.create_variant("builtin:tiny-llama", prune="magnitude", sparsity=0.3, calib=None, eval_tokens=256,
                            registry=reg)
    lora = dict(rank=4, alpha=8, targets=["q_proj", "v_proj"], registry=reg, **FAST)
    api.train("builtin:tiny-llama", TASK, name="ui-trained", **lora)
    api.train("builtin:tiny-llama", "builtin:task/uppercase", name="ui-trained-upper", **lora)
    api.convert("ui-trained", v1.name, name="ui-converted", max_eval_tokens=300, max_eval_examples=2, registry=reg)
    api.pack("ui-converted", 0.2, name="ui-pack", registry=reg)
    api.merge(["ui-trained", "ui-trained-upper"], "task_arithmetic", name="ui-merge", registry=reg)
    api.learn_prompt(v1.name, tokens=4, steps=2, batch_size=2, seq_len=48, eval_tokens=128, name="ui-prompt",
                     registry=reg)
    with pytest.raises(RuntimeError), record_run(reg, "adapt convert", {"adapter": "ui-trained", "variant": v2.name}):
        raise RuntimeError("CUDA out of memory (a failed run for the page to show)")
    add_hostile_row(reg)
    reg.close()
    return {"home": home, "variant": v1.name, "other_variant": v2.name}


def add_hostile_row(reg: Registry) -> None:
    """An adapter whose name and card hold a script: new names are refused such characters, but
    rows written by older versions or other tools still load, so the page must escape them."""
    with reg.session() as s:
        base = s.query(BaseModel).one()
        s.add(Artifact(kind="lora", name=HOSTILE, base_id=base.id, source=f"evil/{HOSTILE}@main",
                       config={"card": f"# {HOSTILE}\n<img src=x onerror=alert(1)>"}, files={}, size_bytes=1))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    return build_world(tmp_path_factory.mktemp("ui_home"))


@pytest.fixture(scope="module")
def ui_url(world, tmp_path_factory):
    """`adapt ui --port 0` as a process; its first stdout line names the URL."""
    log = tmp_path_factory.mktemp("ui_log") / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "adapterhub_c.cli.main", "--home", str(world["home"]), "ui",
                                 "--port", "0"], stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            line = proc.stdout.readline()  # blocks until the command prints (or exits: "")
            assert line.startswith("adapt ui: http://127.0.0.1:"), (line, log.read_text())
            yield line.split()[2].rstrip(";")
        finally:
            proc.terminate()
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1400,1000",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def wait_for(driver, css: str):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, 30).until(ec.presence_of_element_located((By.CSS_SELECTOR, css)))


def wait_for_url(driver, fragment: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 30).until(lambda d: fragment in d.current_url)


def console_errors(driver) -> list[dict]:
    """SEVERE console entries since the last call (failed loads, script errors, CSP violations)."""
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def show_json(home: Path, name: str, capsys) -> dict:
    """`adapt --home HOME show NAME --json`, in-process."""
    from adapterhub_c.cli.main import main

    capsys.readouterr()
    try:
        main(["--home", str(home), "show", name, "--json"])
    except SystemExit as e:
        assert not e.code, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def by_css(driver, css: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, css)


def attr_css(name: str) -> str:
    return json.dumps(name)  # a CSS string literal (names hold ':' and '/')


# ---- the tests -------------------------------------------------------------------------------------


def test_click_through_tree_to_lineage_and_numbers_match_show(world, ui_url, browser, capsys):
    home, variant = world["home"], world["variant"]
    browser.get(ui_url)
    wait_for(browser, "a.tree-link").click()
    wait_for(browser, "ul.tree")
    assert "/tree/builtin" in browser.current_url
    tree_variant = wait_for(browser, f'li.kind-variant[data-name={attr_css(variant)}]')
    shown = tree_variant.find_element("css selector", ":scope > span.stored").get_attribute("data-bytes")
    assert int(shown) == api.show_variant(variant, registry=Registry(home=home))["stored_bytes"]
    tree_variant.find_element("css selector", ":scope > a.obj").click()

    wait_for_url(browser, "/object/" + quote(variant, safe=""))
    assert wait_for(browser, "#object-name").text == variant
    want = show_json(home, variant, capsys)
    assert int(wait_for(browser, "#object-size").get_attribute("data-bytes")) == want["size_bytes"]
    wait_for(browser, 'a.child[href$="ui-converted"]').click()

    wait_for_url(browser, "/object/ui-converted")
    want = show_json(home, "ui-converted", capsys)
    assert wait_for(browser, "#object-id").text == want["id"]
    assert int(wait_for(browser, "#object-size").get_attribute("data-bytes")) == want["size_bytes"]
    values = [float(td.get_attribute("data-value")) for td in by_css(browser, "table.evaluations td.value")]
    assert values and values == [e["value"] for e in want["evaluations"]]
    assert wait_for(browser, "#reproduce").text.startswith("adapt convert ui-trained " + variant)
    wait_for(browser, 'a.child[href$="ui-pack"]').click()

    wait_for_url(browser, "/object/ui-pack")
    assert wait_for(browser, "#object-name").text == "ui-pack"
    node = wait_for(browser, 'svg.lineage a.node[data-name="ui-converted"]')  # drawn, and a link
    assert {n.get_attribute("data-name") for n in by_css(browser, "svg.lineage a.node")} >= {
        "ui-pack", "ui-converted", "ui-trained", variant}
    node.click()
    wait_for_url(browser, "/object/ui-converted")
    assert wait_for(browser, "#object-name").text == "ui-converted"
    assert console_errors(browser) == []


def test_compare_three_adapters_reads_their_evaluations(world, ui_url, browser, capsys):
    names = ["ui-trained", "ui-converted", "ui-pack"]
    browser.get(ui_url + "compare")
    wait_for(browser, "#compare-names").send_keys("\n".join(names))
    wait_for(browser, "#compare-go").click()
    table = wait_for(browser, "#compare-table")
    header = [th.text for th in table.find_elements("css selector", "thead th")]
    rows = {}  # (artefact, what it was evaluated on) -> row
    for tr in table.find_elements("css selector", "tbody tr.artefact"):
        rows[(tr.get_attribute("data-name"), tr.find_elements("css selector", "td")[2].text)] = tr
    assert {name for name, _ in rows} == set(names)
    assert by_css(browser, "tbody tr.reference")  # the base and the variant alone
    measured = 0
    for (name, on), tr in rows.items():
        want = show_json(world["home"], name, capsys)
        cells = tr.find_elements("css selector", "td")
        assert int(cells[3].get_attribute("data-value")) == want["size_bytes"]
        latest = {}  # the newest evaluation of this adapter on this variant (or the base) per column
        for e in want["evaluations"]:
            if e["with_adapter"] == want["id"] and (e["variant"] or "builtin:tiny-llama") == on:
                latest[f"{e['dataset']} · {e['metric']}"] = e["value"]
        shown = {header[i]: float(c.get_attribute("data-value")) for i, c in enumerate(cells)
                 if i >= 4 and c.get_attribute("data-value")}
        assert shown == latest, (name, on)
        measured += bool(shown)
    assert measured >= 2  # the trained and the converted adapter carry evaluations (the pack none)
    assert wait_for(browser, "svg.scatter")
    # sortable: the stored-size header orders the artefact rows by size
    table.find_elements("css selector", "thead th")[3].click()
    sizes = [int(tr.find_elements("css selector", "td")[3].get_attribute("data-value"))
             for tr in by_css(browser, "#compare-table tbody tr.artefact")]
    assert sizes == sorted(sizes)
    assert console_errors(browser) == []


def test_failed_run_shows_its_error(ui_url, browser):
    from selenium.webdriver.support.ui import Select

    browser.get(ui_url + "runs")
    Select(wait_for(browser, "#runs-status")).select_by_visible_text("failed")
    wait_for(browser, "form.filters button").click()
    wait_for_url(browser, "status=failed")
    rows = by_css(browser, "tr.run-failed")
    assert len(rows) == 1 and "CUDA out of memory" in rows[0].get_attribute("textContent")
    browser.get(ui_url)
    assert "CUDA out of memory" in wait_for(browser, "h2.bad + table").get_attribute("textContent")
    assert console_errors(browser) == []


def test_hostile_name_and_card_are_shown_as_text(ui_url, browser):
    browser.get(ui_url + "object/" + quote(HOSTILE, safe=""))
    assert wait_for(browser, "#object-name").text == HOSTILE
    assert HOSTILE in wait_for(browser, "pre.config").text
    assert browser.execute_script("return window.__pwned === undefined")
    browser.get(ui_url + "search?q=script")
    assert wait_for(browser, "table.results").text.count("<script>") >= 1
    assert browser.execute_script("return window.__pwned === undefined")
    assert console_errors(browser) == []


def test_every_page_answers_200_without_console_errors_and_is_screenshot(world, ui_url, browser, tmp_path):
    pages = {"home": "", "trees": "tree", "tree": "tree/builtin%3Atiny-llama",
             "variant": "object/" + world["variant"], "base": "object/builtin%3Atiny-llama",
             "converted": "object/ui-converted", "pack": "object/ui-pack", "merge": "object/ui-merge",
             "prompt": "object/ui-prompt", "trained": "object/ui-trained",
             "compare": "compare?names=ui-trained%0Aui-converted%0Aui-pack%0Aui-merge",
             "compare-task": "compare?task=reverse-words&variant=" + world["variant"],
             "runs": "runs", "failed-runs": "runs?status=failed", "search": "search?q=ui"}
    console_errors(browser)
    shots = os.environ.get("ADAPTERHUB_UI_SHOTS")
    for name, path in pages.items():
        assert http_status(ui_url + path) == 200, path
        assert http_status(ui_url + path + ("&" if "?" in path else "?") + "format=json") == 200, path
        browser.get(ui_url + path)
        wait_for(browser, "footer a.json")
        assert console_errors(browser) == [], path
        browser.save_screenshot(str(tmp_path / f"{name}.png"))
        if shots and name in ("tree", "compare"):
            shutil.copy(tmp_path / f"{name}.png", Path(shots) / f"ui-{name}.png")
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(f"{n}.png" for n in pages)
    assert all((tmp_path / f"{n}.png").stat().st_size > 5000 for n in pages)
