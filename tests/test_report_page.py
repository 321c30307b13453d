"""EXP/report/index.html: the numbers of results.csv, escaped names, and the awkward experiments (failed cells, one
dataset, one seed, runs of an older taskres, an imported run, 1000 classes); then the page in headless Chromium."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote_to_bytes

import numpy as np
import pytest

from taskres.app.cli import main
from taskres.app.report import write_report
from taskres.app.report.drilldown import SHOWN

ROOT = Path(__file__).resolve().parents[1]
EVIL = "<script>window.__injected = 1</script>"


def _run(exp: Path, dataset: str, classes: list[str], method: str, shots: int, seed: int | None, rng, old, bb="bb"):
    """A finished run folder as taskres writes it (old=True: as an older taskres did, without the newer fields)."""
    zero = method == "zero-shot"
    folder = exp / "runs" / dataset / bb.replace("/", "-") / method / ("" if zero else f"{shots}shot-seed{seed}")
    folder.mkdir(parents=True)
    config = {
        "kind": "zeroshot" if zero else "train",
        "backbone": {"spec": bb, "sha256": "ab" * 32},
        "dataset": {"name": dataset, "num_classes": len(classes)},
        "method": method,
        "protocol": "default",
    }
    if not zero:
        config |= {"shots": shots, "seed": seed, "views": 1, "method_config": {"alpha": 0.5}, "optim": {"lr": 2e-3}}
    per_class = [
        {"label": c, "class": name, "n": 10, "accuracy": float(rng.integers(0, 11) * 10)}
        for c, name in enumerate(classes)
    ]
    metrics = {"accuracy": float(np.mean([p["accuracy"] for p in per_class])), "zero_shot_accuracy": 40.0}
    if not zero:
        metrics["residual_mean_abs"] = 0.01 * shots + 0.001 * len(classes)
    if not old:
        config |= {"taskres_version": "0.1.0", "torch_version": "2.x"}
        wrong = [[c, (c + 1) % len(classes), 10 - round(p["accuracy"] / 10)] for c, p in enumerate(per_class)]
        metrics |= {
            "per_class_accuracy": per_class,
            "confusions": sorted([w for w in wrong if w[2]], key=lambda t: -t[2])[:200],
            "confusions_complete": len(classes) <= 15,
            "seconds_train": 1.5,
        }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "metrics.json").write_text(json.dumps(metrics))


def _experiment(exp: Path, datasets: dict[str, list[str]], shots=(1, 4), seeds=(1, 2), old=False, bb="bb") -> Path:
    rng = np.random.default_rng(0)
    for d, classes in datasets.items():
        _run(exp, d, classes, "zero-shot", 0, None, rng, old, bb)
        for k in shots:
            for s in seeds:
                _run(exp, d, classes, "taskres", k, s, rng, old, bb)
    return exp


class _Cells(HTMLParser):
    """The data-* attributes of every table cell that shows a row of results.csv, and every class row."""

    def __init__(self):
        super().__init__()
        self.cells: list[dict] = []
        self.class_rows: list[dict] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "td" and "data-mean" in a:
            self.cells.append(a)
        if tag == "tr" and "data-name" in a:
            self.class_rows.append(a)


def _page(out: Path) -> tuple[str, _Cells]:
    text = (out / "index.html").read_text()
    parsed = _Cells()
    parsed.feed(text)
    return text, parsed


def _csv(out: Path) -> dict[tuple, dict]:
    with open(out / "results.csv") as f:
        return {(r["dataset"], r["method"], r["shots"], r.get("eval_dataset", "")): r for r in csv.DictReader(f)}


def _assert_cells_equal_csv(out: Path, cells: list[dict]) -> None:
    rows = _csv(out)
    seen = {(c["data-dataset"], c["data-method"], c["data-shots"], c["data-eval"]): c for c in cells}
    assert set(seen) == set(rows)
    for key, c in seen.items():
        assert (c["data-mean"], c["data-std"], c["data-n"]) == (
            rows[key]["mean"],
            rows[key]["std"],
            rows[key]["n_seeds"],
        )


def test_page_numbers_are_results_csv_with_one_seed_failures_and_links(tmp_path):
    exp = _experiment(tmp_path / "exp", {"pets": ["a", "b", "c"], "cars": ["x", "y"]}, seeds=(1,))
    failed = {"cell": "cars/bb/taskres/16shot-seed1", "error": "RuntimeError: out of <memory>", "time": "t"}
    done = {"cell": "cars/bb/taskres/1shot-seed1", "error": "RuntimeError: transient", "time": "t"}
    (exp / "failures.jsonl").write_text(json.dumps(failed) + "\n" + json.dumps(done) + "\n{cut sh")
    assert main(["report", str(exp)]) == 0
    text, parsed = _page(exp / "report")
    _assert_cells_equal_csv(exp / "report", parsed.cells)
    assert "one seed" in text and "± 0.00" not in text
    md = (exp / "report" / "results.md").read_text()
    assert "± 0.00" not in md and re.search(r"\| taskres \| [0-9.]+ \| [0-9.]+ \|", md)  # one seed: no ±
    assert "out of &lt;memory&gt;" in text and "transient" not in text  # the cell that finished later is not missing
    assert 'href="../runs/pets/bb/taskres/4shot-seed1/metrics.json"' in text
    assert (exp / "report" / "../runs/pets/bb/taskres/4shot-seed1/metrics.json").resolve().is_file()
    assert not re.search(r"(src|href)=\"(https?:)?//|<link|@import|url\((?!#)", text)  # nothing from outside
    assert text.count("<svg") == 2  # both figures inline


def test_names_with_html_special_characters_are_escaped(tmp_path):
    names = [EVIL, 'tom & "jerry"', "it's <b>bold</b>"]
    exp = _experiment(tmp_path / "exp", {"d&<1>": names}, shots=(2,))
    write_report(exp)
    text, parsed = _page(exp / "report")
    assert "<script>window" not in text and "<b>bold" not in text and "d&<1>" not in text
    assert "&lt;script&gt;window.__injected = 1&lt;/script&gt;" in text and "tom &amp; &quot;jerry&quot;" in text
    assert [r["data-name"] for r in parsed.class_rows if "jerry" in r["data-name"]] == ['tom & "jerry"']
    assert {c["data-dataset"] for c in parsed.cells} == {"d&<1>"}  # the parser unescapes what the page escaped


def test_names_from_folders_that_are_not_utf8(tmp_path):
    """An experiment folder and a dataset named by bytes that are not UTF-8: every file is written, the page is
    valid UTF-8 (U+FFFD for the bytes), the tables keep the bytes and the page's links reach the run folders."""
    exp = tmp_path / os.fsdecode(b"exp\xff")
    _experiment(exp, {"pets": ["a", "b"], os.fsdecode(b"d\xfe"): ["a", "b"]}, shots=(2,), seeds=(1,))
    assert main(["report", str(exp)]) == 0
    out = exp / "report"
    html = (out / "index.html").read_bytes().decode("utf-8")  # strict: the page is valid UTF-8
    assert "<title>exp\ufffd: taskres report</title>" in html
    assert b"d\xfe," in (out / "results.csv").read_bytes() and b"d\xfe" in (out / "results.md").read_bytes()
    links = re.findall(r'href="(\.\./runs/d%FE/[^"]+)"', html)
    assert links and all((out / os.fsdecode(unquote_to_bytes(link))).resolve().is_file() for link in links)
    assert {p.name for p in out.iterdir()} >= {"accuracy_vs_shots.svg", "residual_vs_difficulty.png"}
    # the command's own output, through a strict UTF-8 stdout (a UTF-8 locale): the name's bytes, no traceback
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-m", "taskres", "report", str(exp)], capture_output=True, env=env)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert os.fsencode(out / "index.html") in done.stdout


def test_runs_of_an_older_taskres_and_an_imported_run(tmp_path):
    exp = _experiment(tmp_path / "exp", {"dtd": ["a", "b"]}, old=True)
    imported = exp / "runs" / "official"
    imported.mkdir(parents=True)
    config = {"kind": "import", "dataset": {"name": "dtd"}, "backbone": {"spec": "RN50"}, "checkpoint": "/c/m.pth"}
    (imported / "config.json").write_text(json.dumps(config))
    (imported / "metrics.json").write_text(json.dumps({"accuracy": 61.25}))
    out = write_report(exp)
    text, parsed = _page(exp / "report")
    _assert_cells_equal_csv(exp / "report", parsed.cells)
    assert "older taskres" in text and "sha256" in text and "61.25" in text and "/c/m.pth" in text
    assert not parsed.class_rows
    assert out["files"][-1] == exp / "report" / "index.html"


def test_runs_without_confusions_still_show_their_classes(tmp_path):
    exp = _experiment(tmp_path / "exp", {"pets": ["a", "b", "c"]}, shots=(1,))
    for path in (exp / "runs").rglob("metrics.json"):
        path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "confusions"}))
    write_report(exp)
    text, parsed = _page(exp / "report")
    assert len(parsed.class_rows) == 3 and text.count("Not recorded by the taskres that wrote this run") == 2


def test_a_1000_class_dataset_shows_its_ends_a_search_box_and_top_confusions(tmp_path):
    classes = [f"class {i:04d}" for i in range(1000)]
    exp = _experiment(tmp_path / "exp", {"imagenet": classes}, shots=(16,), seeds=(1, 2))
    write_report(exp)
    text, parsed = _page(exp / "report")
    assert len(parsed.class_rows) == 1000
    folded = [r for r in parsed.class_rows if "folded" in (r.get("class") or "")]
    assert len(folded) == 1000 - 2 * SHOWN
    assert 'type="search"' in text and "show all 1000 classes" in text
    assert "most frequent confusions" in text and text.count("<table class='confusion'>") == 2
    size = (exp / "report" / "index.html").stat().st_size
    print(f"1000-class page: {size / 1024:.0f} KiB")
    assert size < 1_500_000


def test_one_dataset_has_no_correlation_and_an_average_of_one(tmp_path):
    exp = _experiment(tmp_path / "exp", {"eurosat": ["river", "forest"]})
    write_report(exp)
    text, parsed = _page(exp / "report")
    _assert_cells_equal_csv(exp / "report", parsed.cells)
    assert "average over 1 datasets" in text and "Pearson" not in text


def test_published_numbers_beside_ours_with_the_difference(tmp_path):
    exp = _experiment(tmp_path / "exp", {"caltech101": ["face", "leopard"]}, shots=(1,), bb="RN50")
    write_report(exp, compare_published=True)
    text, parsed = _page(exp / "report")
    [mean] = {float(c["data-mean"]) for c in parsed.cells if c["data-method"] == "taskres"}
    assert f"pub 89.49 ({mean - 89.49:+.2f})" in text and "Homology Consistency" in text
    write_report(exp)
    assert "pub 89.49" not in _page(exp / "report")[0]


def _browser():
    spec = importlib.util.spec_from_file_location("report_screenshot", ROOT / "scripts" / "report_screenshot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if importlib.util.find_spec("playwright") is None or not Path(module.CHROMIUM).is_file():
        if os.environ.get("CI"):
            pytest.fail(
                "the browser test needs playwright (the test extra) and /usr/bin/chromium (.ci/run installs it)"
            )
        pytest.skip("needs playwright and /usr/bin/chromium (apt-get install chromium)")
    return module


def _dom_cells(page) -> list[dict]:
    return page.eval_on_selector_all(
        "td[data-mean]", "tds => tds.map(td => ({...td.dataset, text: td.firstChild.textContent.trim()}))"
    )


@pytest.mark.slow
def test_the_demo_page_in_headless_chromium(tmp_path):
    """The demo's page renders without console errors or network requests, shows results.csv's numbers, sorts by a
    column and filters classes; TASKRES_REPORT_SCREENSHOT=path keeps its screenshot (docs/report.png)."""
    from taskres.app.demo import DemoConfig, run_demo

    browser = _browser()
    out = tmp_path / "demo"
    run_demo(
        out,
        DemoConfig(seeds=(1, 2), shots=(2,), views=1, tasks=("new_shapes", "noisy_shapes")),
        quiet=True,
        echo=lambda *_: None,
    )
    assert (out / "report" / "index.html").is_file()
    assert main(["report", str(out)]) == 0
    rows = _csv(out / "report")

    def act(page):
        cells = _dom_cells(page)
        th = page.locator("#classes-0 thead th").nth(5)  # the Δ column
        th.click()
        th.click()
        deltas = page.eval_on_selector_all(
            "#classes-0 tbody tr", "rs => rs.map(r => parseFloat(r.cells[5].dataset.sort))"
        )
        name = page.eval_on_selector("#classes-0 tbody tr", "r => r.dataset.name")
        page.fill("[data-table=classes-0] input[type=search]", name)
        visible = page.eval_on_selector_all("#classes-0 tbody tr", "rs => rs.filter(r => !r.hidden).length")
        page.fill("[data-table=classes-0] input[type=search]", "")
        return cells, deltas, visible

    shot = tmp_path / "report.png"
    seen = browser.browse(out / "report" / "index.html", shot, act=act)
    assert seen["errors"] == [] and seen["requests"] == []
    cells, deltas, visible = seen["result"]
    for c in cells:
        row = rows[(c["dataset"], c["method"], c["shots"], c["eval"])]
        assert (c["mean"], c["std"]) == (row["mean"], row["std"])
        assert c["text"] == f"{float(row['mean']):.2f}"
    assert {(c["dataset"], c["method"], c["shots"]) for c in cells} == {k[:3] for k in rows}
    assert deltas == sorted(deltas) and len(deltas) >= 3 and visible == 1
    assert shot.stat().st_size > 10_000
    if os.environ.get("TASKRES_REPORT_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["TASKRES_REPORT_SCREENSHOT"])


@pytest.mark.slow
def test_a_large_page_with_hostile_class_names_in_headless_chromium(tmp_path):
    """No injected script runs; the search box finds one class among 1000."""
    browser = _browser()
    exp = _experiment(tmp_path / "exp", {"big": [EVIL] + [f"class {i:04d}" for i in range(1, 1000)]}, shots=(16,))
    write_report(exp)

    def act(page):
        box = "[data-table=classes-0] input[type=search]"
        shown = page.eval_on_selector_all("#classes-0 tbody tr", "rs => rs.filter(r => r.offsetParent).length")
        page.fill(box, "class 0999")
        found = page.eval_on_selector_all("#classes-0 tbody tr", "rs => rs.filter(r => r.offsetParent).length")
        page.fill(box, "<script>")
        evil = page.eval_on_selector_all("#classes-0 tbody tr", "rs => rs.filter(r => r.offsetParent).length")
        return shown, found, evil, page.evaluate("window.__injected === undefined")

    seen = browser.browse(exp / "report" / "index.html", tmp_path / "big.png", act=act)
    assert seen["errors"] == [] and seen["requests"] == []
    assert seen["result"] == (2 * SHOWN, 1, 1, True)


@pytest.mark.parametrize(
    "field,value",
    [
        ("per_class_accuracy", {}),
        ("per_class_accuracy", ["a", "b", "c"]),
        ("per_class_accuracy", [{"label": 0, "class": "a", "n": "x", "accuracy": 1.0}]),
        ("confusions", [[99, 0, 3]]),
        ("confusions", [[-1, 0, 3]]),
        ("confusions", "abc"),
    ],
)
def test_per_class_data_of_the_wrong_shape_is_shown_as_not_recorded(tmp_path, field, value):
    """A metrics.json edited into valid JSON of the wrong shape: the page is still written, that part left out."""
    exp = _experiment(tmp_path / "exp", {"pets": ["a", "b", "c"]}, shots=(1,))
    for path in (exp / "runs").rglob("metrics.json"):
        path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
    write_report(exp)
    text, parsed = _page(exp / "report")
    if field == "per_class_accuracy":
        assert not parsed.class_rows and "Per-class accuracy is missing" in text
    else:
        assert len(parsed.class_rows) == 3 and "Not recorded by the taskres that wrote this run" in text
