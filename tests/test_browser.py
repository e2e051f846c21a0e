"""What a person sees in a browser: the self-contained HTML results page (python report.py --format html) and
optuna-dashboard serving a study made by sweep.py, both rendered by real headless Chromium (tests marked `browser`;
tests/conftest.py deselects them with one line where Chromium is not installed). The other tests here read the page's
HTML itself: escaping, no network resources, where the intervals are drawn, the page without matplotlib."""

import base64
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from decimal import Decimal
from html.parser import HTMLParser
from pathlib import Path

import optuna
import pytest

import sweep
from report import main
from tests.conftest import find_chromium
from tests.test_report import PNG_MAGIC, ranker_history, write_run
from tests.test_sweep import retriever_sweep_args
from utils.files import REPO_ROOT

# As root on a closed network: no sandbox (it refuses to start as root), and none of the background connections
# (updates, sync, safe browsing) that would only be refused; a fresh profile for every start.
CHROMIUM_FLAGS = [
    "--headless",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--no-proxy-server",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium(tmp_path: Path, *args: str, timeout: int = 120) -> str:
    """Run headless Chromium with `args` (a URL last) and a new profile in tmp_path; its stdout."""
    profile = tmp_path / f"chromium-profile-{uuid.uuid4().hex}"
    sandbox = ["--no-sandbox"] if os.geteuid() == 0 else []
    command = [find_chromium(), *CHROMIUM_FLAGS, *sandbox, f"--user-data-dir={profile}", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stderr[-3000:]}"
    return result.stdout


def rendered_dom(tmp_path: Path, url: str, wait_ms: int = 10_000) -> str:
    """The page's DOM as Chromium has it after loading `url` and running its scripts for up to `wait_ms` of
    virtual time (a page that fetches its data after load, like the dashboard, has drawn it by then)."""
    return chromium(tmp_path, f"--virtual-time-budget={wait_ms}", "--dump-dom", url)


class Page(HTMLParser):
    """A parsed page: every element (tag, attributes) in order, its visible text (words joined by single spaces),
    and the text of each table row's cells (text inside an <svg> left out)."""

    def __init__(self, text: str):
        super().__init__()
        self.elements: list[tuple[str, dict]] = []
        self.rows: list[list[str]] = []
        self._texts: list[str] = []
        self._cell: list[str] | None = None
        self._svg_depth = self._code_depth = 0
        self.feed(text)
        self.text = " ".join(" ".join(self._texts).split())

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "svg":
            self._svg_depth += 1
        elif tag in ("style", "script"):
            self._code_depth += 1

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "svg":
            self._svg_depth -= 1
        elif tag in ("style", "script"):
            self._code_depth -= 1

    def handle_data(self, data):
        if not self._code_depth:
            self._texts.append(data)
        if self._cell is not None and not self._svg_depth:
            self._cell.append(data)

    def all(self, tag: str, css_class: str | None = None) -> list[dict]:
        return [
            attrs
            for name, attrs in self.elements
            if name == tag and (css_class is None or css_class in (attrs.get("class") or "").split())
        ]


# ------------------------------------------------------------------------------------------- the HTML results page


def ci(diff: float, low: float, high: float) -> dict:
    return {"diff": diff, "ci95": [low, high], "resamples": 2000, "users": 100}


def ranker_metrics(llm_ndcg: float, llm_ci: dict, fused_ci: dict | None = None) -> dict:
    """A ranker's test_metrics.json as train_ranker.py writes it (the keys the report reads), with paired bootstrap
    intervals against the retriever's order on test (100 users) and validation (64 users)."""
    orderings = {"retriever": {"NDCG@10": 0.30, "Recall@10": 0.60}, "llm": {"NDCG@10": llm_ndcg, "Recall@10": 0.6}}
    comparisons = {"llm": {"NDCG@10": llm_ci, "Recall@10": ci(0.0, -0.05, 0.05)}}
    if fused_ci is not None:
        orderings["fused"] = {"NDCG@10": 0.31, "Recall@10": 0.61}
        comparisons["fused"] = {"NDCG@10": fused_ci, "Recall@10": ci(0.01, 0.002, 0.02)}
    return {
        "users_all": 500,
        "users_subset": 100,
        "subset": orderings,
        "overall": {"retriever": {"NDCG@10": 0.06}, "llm": {"NDCG@10": llm_ndcg / 5}},
        "test_vs_retriever": comparisons,
        "val": {"users": 64, "metrics": {"retriever": {"NDCG@10": 0.33}}, "vs_retriever": comparisons},
        "trained": True,
    }


@pytest.fixture
def root(tmp_path) -> Path:
    """ml-100k: two seeds of one ranker experiment (NDCG@10 worse than the retriever's order: interval below 0; fused
    better: above 0), a ranker of another lora_lr with no fused score, a finished retriever and an unfinished one."""
    root = tmp_path / "experiments"
    ranker = {"lora_lr": 0.001, "seed": 1, "llm_fusion": "linear"}
    worse, better = ci(-0.04, -0.07, -0.01), ci(0.02, 0.005, 0.035)
    write_run(root, "ranker", "ml-100k", "a_seed1", ranker, ranker_metrics(0.26, worse, better), ranker_history([0.3]))
    seed2 = {**ranker, "seed": 2}
    write_run(root, "ranker", "ml-100k", "a_seed2", seed2, ranker_metrics(0.28, worse, better), ranker_history([0.3]))
    other = {**ranker, "lora_lr": 0.0001}
    write_run(root, "ranker", "ml-100k", "b_slow", other, ranker_metrics(0.3, ci(0.0, -0.02, 0.02)), [])
    retriever = {"lr": 0.001, "seed": 42, "best_metric": "NDCG@10"}
    history = [{"step": 50, "NDCG@10": 0.02, "best": True}, {"step": 100, "NDCG@10": 0.03, "best": True}]
    test = {"Recall@10": 0.13, "NDCG@10": 0.064, "Recall@20": 0.21}
    write_run(root, "retriever", "ml-100k", "seed42", retriever, test, history)
    write_run(root, "retriever", "ml-100k", "seed43", {**retriever, "seed": 43}, None, history[:1])
    return root


def html_report(root: Path, tmp_path: Path, capsys) -> tuple[Path, str]:
    page = tmp_path / "out" / "report.html"
    assert main([str(root), "--format", "html", "--output", str(page)]) == 0
    return page, capsys.readouterr().err


def test_html_page_is_self_contained(root, tmp_path, capsys):
    page, _ = html_report(root, tmp_path, capsys)
    text = page.read_text(encoding="utf-8")
    parsed = Page(text)
    assert not parsed.all("script") and not parsed.all("link") and "url(" not in text  # nothing fetched, no code
    links = [attrs.get(key) for _, attrs in parsed.elements for key in ("src", "href") if attrs.get(key)]
    images = [attrs["src"] for attrs in parsed.all("img")]
    assert links == images and len(images) == 4  # a curve for each run with a validation history: not b_slow
    for src in images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.removeprefix("data:image/png;base64,")).startswith(PNG_MAGIC)
    assert "No validation history, so no curve: b_slow" in text


def test_html_draws_each_interval_on_its_side_of_zero(root, tmp_path, capsys):
    page, _ = html_report(root, tmp_path, capsys)
    parsed = Page(page.read_text(encoding="utf-8"))
    # 2 seeds x (llm, fused) + b_slow's llm, on test and on validation: 10 rows, each with NDCG@10 and Recall@10
    intervals = parsed.all("svg", "interval")
    assert len(intervals) == 20
    lines = parsed.all("line", "ci")
    zeros = [float(attrs["x1"]) for attrs in parsed.all("line", "zero")]
    dots = [float(attrs["cx"]) for attrs in parsed.all("circle", "diff")]
    assert len(lines) == len(zeros) == len(dots) == 20
    for line, zero, dot, svg in zip(lines, zeros, dots, intervals, strict=True):
        x1, x2 = float(line["x1"]), float(line["x2"])
        diff, low, high = map(float, re.findall(r"[-+]\d\.\d+", svg["aria-label"]))
        assert x1 < x2 and low < high  # every interval of the fixture has a width
        # drawn to scale: the dot and zero sit where the numbers put them between the interval's ends
        assert (dot - x1) / (x2 - x1) == pytest.approx((diff - low) / (high - low), abs=0.02)
        assert (zero - x1) / (x2 - x1) == pytest.approx(-low / (high - low), abs=0.02)
        kind = (set(line["class"].split()) - {"ci"}).pop()
        assert kind == {"worse": "worse", "better": "better"}.get(svg["aria-label"].split("] ")[1], "unclear")
        if kind == "worse":
            assert x2 < zero
        elif kind == "better":
            assert x1 > zero
        else:
            assert x1 <= zero <= x2
    # the NDCG@10 column shares one axis: -0.07 at its left end, 0.035 at its right end
    ndcg = [line for line, svg in zip(lines, intervals, strict=True) if "-0.0400 [-0.0700" in svg["aria-label"]]
    assert ndcg and all(float(line["x1"]) == 26.0 for line in ndcg)
    rows = {tuple(row[:3]): row for row in parsed.rows if len(row) == 7}
    assert rows[("a_seed1", "ranker", "test (100 users)")][3] == "-0.0400 [-0.0700, -0.0100] worse"
    assert rows[("a_seed2", "fused", "validation (64 users)")][3] == "+0.0200 [+0.0050, +0.0350] better"
    assert rows[("b_slow", "ranker", "test (100 users)")][3] == "+0.0000 [-0.0200, +0.0200] no clear difference"
    assert ("b_slow", "fused", "test (100 users)") not in rows  # b_slow has no fused score


def test_html_escapes_names_and_flag_values(root, tmp_path, capsys):
    name = '<img src=x onerror="alert(1)">&'
    test = {"Recall@10": 0.15, "NDCG@10": 0.07, "Recall@20": 0.25}
    retriever = {"lr": "<b>0.1</b>", "seed": 7, "best_metric": "NDCG@10"}
    write_run(root, "retriever", "ml-100k", name, retriever, test, [{"step": 5, "NDCG@10": 0.1}])
    write_run(root, "retriever", "ml-100k", name + "2", retriever, None, [{"step": 5, "NDCG@10": 0.1}])
    page, _ = html_report(root, tmp_path, capsys)
    text = page.read_text(encoding="utf-8")
    assert "<img src=x" not in text and "<b>" not in text
    escaped = "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;&amp;"
    assert f"<figcaption>{escaped}</figcaption>" in text  # its curve
    assert f"<li>retriever / ml-100k / {escaped}2: 1 validation, last at step 5</li>" in text  # unfinished
    parsed = Page(text)
    assert len(parsed.all("img")) == 6  # the 4 curves before, the two new runs' curves, no img from a name
    group = next(row for row in parsed.rows if row and row[0] == "lr=<b>0.1</b>")  # the parsed page shows them as
    assert group[2] == name  # they are


def test_html_without_matplotlib_has_tables_and_intervals_and_says_why_no_curves(root, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError, as uninstalled
    page, err = html_report(root, tmp_path, capsys)
    assert err.strip().splitlines() == [
        "note: matplotlib is not installed, so the html report has no validation curves "
        "(pip install matplotlib, or pip install -r requirements-dev.txt)"
    ]
    parsed = Page(page.read_text(encoding="utf-8"))
    assert not parsed.all("img") and len(parsed.all("svg", "interval")) == 20
    assert any(row[:3] == ["lora_lr=0.001", "2", "a_seed1, a_seed2"] for row in parsed.rows)
    # --plots has nothing to draw without it: one error before anything is written
    plots, output = tmp_path / "plots", tmp_path / "report.md"
    assert main([str(root), "--plots", str(plots), "--output", str(output)]) == 2
    assert capsys.readouterr().err == (
        "error: --plots: expected matplotlib to be installed, found it missing (pip install matplotlib, or pip "
        "install -r requirements-dev.txt)\n"
    )
    assert not plots.exists() and not output.exists()


@pytest.mark.browser
def test_html_report_in_chromium_shows_tables_curves_and_intervals(root, tmp_path, capsys):
    page, _ = html_report(root, tmp_path, capsys)
    # a copy of the page that records, once loaded, what Chromium made of each image and interval
    probe = """<script>addEventListener("load", () => {
      for (const img of document.images) img.dataset.drawn = img.naturalWidth + "x" + img.naturalHeight;
      for (const line of document.querySelectorAll("line.ci")) line.dataset.drawn = line.getBBox().width;
      document.body.dataset.loaded = "yes";
    });</script>"""
    probed = page.with_name("probed.html")
    probed.write_text(page.read_text(encoding="utf-8").replace("</body>", probe + "</body>"), encoding="utf-8")
    text = rendered_dom(tmp_path, probed.as_uri(), wait_ms=3000)
    dom = Page(text)
    assert dom.all("body")[0].get("data-loaded") == "yes"
    images = dom.all("img")
    assert len(images) == 4 and all(img["data-drawn"] == "480x320" for img in images)  # decoded: 6 x 4 in at 80 dpi
    lines = dom.all("line", "ci")
    assert len(lines) == 20 and all(float(line["data-drawn"]) > 0 for line in lines)
    headings = re.findall(r"<h2>(.*?)</h2>", text)
    assert headings == ["retriever / ml-100k", "ranker / ml-100k", "Unfinished runs (no test_metrics.json)"]
    rows = dom.rows
    assert ["defaults", "1", "seed42", "0.1300 ± -", "0.0640 ± -", "0.2100 ± -", "-"] in rows  # no NDCG@20 there
    assert ["paper (Table 1)", "", "", "0.1426", "0.0705", "-", "-"] in rows
    pooled = next(row for row in rows if row[:3] == ["lora_lr=0.001", "2", "a_seed1, a_seed2"])
    assert pooled[3] == "0.2700 ± 0.0141"  # llm NDCG@10: mean of 0.26, 0.28; sample sd 0.01 * sqrt(2)
    assert ["paper (Table 3, overall: Table 1)", "", "", "0.3766", "0.7560", "0.3367", "0.6654", "-", "-"] == next(
        row for row in rows if row and row[0].startswith("paper (Table 3")
    )[:9]


# ------------------------------------------------------------------------------------------------ optuna-dashboard


def js_number(value: float) -> str:
    """A float as the page's JavaScript prints it: the shortest digits that read back as it (as Python's repr), with
    no trailing ".0" and no exponent down to 1e-6."""
    if value == int(value):
        return str(int(value))
    return format(Decimal(repr(value)), "f") if abs(value) >= 1e-6 else repr(value)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dashboard_command() -> str:
    """The optuna-dashboard script installed beside this Python (the venv's), else the one on PATH."""
    beside = Path(sys.executable).parent / "optuna-dashboard"
    return str(beside) if beside.exists() else "optuna-dashboard"


def wait_for_dashboard(server: subprocess.Popen, port: int, log: Path, timeout: float = 90) -> list[dict]:
    """The studies the dashboard serves, once it answers; fails with its output if it exits or never answers."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            pytest.fail(f"optuna-dashboard exited with {server.returncode}: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as response:
                return json.loads(response.read())["study_summaries"]
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.3)
    pytest.fail(f"optuna-dashboard did not answer on 127.0.0.1:{port} within {timeout:.0f} s")


@pytest.mark.browser
def test_optuna_dashboard_shows_the_trials_of_a_sweep(tmp_path):
    """The documented command (optuna-dashboard sqlite:///<experiment_root>/sweeps/<study>/study.db) on a study that
    sweep.py made: Chromium renders the study's pages with every trial's run, value and flags."""
    assert sweep.main(retriever_sweep_args(tmp_path, "dash", trials=2, workers=1, max_steps=10)) == 0
    database = tmp_path / "exp" / "sweeps" / "dash" / "study.db"
    trials = optuna.load_study(study_name="dash", storage=f"sqlite:///{database}").get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    port = free_port()
    command = [dashboard_command(), "--host", "127.0.0.1", "--port", str(port), f"sqlite:///{database}"]
    log = tmp_path / "dashboard.log"
    with open(log, "w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        studies = wait_for_dashboard(server, port, log)
        assert [study["study_name"] for study in studies] == ["dash"]
        study_page = f"http://127.0.0.1:{port}/dashboard/studies/{studies[0]['study_id']}"
        with urllib.request.urlopen(study_page, timeout=30) as response:
            served = response.read().decode("utf-8")
        # the trial list with every trial's details open
        numbers = ",".join(str(t.number) for t in trials)
        listed = Page(rendered_dom(tmp_path, f"{study_page}/trials?numbers={numbers}")).text
        assert "2 Trials" in listed
        for t in trials:
            run_name = t.user_attrs["run_name"]
            assert run_name == f"dash_trial{t.number}" and run_name not in served  # drawn by the page's scripts
            assert f"Trial {t.number} (trial_id=" in listed and f"run_name {run_name}" in listed
            assert f"Value {js_number(t.value)}" in listed  # the run's best validation Recall@10
            assert f"bert_dropout {js_number(t.params['bert_dropout'])}" in listed
            steps = " ".join(f"{step} {js_number(value)}" for step, value in sorted(t.intermediate_values.items()))
            assert f"Intermediate Values {steps}" in listed  # the validation curve the pruner reads
        best = max(trials, key=lambda t: (t.value, -t.number))
        history = Page(rendered_dom(tmp_path, study_page)).text
        assert "History" in history and f"Best Trial (number={best.number}) {js_number(best.value)}" in history
    finally:
        server.terminate()
        server.wait(timeout=30)


# ------------------------------------------------------------------------------------------ without Chromium


def collect_browser_tests(env: dict) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "--collect-only",
        "-q",
        "tests/test_browser.py",
    ]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_without_chromium_the_browser_tests_are_deselected_in_one_line_or_required():
    env = {key: value for key, value in os.environ.items() if key != "REQUIRE_BROWSER_TESTS"}
    env["CHROMIUM"] = "no-such-chromium"
    result = collect_browser_tests(env)
    assert result.returncode == 0, result.stdout + result.stderr
    collected = {line.split("::")[1] for line in result.stdout.splitlines() if "::" in line}
    browser = {
        "test_html_report_in_chromium_shows_tables_curves_and_intervals",
        "test_optuna_dashboard_shows_the_trials_of_a_sweep",
    }
    assert collected and not collected & browser and "(2 deselected)" in result.stdout
    notes = [line for line in result.stdout.splitlines() if "browser tests" in line]
    assert notes == [
        "2 browser tests deselected: no $CHROMIUM=no-such-chromium on PATH; to run them, install Chromium "
        "(Debian/Ubuntu: apt-get install chromium), then make test-browser"
    ]
    required = collect_browser_tests({**env, "REQUIRE_BROWSER_TESTS": "1"})  # make test-browser, CI
    assert required.returncode == 4, required.stdout + required.stderr  # pytest's usage error
    assert "the browser tests need Chromium, found no $CHROMIUM=no-such-chromium on PATH" in required.stderr
