"""The listening report (report.html): excerpts, encoder size, page contents, rebuild options,
and the page itself in a real browser (Debian's chromium + chromedriver through selenium)."""
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, run_cli

from cache.run import entry_of, ingest_dataset
from core.datasets import open_dataset
from core.store import StemStore
from core.synth import generate_dataset
from mixer.blend import search_blend
from mixer.train import train_mixer
from reports import evaluate as ev
from reports.clips import (
    KBPS,
    MIN_KBPS,
    bytes_per_second,
    encode_opus,
    excerpt_window,
    fit_kbps,
)
from reports.html import PAIRED_COLUMNS
from reports.listening import ListeningOptions

SOURCES = ["drums", "bass", "other", "vocals"]
RATE = 16000
SEGMENT = 4096   # the MDX-Mixer's T


def probe(path) -> dict:
    out = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration,format_name:"
                          "stream=codec_name,channels", "-of", "json", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


# ---- excerpts and the encoder ----------------------------------------------------------------
def test_excerpt_window_finds_the_loudest_part():
    rate = 1000
    x = 0.01 * np.random.default_rng(0).standard_normal((2, 60 * rate))
    x[:, 37 * rate:41 * rate] *= 50                      # a loud passage at 37-41 s
    start, length = excerpt_window(x, rate, excerpt=10, whole_below=30)
    assert length == 10 * rate
    assert start <= 37 * rate and start + length >= 41 * rate
    x[:, -2 * rate:] *= 1000                             # louder still, at the very end
    start, length = excerpt_window(x, rate, excerpt=10, whole_below=30)
    assert (start, length) == (50 * rate, 10 * rate)      # clamped inside the track
    assert excerpt_window(x[:, :29 * rate], rate, 10, 30) == (0, 29 * rate)   # short: whole
    assert excerpt_window(x, rate, excerpt=0) == (0, 60 * rate)               # 0: whole


def test_encoder_bytes_per_second_keep_50_tracks_x_8_systems_under_150_mb(tmp_path):
    # white noise is the encoder's worst case: constrained VBR spends its whole budget on it
    x = 0.3 * np.random.default_rng(0).standard_normal((2, 10 * 44100)).astype(np.float32)
    path = tmp_path / "noise.webm"
    encode_opus(x, 44100, path)
    info = probe(path)
    assert info["streams"][0]["codec_name"] == "opus" and info["streams"][0]["channels"] == 2
    assert abs(float(info["format"]["duration"]) - 10) < 0.02
    measured = path.stat().st_size / 10
    assert 0.9 * KBPS * 125 < measured <= bytes_per_second(KBPS), measured
    # the arithmetic of the module docstring: 50 tracks x (mixture + 4 refs + 8 x 4 estimates)
    clips = 50 * (1 + 4 + 8 * 4)
    assert clips * 10 * bytes_per_second() < 150e6
    assert fit_kbps(clips * 10, 150) == KBPS
    # whole 20 s tracks (the demo's) would not fit at 48 kbit/s: the bitrate drops just enough
    kbps = fit_kbps(clips * 20, 150)
    assert MIN_KBPS <= kbps < KBPS and clips * 20 * bytes_per_second(kbps) <= 150e6
    assert clips * 20 * bytes_per_second(kbps + 1) > 150e6
    assert fit_kbps(1e9, 150) == MIN_KBPS and fit_kbps(1e9, 150, kbps=16) == 16


# ---- an evaluation over synthetic music, with a blend and an MDX-Mixer -----------------------
@pytest.fixture(autouse=True, scope="module")
def one_thread():
    import torch

    threads = torch.get_num_threads()   # tiny models: a second thread only adds contention
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("listen")
    generate_dataset(tmp / "ds", seed=3, n_train=2, n_valid=1, n_test=2, duration=4.0,
                     sample_rate=RATE, progress=False)
    ds = open_dataset(tmp / "ds")
    work = tmp / "work"
    store = StemStore(work / "store")
    ingest_dataset(store, ds, progress=False)
    rng = np.random.default_rng(0)
    keys = []
    for m, leak in enumerate([0.15, 0.3]):   # "separators": leaky mixtures of the truth
        key = f"model{m}-0000"
        store.write_model_info(key, {"key": key, "name": f"model{m}", "family": "test",
                                     "sources": SOURCES, "sample_rate": RATE, "identity": {}})
        M = np.eye(4) * (1 - leak) + leak * rng.random((4, 4))
        for t in ds.tracks:
            refs = np.asarray(store.references(ds.id, entry_of(t)))
            store.write_stems(key, ds.id, entry_of(t), np.einsum("ij,jcn->icn", M, refs), {})
        keys.append(key)
    runs = work / "runs"
    search_blend(store, ds.id, keys, step=0.25, run_dir=runs / "blend")
    train_mixer(store, ds.id, keys, "mdx-mixer", runs / "mdx", preset="tiny", T=SEGMENT, epochs=1, batch=2,
                shift=4096, max_segments_per_epoch=4, device="cpu", progress=False)
    out = work / "reports" / "toy"
    result = ev.evaluate(store, ds.id, models=keys, runs=[("blend", runs / "blend"), ("mdx-mixer", runs / "mdx")],
                         split="test", out=out, cache_root=work / "evalcache", progress=False)
    return {"tmp": tmp, "work": work, "store": store, "ds": ds, "out": out, "result": result}


def clip_table(page: str) -> dict:
    """{track: {row label: [hrefs]}} from the page's clip tables."""
    tracks = {}
    for m in re.finditer(r'<details class="track".*?<span class="name">(.*?)</span>(.*?)</details>', page, re.S):
        rows = {}
        for r in re.finditer(r"<tr><th>(.*?)</th>(.*?)</tr>", m.group(2), re.S):
            rows[r.group(1)] = re.findall(r'href="(audio/[^"]+)"', r.group(2))
        tracks[m.group(1)] = rows
    return tracks


def test_evaluate_writes_a_self_contained_report(evaluation):
    out, result = evaluation["out"], evaluation["result"]
    listening = result["listening"]
    page = (out / "report.html").read_text()
    assert listening["path"] == out / "report.html"
    # nothing outside the folder: no URL with a scheme, every clip and figure present
    assert not re.search(r"\b(https?|wss?|ftp):", page)
    assert not re.search(r'(src|href)="(/|\w+:(?!,))', page.replace('href="data:,"', ""))
    for ref in re.findall(r'(?:src|href)="([^"]+)"', page):
        if ref != "data:,":
            assert (out / ref).is_file(), ref
    assert 'src="sdr_boxplot.png"' in page
    # the summary table: every system, the numbers of summary.md
    md = (out / "summary.md").read_text()
    for system in ("model0", "model1", "best per source", "average", "blend", "mdx-mixer",
                   "oracle: mixture", "oracle: IRM"):
        row = [l for l in md.splitlines() if l.startswith(f"| {system} |")][0]
        average = row.split("|")[6].strip().strip("*")
        assert re.search(rf'<td data-v="{re.escape(system)}"[^>]*>{re.escape(system)}</td>.*?>{re.escape(average)}</td>',
                         page), system
    # per track: mixture, 4 references, every system's 4 estimates; identical clips stored once
    tracks = clip_table(page)
    assert list(tracks) == [t.name for t in evaluation["store"].tracks(evaluation["ds"].id, "test")]
    for rows in tracks.values():
        assert len(rows["mixture"]) == 1 and len(rows["reference"]) == 4
        assert all(len(rows[s]) == 4 for s in ("model0", "blend", "mdx-mixer", "oracle: IRM"))
        assert rows["oracle: mixture"] == rows["mixture"] * 4
        assert set(rows["best per source"]) <= set(rows["model0"] + rows["model1"])
        assert len(set(rows["mdx-mixer"]) | set(rows["model0"]) | set(rows["reference"])) == 12
    files = sorted((out / "audio").glob("*.webm"))
    cited = {href for rows in tracks.values() for hrefs in rows.values() for href in hrefs}
    assert listening["clips"] == len(files) == len(cited) == listening["encoded"]
    assert len(cited) <= 2 * (1 + 4 + 6 * 4)        # 8 systems, 2 of them copies of others
    info = probe(files[0])
    assert info["streams"][0]["codec_name"] == "opus"
    assert abs(float(info["format"]["duration"]) - 4.0) < 0.02       # 4 s tracks: played whole
    assert listening["bytes"] == sum(p.stat().st_size for p in (out / "audio").iterdir()) + \
        (out / "report.html").stat().st_size
    # the MDX-Mixer's W_k over the excerpt, one line per input feeding each target
    data = json.loads(re.search(r'<script type="application/json" id="report-data">(.*?)</script>',
                                page, re.S).group(1))
    w = data["tracks"][0]["weights"][0]
    assert w["system"] == "mdx-mixer" and len(w["inputs"]) == 18 and len(w["outputs"]) == 8
    assert len(w["W"]) == len(w["starts"]) == np.ceil(4.0 * RATE / SEGMENT) and w["segment"] == SEGMENT / RATE
    assert [target for target, _ in w["lines"]] == SOURCES
    assert [label for label, _ in w["lines"][3][1]] == ["mixture", "model0", "model1"]
    Wk = np.array(w["W"])
    np.testing.assert_allclose(w["lines"][1][1][2][1],     # bass, model1
                               Wk[:, [w["inputs"].index("model1.bass.L"), w["inputs"].index("model1.bass.R")],
                                  [w["outputs"].index("bass.L"), w["outputs"].index("bass.R")]].mean(1), atol=2e-3)


def test_report_rebuilds_with_chosen_tracks_systems_and_excerpts(evaluation, capsys, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(evaluation["out"], out)
    store = evaluation["store"]
    track = store.tracks(evaluation["ds"].id, "test")[1].name
    code, _, err = run_cli(["report", out, "--track", track, "--system", "blend", "--system", "mdx-mixer",
                            "--excerpt", "1.5", "--whole-below", "2", "--work", evaluation["work"]], capsys)
    assert code == 0, err
    assert "listening report" in err and str(out / "report.html") in err.replace("\n", "")
    page = (out / "report.html").read_text()
    tracks = clip_table(page)
    assert list(tracks) == [track]
    assert list(tracks[track]) == ["", "mixture", "reference", "blend", "mdx-mixer"]
    files = sorted((out / "audio").glob("*.webm"))
    assert len(files) == 1 + 4 + 8                          # the old clips are gone
    for f in files[:3]:
        assert abs(float(probe(f)["format"]["duration"]) - 1.5) < 0.02
    assert re.search(r"excerpt 0:\d\d\.\d–0:\d\d\.\d of 0:04\.0", page)
    data = json.loads(re.search(r'id="report-data">(.*?)</script>', page, re.S).group(1))
    starts = data["tracks"][0]["weights"][0]["starts"]       # segments overlapping the excerpt
    assert starts[0] <= 0 < starts[0] + SEGMENT / RATE and starts[-1] < 1.5
    # the same options again: every clip reused, nothing encoded
    result = ev.listening_report(out, store, ListeningOptions(tracks=(track,), systems=("blend", "mdx-mixer"),
                                                              excerpt=1.5, whole_below=2), progress=False)
    assert result["encoded"] == 0 and result["clips"] == 13
    # bad choices are one-line errors naming the folder
    code, _, err = run_cli(["report", out, "--system", "nope", "--work", evaluation["work"]], capsys)
    assert code == 1 and "no system named 'nope'" in err and str(out) in err.replace("\n", "")
    code, _, err = run_cli(["report", tmp_path / "missing", "--work", evaluation["work"]], capsys)
    assert code == 1 and "neither a report folder" in err


def test_report_by_run_or_report_name(evaluation, capsys):
    for name in ("mdx", "toy"):     # the run's one report; a report under <work>/reports
        code, _, err = run_cli(["report", name, "--work", evaluation["work"]], capsys)
        assert code == 0, err
        err = err.replace("\n", "")
        assert str(evaluation["out"] / "report.html") in err and " 0 newly encoded" in err


def test_paired_statistics_columns_when_present(evaluation, tmp_path):
    out = tmp_path / "paired"
    shutil.copytree(evaluation["out"], out)
    rows = [{"system": s, "target": t, "reference": "model0", "n_tracks": 2, "delta_mean": d,
             "ci_low": d - 0.4, "ci_high": d + 0.4, "share_improved": 0.5, "delta_median": d / 2}
            for s, d in (("blend", 0.61), ("mdx-mixer", -0.77)) for t in SOURCES + ["average"]]
    pd.DataFrame(rows, columns=PAIRED_COLUMNS).to_csv(out / "paired.csv", index=False)
    ev.listening_report(out, evaluation["store"], ListeningOptions(systems=("blend",)), progress=False)
    page = (out / "report.html").read_text()
    assert "paired Δ avg [95 % CI]" in page and "Paired statistics per target" in page
    assert '<td data-v="0.61" class="up">+0.61 [+0.21, +1.01]</td>' in page
    assert '<td data-v="-0.77" class="down">-0.77 [-1.17, -0.37]</td>' in page
    # the evaluation itself wrote paired.csv (reports.paired): its page shows its own numbers
    written = pd.read_csv(evaluation["out"] / "paired.csv")
    assert list(written.columns) == list(PAIRED_COLUMNS)
    assert "paired Δ avg [95 % CI]" in (evaluation["out"] / "report.html").read_text()
    (out / "paired.csv").unlink()   # a report folder without one: no paired columns
    ev.listening_report(out, evaluation["store"], ListeningOptions(systems=("blend",)), progress=False)
    assert "paired Δ" not in (out / "report.html").read_text()


# ---- the page in a real browser --------------------------------------------------------------
CHROME_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run",
                "--autoplay-policy=no-user-gesture-required", "--mute-audio",
                "--window-size=1280,1400"]


def _find(env: str, names: tuple[str, ...]) -> str | None:
    return os.environ.get(env) or next(filter(None, map(shutil.which, names)), None)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chrome = _find("CHROME_BIN", ("chromium", "chromium-browser", "google-chrome"))
    driver_bin = _find("CHROMEDRIVER", ("chromedriver",))
    if not (chrome and driver_bin):
        message = ("no browser for the listening report's tests: install chromium and chromedriver "
                   "(Debian: apt-get install chromium chromium-driver; `make test` does it as root)")
        if os.environ.get("CI"):
            pytest.fail(message)        # never skipped silently in CI
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chrome
    for flag in CHROME_FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chrome-profile')}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(driver_bin))
    yield driver
    driver.quit()


def wait_for(driver, script, timeout=20.0, *args):
    end = time.monotonic() + timeout
    while True:
        value = driver.execute_script(script, *args)
        if value or time.monotonic() > end:
            return value
        time.sleep(0.05)


def test_report_in_a_browser(evaluation, browser, tmp_path):
    out = tmp_path / "page"
    shutil.copytree(evaluation["out"], out)
    driver = browser
    driver.get_log("performance")                        # drop what the start-up page did
    driver.get((out / "report.html").as_uri())
    assert driver.title.startswith("Listening report")

    # sorting: the first click on a number column sorts descending, the second ascending
    def column(name):
        return driver.execute_script(
            "var t = document.getElementById('summary'), i = Array.from(t.tHead.rows[0].cells)"
            ".findIndex(c => c.textContent === arguments[0]);"
            "return Array.from(t.tBodies[0].rows).map(r => [r.cells[0].textContent, r.cells[i].getAttribute('data-v')]);",
            name)
    before = column("average")
    heading = [h for h in driver.find_elements("css selector", "#summary th") if h.text == "average"][0]
    heading.click()
    after = column("average")
    values = [float(v) for _, v in after if v]
    assert values == sorted(values, reverse=True) and [s for s, _ in after] != [s for s, _ in before]
    heading.click()
    values = [float(v) for _, v in column("average") if v]
    assert values == sorted(values)

    # every clip of every track decodes, with the excerpt's duration
    for details in driver.find_elements("css selector", "details.track"):
        if not details.get_attribute("open"):
            details.find_element("css selector", "summary").click()
    state = "return Array.from(document.querySelectorAll('details.track')).map(d => [Number(d.dataset.duration), " \
            "new Set(Array.from(d.querySelectorAll('a.clip')).map(a => a.getAttribute('href'))).size, " \
            "Array.from(d.querySelectorAll('audio')).map(a => [a.readyState, a.duration, a.error && a.error.code])])"
    wait_for(driver, state + ".every(([d, n, as]) => as.length === n && as.every(a => a[0] >= 2))")
    tracks = driver.execute_script(state)
    assert len(tracks) == 2
    for duration, distinct, audios in tracks:
        assert len(audios) == distinct > 20                 # one element per distinct clip
        for ready, length, error in audios:
            assert error is None and ready >= 2
            assert abs(length - duration) < 0.05, (length, duration)

    # A/B: play the mixture, switch to an estimate while playing: same position, still playing
    first = driver.find_element("css selector", "details.track")
    cells = first.find_elements("css selector", "a.clip")
    cells[0].click()
    assert wait_for(driver, "var p = window.reportPlayers[0]; return !p.current.paused && p.current.currentTime > 0.5")
    switch = driver.execute_script(
        "var p = window.reportPlayers[0], before = p.current.currentTime, a = arguments[0];"
        "a.click(); return [before, p.current.currentTime, p.current.src.endsWith(a.getAttribute('href'))];",
        cells[9])
    assert switch[2] and abs(switch[1] - switch[0]) < 0.05, switch
    assert wait_for(driver, "var p = window.reportPlayers[0]; return !p.current.paused && "
                            "p.current.currentTime > arguments[0] + 0.2", 5, switch[1])
    # paused: seek, switch, the new clip starts where the old one stopped
    driver.execute_script("var p = window.reportPlayers[0]; p.current.pause(); p.current.currentTime = 2.25;")
    position = driver.execute_script("var p = window.reportPlayers[0]; arguments[0].click(); p.current.pause();"
                                     "return p.current.currentTime;", cells[13])
    assert abs(position - 2.25) < 0.05, position
    assert "active" in cells[13].get_attribute("class")

    # the weight plots are drawn (not blank) once the track is open
    drawn = driver.execute_script(
        "return Array.from(document.querySelectorAll('details.track[open] canvas')).map(c => {"
        "var d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data, n = 0;"
        "for (var i = 3; i < d.length; i += 4) n += d[i] > 0; return n; })")
    assert len(drawn) == 4 and min(drawn) > 500, drawn

    # a closed track frees its media players; opened again, it has them back
    second = driver.find_elements("css selector", "details.track")[1]
    count = "return arguments[0].querySelectorAll('audio').length"
    second.find_element("css selector", "summary").click()
    assert wait_for(driver, count.replace("length", "length === 0"), 5, second)
    second.find_element("css selector", "summary").click()
    assert wait_for(driver, count.replace("length", "length === " + str(tracks[1][1])), 5, second)
    assert wait_for(driver, "return Array.from(arguments[0].querySelectorAll('audio')).every(a => a.readyState >= 2)",
                    20, second)

    artifacts = Path(os.environ.get("TEST_ARTIFACTS") or REPO / "work" / "test-artifacts")
    artifacts.mkdir(parents=True, exist_ok=True)
    driver.execute_script("window.scrollTo(0, 0)")
    assert driver.save_screenshot(str(artifacts / "listening-report.png"))
    driver.execute_script("document.querySelector('details.track').scrollIntoView()")
    assert driver.save_screenshot(str(artifacts / "listening-report-track.png"))

    # no console errors, and nothing but local files was requested
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
    # (the browser's own chrome:// pages, such as its new-tab page, are not the report's)
    sent = [json.loads(e["message"])["message"] for e in driver.get_log("performance")]
    urls = {m["params"]["request"]["url"] for m in sent if m["method"] == "Network.requestWillBeSent"
            and not m["params"].get("documentURL", "").startswith("chrome:")}
    assert urls and all(u.split(":", 1)[0] in ("file", "data", "blob") for u in urls), urls
    assert any(u.endswith(".webm") for u in urls)
    resources = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(u.startswith("file:") for u in resources), resources
