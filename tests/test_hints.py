"""`dopd hints`: the rule-based forms on hand-written solutions, the box form, and the generated form against a
real OpenAI-compatible HTTP server on loopback (leaks rejected, errors retried, killed runs resumed)."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import tiny

from dopd.chat_client import ChatClient, ServerError
from dopd.cli import main
from dopd.config import ConfigError
from dopd.hints import (
    HintsSpec,
    box_hint,
    contains_answer,
    executed_hints,
    final_answer_in,
    generate_hints,
    hide_computed_values,
    parse_hint_lines,
    parse_verdicts,
    run_hints,
    split_steps,
    states_computed_value,
    stepwise_hints,
    summary_hints,
)

NATALIA_Q = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How "
    "many clips did Natalia sell altogether in April and May?"
)
NATALIA_S = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)
WENG_Q = (
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?"
)
WENG_S = (
    "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n"
    "Working 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10"
)


# ------------------------------------------------------------------------------------------ rule-based forms


def test_stepwise_gsm8k_hides_results_and_the_final_answer():
    assert stepwise_hints(NATALIA_S, NATALIA_Q, "72") == (
        "1. Natalia sold 48/2 = [r1] clips in May.\n2. Natalia sold 48+[r1] = [r2] clips altogether in April and May."
    )
    hints = stepwise_hints(WENG_S, WENG_Q, "10")
    assert hints == "1. Weng earns 12/60 = $[r1] per minute.\n2. Working 50 minutes, she earned [r1] x 50 = $[r2]."
    for leaked in ("0.2", "10", "24", "72", "####", "<<"):
        assert leaked not in hints + stepwise_hints(NATALIA_S, NATALIA_Q)


def test_stepwise_latex_keeps_given_numbers_and_drops_boxed_steps():
    solution = "We have $x + 3 = 7$, so $x = 4$. Then $2x = 8$. Thus the answer is $\\boxed{8}$."
    assert final_answer_in(solution) == "8"
    # 7 is stated by the question: restating it is not executing a step.
    assert (
        stepwise_hints(solution, "If x+3=7, what is 2x?")
        == "1. We have $x + 3 = 7$, so $x = [r1]$.\n2. Then $2x = [r2]$."
    )
    # Without the question, 7 looks computed and is hidden too.
    assert stepwise_hints(solution).startswith("1. We have $x + 3 = [r1]$, so $x = [r2]$.")


def test_the_answer_is_hidden_where_no_equals_sign_shows_it():
    solution = "Each box holds 4 pens and there are 3 boxes.\nSo she has 12 pens in total.\nShe gives away 2 of them."
    assert stepwise_hints(solution, "3 boxes of 4 pens; how many pens?", "12") == (
        "1. Each box holds 4 pens and there are 3 boxes.\n2. So she has [r1] pens in total.\n"
        "3. She gives away 2 of them."
    )
    # A non-numeric answer is replaced where it appears verbatim.
    assert hide_computed_values(["so x equals \\frac{1}{2} here"], "", "\\frac{1}{2}") == ["so x equals [answer] here"]


def test_result_detection_reads_only_the_last_value_of_a_chain():
    assert hide_computed_values(["x = 3 + 4 = 7, and 7 + 1 = 8", "then 8 <= 9 and 3 == 3"], "", None) == [
        "x = 3 + 4 = [r1], and [r1] + 1 = [r2]",
        "then [r2] <= 9 and 3 == 3",
    ]
    # A number seen before it is ever a result stays (it was something else then).
    assert hide_computed_values(["it takes 5 hours", "so 2 + 3 = 5"], "", None) == [
        "it takes 5 hours",
        "so 2 + 3 = [r1]",
    ]
    assert hide_computed_values(["1,200 + 300 = 1,500 dollars", "1500 is the total"], "", None) == [
        "1,200 + 300 = [r1] dollars",
        "[r1] is the total",
    ]
    assert states_computed_value("Divide 48 by 2 = 24", "48 friends") and not states_computed_value(
        "Divide 48 by 2", ""
    )
    assert not states_computed_value("Set x = 7 as given", "x + 3 = 7")


def test_steps_split_on_lines_and_sentences():
    assert split_steps("First add. Then subtract 3.5 from it!\n\nFinally (as before) done.") == [
        "First add.",
        "Then subtract 3.5 from it!",
        "Finally (as before) done.",
    ]


def test_executed_and_summary_forms():
    assert executed_hints(NATALIA_S) == (
        "1. Natalia sold 48/2 = 24 clips in May.\n2. Natalia sold 48+24 = 72 clips altogether in April and May."
    )
    assert (
        summary_hints(NATALIA_S, NATALIA_Q, "72", max_words=4) == "Natalia sold 48/2 = ...; Natalia sold 48+[r1] = ..."
    )
    assert summary_hints(WENG_S, WENG_Q, "10", max_words=20) == (
        "Weng earns 12/60 = $[r1] per minute.; Working 50 minutes, she earned [r1] x 50 = $[r2]."
    )


def test_contains_answer():
    assert contains_answer("so the total is 72.0 clips", "72")
    assert contains_answer("about 1,200 people", "$1200$")
    assert contains_answer("the result is \\boxed{72}", "72")
    assert not contains_answer("add 7 and 2", "72")
    assert not contains_answer("multiply by 2", "8")
    assert contains_answer("It must be Paris.", "paris") and not contains_answer("Parisian food", "Paris")
    assert contains_answer("x = \\frac{1}{2}", "\\frac{1}{2}")


# ------------------------------------------------------------------------------------------------ box form


def test_boxes_in_each_coordinate_system():
    assert json.loads(box_hint([10, 20, 110, 220], "red car")) == [{"bbox_2d": [10, 20, 110, 220], "label": "red car"}]
    assert json.loads(box_hint([10, 20, 110, 220], "red car", (200, 400), "norm1000")) == [
        {"bbox_2d": [50, 50, 550, 550], "label": "red car"}
    ]
    assert json.loads(box_hint([[0, 0, 200, 400], [20, 40, 30, 50]], ["a", "b"], (200, 400), "norm1")) == [
        {"bbox_2d": [0.0, 0.0, 1.0, 1.0], "label": "a"},
        {"bbox_2d": [0.1, 0.1, 0.15, 0.125], "label": "b"},
    ]
    assert json.loads(box_hint([{"bbox": [1.4, 2.6, 3, 4], "label": "cat"}])) == [
        {"bbox_2d": [1, 3, 3, 4], "label": "cat"}
    ]


@pytest.mark.parametrize(
    "boxes, labels, size, coords, message",
    [
        ([10, 20, 300, 220], "car", (200, 400), "pixel", "outside the 200x400 image"),
        ([10, 20, 5, 220], "car", None, "pixel", "0 <= x1 < x2"),
        ([[1, 2, 3, 4], [1, 2, 3, 4]], ["car"], None, "pixel", "2 boxes but 1 labels"),
        ([1, 2, 3], "car", None, "pixel", "not four numbers"),
        ([1, 2, 3, 4], "", None, "pixel", "empty label"),
        ([1, 2, 3, 4], "car", None, "norm1000", "need the image size"),
        ([1, 2, 3, 4], "car", None, "norm", "unknown"),
    ],
)
def test_bad_boxes_are_refused(boxes, labels, size, coords, message):
    with pytest.raises(ValueError, match=message):
        box_hint(boxes, labels, size, coords)


def test_box_form_takes_the_size_from_the_image_column(tmp_path):
    import datasets
    from PIL import Image

    rows = {
        "image": [Image.new("RGB", (200, 100)), Image.new("RGB", (50, 50))],
        "boxes": [[20, 10, 100, 50], [0, 0, 50, 50]],
        "labels": ["dog", "ball"],
    }
    source = tmp_path / "vlm"
    datasets.Dataset.from_dict(rows).save_to_disk(str(source))
    out = tmp_path / "vlm-boxes.parquet"
    run_hints(HintsSpec(input=str(source), out=str(out), form="boxes", coords="norm1000", prefix="", progress=False))
    written = datasets.load_dataset("parquet", data_files=str(out), split="train")
    assert [json.loads(text) for text in written["privileged_context"]] == [
        [{"bbox_2d": [100, 100, 500, 500], "label": "dog"}],
        [{"bbox_2d": [0, 0, 1000, 1000], "label": "ball"}],
    ]
    with pytest.raises(ConfigError, match="JSON lines cannot hold"):
        run_hints(HintsSpec(input=str(source), out=str(tmp_path / "x.jsonl"), form="boxes", progress=False))
    # A box outside its image stops the run at that row, before anything is written.
    bad = tmp_path / "bad.jsonl"
    write_jsonl(
        bad,
        [
            {"boxes": [0, 0, 10, 10], "labels": "a", "width": 20, "height": 20},
            {"boxes": [0, 0, 30, 10], "labels": "b", "width": 20, "height": 20},
        ],
    )
    with pytest.raises(ConfigError, match="row 1: box .* outside the 20x20 image"):
        run_hints(HintsSpec(input=str(bad), out=str(tmp_path / "bad-out.jsonl"), form="boxes", progress=False))
    assert not (tmp_path / "bad-out.jsonl").exists()


# ------------------------------------------------------------------------------------------ data set pipeline


def write_jsonl(path, rows):
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return str(path)


def read_jsonl(path):
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def test_rule_forms_through_the_command(tmp_path, capsys):
    source = write_jsonl(
        tmp_path / "gsm.jsonl",
        [
            {"prompt": NATALIA_Q, "solution": NATALIA_S, "answer": "72", "id": 0},
            {"prompt": WENG_Q, "solution": WENG_S, "answer": "10", "id": 1},
            {"prompt": "Nothing to do?", "solution": "#### 3", "answer": "3", "id": 2},
        ],
    )
    out = tmp_path / "gsm-stepwise.jsonl"
    assert main(["hints", "--input", source, "--form", "stepwise", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert (
        "3 read, 0 already done by an earlier run, 2 written, 1 dropped for an empty privileged context (rows 2)"
        in printed
    )
    rows = read_jsonl(out)
    assert [row["id"] for row in rows] == [0, 1]
    assert rows[0]["privileged_context"].startswith("Hints (the plan of a solution")
    assert rows[0]["privileged_context"].endswith("2. Natalia sold 48+[r1] = [r2] clips altogether in April and May.")
    assert rows[0]["solution"] == NATALIA_S  # the other columns are kept as they were
    assert main(hints_argv(source, str(tmp_path / "a.jsonl"), "answer", "--prefix", "", "--on-empty", "keep")) == 0
    assert [row["privileged_context"] for row in read_jsonl(tmp_path / "a.jsonl")] == ["72", "10", "3"]
    assert main(hints_argv(source, str(tmp_path / "s"), "solution", "--prefix", "")) == 0
    import datasets

    assert datasets.load_from_disk(str(tmp_path / "s"))["privileged_context"][0] == NATALIA_S.replace(
        "<<48/2=24>>", ""
    ).replace("<<48+24=72>>", "")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--form", "stepwise", "--solution-column", "worked"], "--solution-column = 'worked' is not a column"),
        (["--form", "nope"], "--form 'nope' is unknown"),
        (["--form", "generated", "--model", "m"], "--form generated needs the server: --base-url"),
        (["--form", "boxes"], "--boxes-column = 'boxes' is not a column"),
        (["--form", "answer", "--out", "x.csv"], "has extension '.csv'"),
        (["--form", "answer", "--input", "missing.jsonl"], "--input missing.jsonl does not exist"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "q", "solution": "s = 1", "answer": "1"}])
    argv = ["hints", "--input", source, "--out", str(tmp_path / "out.jsonl"), "--no-progress"] + args
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("dopd: error: ") and message in error and len(error.splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


def test_empty_values_and_existing_outputs_are_refused(tmp_path):
    source = write_jsonl(
        tmp_path / "in.jsonl",
        [{"prompt": "q", "solution": "x = 1", "answer": "1"}, {"prompt": "q", "solution": " ", "answer": "2"}],
    )
    with pytest.raises(ConfigError, match="1 of 2 rows have an empty 'solution' .* row 1"):
        run_hints(HintsSpec(input=source, out=str(tmp_path / "o.jsonl"), form="stepwise", progress=False))
    (tmp_path / "o.jsonl").write_text("keep me")
    with pytest.raises(ConfigError, match="already exists"):
        run_hints(HintsSpec(input=source, out=str(tmp_path / "o.jsonl"), form="answer", progress=False))
    assert (tmp_path / "o.jsonl").read_text() == "keep me"
    run_hints(HintsSpec(input=source, out=str(tmp_path / "o.jsonl"), form="answer", progress=False, overwrite=True))
    assert [row["privileged_context"] for row in read_jsonl(tmp_path / "o.jsonl")] == [
        "Reference answer: 1",
        "Reference answer: 2",
    ]


# --------------------------------------------------------------------- an OpenAI-compatible server on loopback


class ChatServer:
    """A real HTTP server on 127.0.0.1 that speaks the `/v1/chat/completions` and `/v1/models` API.

    As a model it writes the hints of a fixed plan for "What is A + B + C?" questions (one hint leaks the answer,
    one states a partial sum) and checks hints as a strict grader (FAIL for any number the problem does not
    state). It can fail the next N chat requests with 500, answer 503 to every chat request after the first
    `fail_after` (a server that is gone), and be slow."""

    def __init__(self, delay=0.0):
        self.delay, self.fail_next, self.fail_after = delay, 0, None
        self.chats = []  # (kind, question) of every chat request that got an answer
        self.arrivals = []  # time.monotonic() at which each of those requests arrived, in the same order
        self.hits = 0
        self.lock = threading.Lock()

        def get(path):
            if path == "/v1/models":
                return 200, {"object": "list", "data": [{"id": "tiny-teacher", "object": "model"}]}
            return 404, {"error": {"message": "not found"}}

        def post(path, body):
            if path != "/v1/chat/completions":
                return 404, {"error": {"message": "not found"}}
            return self.answer(body)

        self.httpd, root = tiny.serve_json(get, post)
        self.url = root + "/v1"

    def answer(self, body):
        arrived = time.monotonic()
        with self.lock:
            self.hits += 1
            if self.fail_after is not None and self.hits > self.fail_after:
                return 503, {"error": {"message": "server is gone"}}
            if self.fail_next > 0:
                self.fail_next -= 1
                return 500, {"error": {"message": "internal error"}}
        time.sleep(self.delay)
        if body.get("model") != "tiny-teacher":
            return 404, {"error": {"message": f"model {body.get('model')} not found"}}
        user = body["messages"][-1]["content"]
        question = re.search(r"Problem:\n(.*?)\n", user).group(1)
        if "Hints:\n" in user:
            kind, text = "verify", self.grade(question, user)
        else:
            kind, text = "generate", self.write_hints(question)
        with self.lock:
            self.chats.append((kind, question))
            self.arrivals.append(arrived)
        return 200, {
            "id": "x",
            "object": "chat.completion",
            "model": "tiny-teacher",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        }

    @staticmethod
    def write_hints(question):
        a, b, c = map(int, re.findall(r"\d+", question))
        return (
            f"<think>the sum is {a + b + c}</think>1. Add {a} and {b} first.\n"
            f"2) Then add {c} to that sum.\n3. You should get {a + b + c}.\n- Note that {a} + {b} = {a + b}.\n"
            f"5. Now add {a + b} and {c}."
        )

    @staticmethod
    def grade(question, user):
        given = set(re.findall(r"\d+", question))
        hints = re.findall(r"^(\d+)\. (.*)$", user.split("Hints:\n")[1], flags=re.MULTILINE)
        return "\n".join(
            f"{k}: PASS" if set(re.findall(r"\d+", hint)) <= given else f"{k}: FAIL uses a computed value"
            for k, hint in hints
        )

    def count(self, kind):
        with self.lock:
            return sum(1 for k, _ in self.chats if k == kind)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    chat_server = ChatServer()
    yield chat_server
    chat_server.close()


def sums(n):
    """Rows "What is a + (a+10) + (a+20)?" with a from 1: no partial sum is a number the question states."""
    return [{"prompt": f"What is {i + 1} + {i + 11} + {i + 21}?", "answer": str(3 * i + 33), "id": i} for i in range(n)]


def hints_argv(source, out, form: str, *options: str) -> list[str]:
    """The arguments of `dopd hints` for one input, output and form, without progress bars."""
    return ["hints", "--input", str(source), "--form", form, "--out", str(out), "--no-progress", *options]


def served_spec(source, out, url, **extra):
    settings = dict(
        input=str(source),
        out=str(out),
        form="generated",
        base_url=url,
        model="tiny-teacher",
        concurrency=2,
        retry_wait=0.01,
        progress=False,
        prefix="",
    )
    settings.update(extra)
    return HintsSpec(**settings)


def test_generated_hints_reject_leaks_by_rule_and_by_the_check(tmp_path, server):
    client = ChatClient(server.url, "tiny-teacher", retry_wait=0.01)
    result = generate_hints(client, "What is 1 + 11 + 21?", None, "33")
    assert result.context == "1. Add 1 and 11 first.\n2. Then add 21 to that sum."
    assert result.kept == 2
    assert result.rejected == [
        ("You should get 33.", "contains the answer"),
        ("Note that 1 + 11 = 12.", "states a computed value"),
        ("Now add 12 and 21.", "check request: uses a computed value"),
    ]
    assert client.stats["requests"] == 2 and client.stats["prompt_tokens"] == 20
    without_check = generate_hints(client, "What is 1 + 11 + 21?", None, "33", verify=False)
    assert without_check.kept == 3 and "Now add 12 and 21." in without_check.context


def test_generated_form_end_to_end(tmp_path, server, capsys):
    source = write_jsonl(tmp_path / "sums.jsonl", sums(5))
    out = tmp_path / "sums-hints.jsonl"
    argv = hints_argv(
        source,
        str(out),
        "generated",
        "--base-url",
        server.url + "/",
        "--model",
        "tiny-teacher",
        "--concurrency",
        "3",
        "--retry-wait",
        "0.01",
    )
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert (
        "hints:     10 kept, 15 rejected (5 contains the answer, 5 states a computed value, 5 check request)" in printed
    )
    assert "requests:  11 (0 retries)" in printed  # one listing, then two chats per row
    rows = read_jsonl(out)
    assert [row["id"] for row in rows] == list(range(5))
    assert rows[2]["privileged_context"] == "Hints:\n1. Add 3 and 13 first.\n2. Then add 23 to that sum."
    assert not os.path.exists(str(out) + ".partial")
    assert server.count("generate") == 5 and server.count("verify") == 5


def test_server_errors_are_retried(tmp_path, server):
    server.fail_next = 3
    source = write_jsonl(tmp_path / "sums.jsonl", sums(2))
    summary = run_hints(served_spec(source, tmp_path / "out.jsonl", server.url, concurrency=1))
    assert summary.stats["retries"] == 3 and summary.stats["requests"] == 1 + 3 + 4
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 2
    client = ChatClient(server.url, "tiny-teacher", retries=2, retry_wait=0.01)
    server.fail_next = 3
    with pytest.raises(ServerError, match="failed 3 times; last: 500"):
        client.chat([{"role": "user", "content": "Problem:\nWhat is 1 + 2 + 3?\n"}])
    with pytest.raises(ServerError, match="answered 404"):  # not retried: retrying cannot fix it
        ChatClient(server.url, "other-model", retry_wait=0.01).chat(
            [{"role": "user", "content": "Problem:\nWhat is 1 + 2 + 3?\n"}]
        )


def test_unreachable_server_and_unknown_model_stop_before_any_work(tmp_path, capsys):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    source = write_jsonl(tmp_path / "sums.jsonl", sums(2))
    out = tmp_path / "out.jsonl"
    with pytest.raises(ConfigError, match=f"cannot reach the server at http://127.0.0.1:{closed_port}/v1"):
        run_hints(served_spec(source, out, f"http://127.0.0.1:{closed_port}/v1"))
    argv = hints_argv(
        source, str(out), "generated", "--model", "tiny-teacher", "--base-url", f"http://127.0.0.1:{closed_port}/v1"
    )
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("dopd: error: cannot reach the server") and len(error.splitlines()) == 1
    chat_server = ChatServer()
    try:
        with pytest.raises(ConfigError, match="--model gpt-x is not served at .*; it serves: tiny-teacher"):
            run_hints(served_spec(source, out, chat_server.url, model="gpt-x"))
    finally:
        chat_server.close()
    assert sorted(os.listdir(tmp_path)) == ["sums.jsonl"]


def test_a_run_that_dies_resumes_without_repeating_finished_rows(tmp_path, server):
    source = write_jsonl(tmp_path / "sums.jsonl", sums(6))
    out = tmp_path / "out.jsonl"
    server.fail_after = 2 * 3  # three rows' two chats each, then the server is gone
    with pytest.raises(
        ConfigError, match=r"row 3: .* 503 .*3 of 6 rows are done and saved in .*out.jsonl.partial; run the same"
    ):
        run_hints(served_spec(source, out, server.url, concurrency=1, retries=1))
    assert not out.exists()
    partial = read_jsonl(str(out) + ".partial")
    assert [record["index"] for record in partial[1:]] == [0, 1, 2]
    server.fail_after = None
    summary = run_hints(served_spec(source, out, server.url, concurrency=1))
    assert summary.rows_resumed == 3
    asked = [question for kind, question in server.chats if kind == "generate"]
    assert sorted(asked) == sorted(row["prompt"] for row in sums(6))  # each row asked for exactly once
    assert [row["id"] for row in read_jsonl(out)] == list(range(6))
    # Other settings cannot continue another run's partial file.
    server.hits, server.fail_after = 0, 2
    with pytest.raises(ConfigError, match="1 of 6 rows are done"):
        run_hints(served_spec(source, tmp_path / "o2.jsonl", server.url, concurrency=1, retries=0))
    server.fail_after = None
    with pytest.raises(ConfigError, match="other settings .*max_hints: 8 then, 3 now"):
        run_hints(served_spec(source, tmp_path / "o2.jsonl", server.url, concurrency=1, max_hints=3))
    damaged = str(tmp_path / "o2.jsonl") + ".partial"
    header_line = open(damaged).read().splitlines()[0]
    with open(damaged, "w") as handle:
        handle.write(header_line + "\n{not json\n")
    with pytest.raises(ConfigError, match="o2.jsonl.partial is damaged .*delete it to start over"):
        run_hints(served_spec(source, tmp_path / "o2.jsonl", server.url, concurrency=1))


def test_a_killed_process_resumes_without_repeating_finished_rows(tmp_path):
    slow = ChatServer(delay=0.15)
    try:
        source = write_jsonl(tmp_path / "sums.jsonl", sums(8))
        out = tmp_path / "out.jsonl"
        partial = str(out) + ".partial"
        argv = [
            sys.executable,
            "-m",
            "dopd",
            *hints_argv(
                source, str(out), "generated", "--base-url", slow.url, "--model", "tiny-teacher", "--concurrency", "1"
            ),
        ]
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline and (not os.path.exists(partial) or len(read_jsonl(partial)) < 1 + 3):
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        with open(partial, "a") as handle:
            handle.write('{"index": 7, "cont')  # a torn last line, as a kill in mid-write leaves
        finished = {record["index"] for record in read_jsonl_lenient(partial)[1:]}
        assert len(finished) >= 3 and not out.exists()
        slow.delay = 0.0
        resumed = time.monotonic()  # a request of the killed process may still be answered (and logged) after this
        summary = run_hints(served_spec(source, out, slow.url, concurrency=2, prefix=None))
        assert summary.rows_resumed == len(finished)
        asked_after = [
            question
            for (kind, question), arrived in zip(slow.chats, slow.arrivals)
            if kind == "generate" and arrived >= resumed
        ]
        questions = [row["prompt"] for row in sums(8)]
        assert not {questions[i] for i in finished} & set(asked_after)
        assert sorted(asked_after) == sorted(questions[i] for i in range(8) if i not in finished)
        assert [row["id"] for row in read_jsonl(out)] == list(range(8))
    finally:
        slow.close()


def read_jsonl_lenient(path):
    with open(path) as handle:
        lines = handle.read().split("\n")
    return [json.loads(line) for line in lines if line.strip().endswith("}") and line.strip()]


def test_reply_parsing():
    assert parse_hint_lines("1. First\n\n2) Second\n- third\n* fourth\n• fifth\nplain") == [
        "First",
        "Second",
        "third",
        "fourth",
        "fifth",
        "plain",
    ]
    assert parse_verdicts("1: PASS\nHint 2 - fail gives 12 away\n3. pass\n1: FAIL later line ignored", 4) == [
        (True, ""),
        (False, "gives 12 away"),
        (True, ""),
        (False, "no verdict in the check reply"),
    ]


def test_environment_supplies_the_server(tmp_path, server, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", server.url)
    monkeypatch.setenv("OPENAI_MODEL", "tiny-teacher")
    source = write_jsonl(tmp_path / "sums.jsonl", sums(1))
    summary = run_hints(HintsSpec(input=source, out=str(tmp_path / "o.jsonl"), form="generated", progress=False))
    assert summary.hints_kept == 2
