"""Reports on real run directories made here by the trainer on tiny models, and on synthetic ones for edge cases:
plots are PNGs, the page is self-contained and has one coloured span per saved token, truncated files, entropy
collapse, several runs on one page, a lab tree."""

from __future__ import annotations

import base64
import json
import os
import shutil
from html.parser import HTMLParser

import pytest
import tiny
import torch

from dopd.cli import main
from dopd.report import build_report, find_collapse
from dopd.report_html import NEUTRAL_COLOUR, REGIME_COLOURS, token_view_html
from dopd.run_dir import find_runs, load_run, read_jsonl
from dopd.train import train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TRAINER_PLOTS = {
    "loss",
    "loss_regimes",
    "regime_fractions",
    "gap",
    "gap_histogram",
    "entropy",
    "completion_length",
    "time",
    "optimizer",
}


@pytest.fixture(scope="module")
def runs(pair, tmp_path_factory):
    """A dopd run (3 steps) and an opd run (2 steps, no regimes), samples saved at every step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    directory = tmp_path_factory.mktemp("report")
    data = tiny.write_prompts(str(directory / "prompts.jsonl"), count=16)
    paths = {}
    for method, steps in (("dopd", 3), ("opd", 2)):
        out = str(directory / method)
        train(
            tiny.make_config(
                {**pair, "data": data},
                out,
                f"train.steps={steps}",
                "train.prompts_per_step=3",
                "logging.num_samples=3",
                f"objective.method={method}",
            )
        )
        paths[method] = out
    torch.set_num_threads(threads)
    return paths


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
    return build_report([runs["dopd"], runs["opd"]], str(tmp_path_factory.mktemp("out")), token_steps=100)


class Page(HTMLParser):
    """The token spans (with the run section and step they sit in), completion texts, images, warnings, tags."""

    def __init__(self, text: str):
        super().__init__()
        self.spans, self.completions, self.images, self.warnings, self.tags = [], [], [], [], []
        self.run = self.step = None
        self.in_span = self.in_completion = self.in_warning = False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        classes = (attrs.get("class") or "").split()
        if tag == "section" and "tokens" in classes:
            self.run = attrs["data-run"]
        elif tag == "div" and "step" in classes:
            self.step = int(attrs["data-step"])
        elif tag == "div" and "completion" in classes:
            self.in_completion = True
            self.completions.append({"run": self.run, "step": self.step, "text": ""})
        elif tag == "span" and "tok" in classes:
            assert self.in_completion and not self.in_span
            self.in_span = True
            self.spans.append({"run": self.run, "step": self.step, "classes": classes, "text": "", **attrs})
        elif tag == "img":
            self.images.append(attrs["src"])
        elif tag == "p" and "warning" in classes:
            self.in_warning = True
            self.warnings.append("")

    def handle_endtag(self, tag):
        if tag == "span":
            self.in_span = False
        elif tag == "div" and self.in_completion:
            self.in_completion = False
        elif tag == "p":
            self.in_warning = False

    def handle_data(self, data):
        if self.in_span:
            self.spans[-1]["text"] += data
        if self.in_completion:
            self.completions[-1]["text"] += data
        if self.in_warning:
            self.warnings[-1] += data


def page_of(report) -> Page:
    with open(report.html_path, encoding="utf-8") as handle:
        return Page(handle.read())


def saved_samples(run_dir, last_steps):
    records = [json.loads(line) for line in open(os.path.join(run_dir, "samples.jsonl"))]
    steps = sorted({r["step"] for r in records})[-last_steps:]
    return [r for step in reversed(steps) for r in records if r["step"] == step]


def test_every_plot_is_a_png(report):
    assert set(report.plots) == TRAINER_PLOTS  # no evaluation in plain trainer runs: no eval plot
    for name, path in report.plots.items():
        with open(path, "rb") as handle:
            data = handle.read()
        assert len(data) > 1000 and data.startswith(PNG_MAGIC), name
        assert os.path.dirname(path) == os.path.dirname(report.html_path)


def test_page_embeds_every_plot_and_nothing_external(report):
    page = page_of(report)
    embedded = [base64.b64decode(src.split(",", 1)[1]) for src in page.images]
    assert all(src.startswith("data:image/png;base64,") for src in page.images)
    assert sorted(embedded) == sorted(open(path, "rb").read() for path in report.plots.values())
    text = open(report.html_path, encoding="utf-8").read()
    assert "http://" not in text and "https://" not in text and "<link" not in text and "<script" not in text


@pytest.mark.parametrize("method", ["dopd", "opd"])
def test_one_coloured_span_per_saved_token(report, runs, method):
    page = page_of(report)
    records = saved_samples(runs[method], 100)
    assert {r["step"] for r in records} == set(range(1, 4 if method == "dopd" else 3))
    spans = [s for s in page.spans if s["run"] == method]
    expected = [(r, i) for r in records for i in range(len(r["tokens"]))]
    assert len(spans) == len(expected) > 0
    for span, (record, i) in zip(spans, expected):
        regime = record["regime"][i] if method == "dopd" else None
        assert span["step"] == record["step"]
        assert span["text"] == record["tokens"][i]
        assert f"regime-{regime or 'none'}" in span["classes"]
        assert span["style"] == f"background:{REGIME_COLOURS[regime] if regime else NEUTRAL_COLOUR}"
        assert f"loss {record['loss'][i]:.4g}" in span["title"] and f"q_T {record['q_teacher'][i]:.4g}" in span["title"]
        if method == "dopd":
            assert f"regime {regime}" in span["title"] and f"gap {record['gap'][i]:.4g}" in span["title"]
            assert f"q_S {record['q_self'][i]:.4g}" in span["title"]
    if method == "dopd":  # the trainer saved all four regimes' colours somewhere in three steps
        assert {s["style"] for s in spans} <= {f"background:{c}" for c in REGIME_COLOURS.values()}
    completions = [c["text"] for c in page.completions if c["run"] == method]
    assert completions == [r["completion"] for r in records]  # spaces between word-level tokens put back


def test_token_view_shows_only_the_latest_steps(runs):
    page = Page(token_view_html(load_run(runs["dopd"], "dopd"), token_steps=1))
    last = saved_samples(runs["dopd"], 1)
    assert {s["step"] for s in page.spans} == {3} and {r["step"] for r in last} == {3}
    assert [s["text"] for s in page.spans] == [t for r in last for t in r["tokens"]]
    capped = Page(token_view_html(load_run(runs["dopd"], "dopd"), token_steps=2, max_samples=1))
    assert len(capped.completions) == 2 and [c["step"] for c in capped.completions] == [3, 2]


def test_text_is_escaped(tmp_path):
    run = tmp_path / "odd"
    run.mkdir()
    tokens = ["<b>", "&amp;", ' "x"', "\n", "</span>", ""]
    record = {
        "step": 1,
        "prompt": "<script>alert(1)</script>",
        "completion": "".join(tokens),
        "tokens": tokens,
        "token_ids": list(range(6)),
        "loss": [0.5] * 6,
        "regime": ["LH", "LL", "HT", "HS", None, "LH"],
        "gap": [0.1] * 6,
        "q_self": [0.2] * 6,
        "q_teacher": [0.3] * 6,
    }
    (run / "samples.jsonl").write_text(json.dumps(record) + "\n")
    page = Page(token_view_html(load_run(str(run)), token_steps=1))
    assert "script" not in page.tags and page.tags.count("b") == 1  # the one <b> is the page's "prompt" label
    assert [s["text"] for s in page.spans] == tokens
    assert [s["classes"][1] for s in page.spans] == [
        "regime-LH",
        "regime-LL",
        "regime-HT",
        "regime-HS",
        "regime-none",
        "regime-LH",
    ]
    assert page.completions[0]["text"] == record["completion"]


def test_truncated_files_are_read_to_their_last_whole_line(runs, tmp_path):
    run = tmp_path / "killed"
    shutil.copytree(runs["dopd"], run, ignore=shutil.ignore_patterns("final", "checkpoints"))
    for name in ("metrics.jsonl", "samples.jsonl"):
        text = (run / name).read_text()
        last = text.rstrip("\n").rsplit("\n", 1)[1]
        (run / name).write_text(text[: len(text) - 1 - len(last) // 2])  # cut inside the last line
    assert [line["step"] for line in read_jsonl(str(run / "metrics.jsonl"))] == [1, 2]
    loaded = load_run(str(run))
    assert len(loaded.samples) == 3 * 3 - 1 and loaded.series("loss")[0] == [1, 2]
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text() + '{"step": 3, "lo')
    assert [line["step"] for line in read_jsonl(str(run / "metrics.jsonl"))] == [1, 2]
    report = build_report([str(run)], str(tmp_path / "out"), token_steps=1)
    assert "loss" in report.plots and len(Page(open(report.html_path).read()).completions) == 2  # step 3 lost 1


def write_metrics(directory, entropies, extra=None):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "metrics.jsonl"), "w") as handle:
        for step, entropy in enumerate(entropies, start=1):
            handle.write(
                json.dumps({"step": step, "loss": 1.0 / step, "entropy/student": entropy, **(extra or {})}) + "\n"
            )
    return str(directory)


def test_collapse_is_flagged_only_below_the_fraction(tmp_path, capsys):
    falling = write_metrics(tmp_path / "falling", [2.0, 1.6, 1.2, 0.9, 0.7])
    steady = write_metrics(tmp_path / "steady", [2.0, 1.5, 1.1, 1.05])
    collapse = find_collapse(load_run(falling), 0.5)
    assert (collapse.step, collapse.value, collapse.threshold) == (4, 0.9, 1.0)
    assert find_collapse(load_run(steady), 0.5) is None
    assert find_collapse(load_run(falling), 0.3) is None and find_collapse(load_run(steady), 0.6).step == 3
    assert main(["report", falling, steady, "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert (
        "warning: falling: student entropy collapsed at step 4" in printed
        and "steady" not in printed.split("warning")[-1]
    )
    assert f"report: {tmp_path / 'out' / 'report.html'}" in printed
    page = Page(open(tmp_path / "out" / "report.html").read())
    assert len(page.warnings) == 1 and page.warnings[0].startswith("warning: falling:")
    assert set(os.listdir(tmp_path / "out")) == {"report.html", "loss.png", "entropy.png"}  # nothing else logged


def test_lab_tree_expands_and_runs_compare_on_one_page(runs, tmp_path):
    lab = tmp_path / "lab"
    skip = shutil.ignore_patterns("final", "checkpoints")
    shutil.copytree(runs["dopd"], lab / "hints" / "dopd" / "seed_0", ignore=skip)
    shutil.copytree(runs["opd"], lab / "hints" / "opd" / "seed_0", ignore=skip)
    shutil.copytree(runs["dopd"], lab / "hints" / "search" / "dopd_lr0.01", ignore=skip)  # searches stay out
    (lab / "hints" / "train.jsonl").write_text("{}\n")
    (lab / "results.json").write_text("{}")
    write_metrics(
        lab / "answer" / "dopd" / "seed_1", [2.0, 1.9], {"eval/answer_accuracy": 0.25, "eval/full_match": 0.125}
    )
    labels = [label for label, _ in find_runs(str(lab))]
    assert labels == ["answer/dopd/seed_1", "hints/dopd/seed_0", "hints/opd/seed_0"]
    report = build_report([str(lab), runs["opd"]], str(tmp_path / "out"), token_steps=1)
    assert [run.label for run in report.runs] == [*labels, "opd"]
    assert "eval" in report.plots and open(report.plots["eval"], "rb").read().startswith(PNG_MAGIC)
    page = Page(open(report.html_path).read())
    assert {s["run"] for s in page.spans} == {"hints/dopd/seed_0", "hints/opd/seed_0", "opd"}
    dopd_spans = [s for s in page.spans if s["run"] == "hints/dopd/seed_0"]
    assert [s["classes"][1] for s in dopd_spans] == [
        f"regime-{r}" for rec in saved_samples(runs["dopd"], 1) for r in rec["regime"]
    ]
    with pytest.raises(FileNotFoundError):
        find_runs(str(tmp_path / "out" / "nothing"))


def test_run_in_progress_with_nothing_logged_yet(runs, tmp_path):
    run = tmp_path / "starting"
    run.mkdir()
    shutil.copy(os.path.join(runs["dopd"], "config.yaml"), run / "config.yaml")
    report = build_report([str(run)], str(tmp_path / "out"))
    assert report.plots == {} and report.runs[0].method == "dopd"
    assert "no saved samples" in open(report.html_path).read()


def test_a_run_that_flagged_a_collapse_is_marked_at_its_step(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [
        {
            "step": s,
            "loss": 1.0,
            "entropy/student": 0.5,
            "completion_length/mean": 30 - 4 * s,
            "collapse/length": float(s >= 5),
            **({"collapse/step": 5.0} if s >= 5 else {}),
        }
        for s in range(1, 8)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    collapse = find_collapse(load_run(str(run)))
    assert collapse is not None and collapse.step == 5 and "length" in collapse.reason
    assert "flagged a collapse (length (run diagnostics)) at step 5" in collapse.message()
    report = build_report([str(run)], str(tmp_path / "report"))
    assert report.plots["completion_length"] and any("step 5" in w for w in report.warnings)
