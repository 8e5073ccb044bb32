"""The HTML page of `dopd report`: a summary table of the runs, the plots inlined, and the token view (each sampled
completion token coloured by the regime it was routed to, with its gap, q_S, q_T and loss on hover).
"""

from __future__ import annotations

import base64
import html

from .diagnostics import Collapse
from .routing import REGIMES
from .run_dir import Run

REGIME_COLOURS = {"LH": "#7fc97f", "LL": "#fdd870", "HT": "#f08080", "HS": "#86b6f6"}
NEUTRAL_COLOUR = "#dddddd"
REGIME_MEANING = {
    "LH": "small gap, high q_S+q_T: teacher target, reverse KL Top-K, weight β_l",
    "LL": "small gap, low q_S+q_T: privileged-student target, reverse KL Top-K, weight β_w",
    "HT": "large gap, q_T ≥ q_S: teacher target, JS full vocabulary, weight 1",
    "HS": "large gap, q_T < q_S: privileged-student target, reverse KL Top-K, weight β_l",
}

# ------------------------------------------------------------------------------------------------- token view


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "–"


def _pieces(completion: str, tokens: list[str]) -> list[tuple[str, int | None]]:
    """The completion as (text, token index or None for text between tokens). Decoded tokens need not join to
    the completion (word-level tokenizers drop the spaces between words): then the spaces the completion has
    between them are put back, and when even that fails the tokens are shown one after another."""
    if "".join(tokens) == completion:
        return [(token, i) for i, token in enumerate(tokens)]
    pieces, position = [], 0
    for index, token in enumerate(tokens):
        found = completion.find(token, position) if token else position
        if found < 0 or completion[position:found].strip():
            return [(token, i) for i, token in enumerate(tokens)]
        if found > position:
            pieces.append((completion[position:found], None))
        pieces.append((token, index))
        position = found + len(token)
    if position < len(completion):
        pieces.append((completion[position:], None))
    return pieces


def _token_title(record: dict, index: int) -> str:
    regime = (record.get("regime") or [None] * (index + 1))[index]
    parts = [f"regime {regime or 'none'}"]
    for key, name in (("gap", "gap"), ("q_self", "q_S"), ("q_teacher", "q_T"), ("loss", "loss")):
        values = record.get(key)
        if values is not None and index < len(values):
            parts.append(f"{name} {_number(values[index])}")
    token_ids = record.get("token_ids") or []
    if index < len(token_ids):
        parts.append(f"id {token_ids[index]}")
    return " | ".join(parts)


def _sample_html(record: dict) -> str:
    tokens = [str(t) for t in record.get("tokens") or []]
    regimes = record.get("regime") or [None] * len(tokens)
    spans = []
    for text, index in _pieces(str(record.get("completion", "")), tokens):
        if index is None:
            spans.append(html.escape(text))
            continue
        regime = regimes[index] if index < len(regimes) and regimes[index] in REGIMES else None
        colour = REGIME_COLOURS.get(regime, NEUTRAL_COLOUR)
        spans.append(
            f'<span class="tok regime-{regime or "none"}" style="background:{colour}" '
            f'title="{html.escape(_token_title(record, index), quote=True)}">{html.escape(text)}</span>'
        )
    counts = {r: sum(1 for x in regimes if x == r) for r in REGIMES}
    count_text = " ".join(f"{r} {n}" for r, n in counts.items() if n) or "no regimes"
    meta = "".join(
        f"<div><b>{name}</b> {html.escape(str(record.get(key)))}</div>"
        for name, key in (
            ("prompt", "prompt"),
            ("privileged", "privileged_context"),
            ("answer", "answer"),
            ("teacher", "teacher"),  # model.teachers: the row's teacher
            ("reward", "reward"),  # objective.reward: the completion's reward and its advantage
            ("advantage", "advantage"),
        )
        if record.get(key) is not None
    )
    return (
        f'<div class="sample">{meta}<div class="counts">{len(tokens)} tokens: {count_text}</div>'
        f'<div class="completion">{"".join(spans)}</div></div>'
    )


def token_view_html(run: Run, token_steps: int = 2, max_samples: int | None = None) -> str:
    """The saved samples of the latest `token_steps` sampled steps, newest first."""
    steps = run.sample_steps()[-token_steps:] if token_steps > 0 else []
    parts = [
        f'<section class="tokens" data-run="{html.escape(run.label, quote=True)}">',
        f"<h3>{html.escape(run.label)}</h3>",
    ]
    if not steps:
        parts.append("<p>no saved samples (yet).</p>")
    for step in reversed(steps):
        records = [r for r in run.samples if r.get("step") == step][:max_samples]
        parts.append(f'<h4>step {step}</h4><div class="step" data-step="{step}">')
        parts.extend(_sample_html(record) for record in records)
        parts.append("</div>")
    parts.append("</section>")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------- page

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; max-width: 1300px; }
table { border-collapse: collapse; font-size: 0.9em; }
td, th { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: left; }
.warning { color: #a00000; font-weight: bold; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.sample { border: 1px solid #ddd; border-radius: 4px; padding: 0.5em; margin: 0.5em 0; font-size: 0.9em; }
.counts { color: #666; font-size: 0.85em; }
.completion { font-family: ui-monospace, monospace; white-space: pre-wrap; margin-top: 0.3em; line-height: 1.7; }
.tok { border-radius: 3px; padding: 0 1px; margin: 0 1px; }
.tok:empty::after { content: "∅"; color: #888; }
.legend span { display: inline-block; padding: 0.1em 0.5em; margin: 0.1em 0.3em; border-radius: 3px; }
"""


def _fmt(value) -> str:
    return _number(value) if value is not None else "–"


def _summary_row(run: Run, collapse: Collapse | None) -> str:
    steps = [int(line["step"]) for line in run.metrics if "step" in line]
    last = max(steps) if steps else None
    _, loss = run.series("loss")
    _, accuracy = run.series("eval/answer_accuracy")
    _, entropy = run.series("entropy/student")
    cells = [
        run.label,
        run.method or "?",
        f"{last if last is not None else '–'} / {run.planned_steps or '?'}",
        _fmt(loss[-1] if loss else None),
        _fmt(accuracy[-1] if accuracy else None),
        f"{_fmt(entropy[0])} → {_fmt(entropy[-1])}" if entropy else "–",
        f"step {collapse.step}" if collapse else "no",
        str(len(run.sample_steps())),
        run.path,
    ]
    return "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>"


def render_html(runs, plots, collapses, token_steps=2, max_samples=None, fraction=0.5) -> str:
    header = [
        "run",
        "method",
        "step / planned",
        "last loss",
        "last accuracy",
        "student entropy",
        "collapse",
        "sampled steps",
        "directory",
    ]
    warnings = [collapses[run.label].message() for run in runs if run.label in collapses]
    images = []
    for name, path in plots.items():
        with open(path, "rb") as handle:
            data = base64.b64encode(handle.read()).decode("ascii")
        images.append(f'<h3>{html.escape(name)}</h3><img alt="{html.escape(name)}" src="data:image/png;base64,{data}">')
    legend = (
        "".join(
            f'<span style="background:{REGIME_COLOURS[r]}" title="{html.escape(REGIME_MEANING[r])}">{r}: '
            f"{html.escape(REGIME_MEANING[r])}</span>"
            for r in REGIMES
        )
        + f'<span style="background:{NEUTRAL_COLOUR}">no regime (method without routing, or token dropped)</span>'
    )
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8"><title>dopd report</title>',
            f"<style>{STYLE}</style></head><body>",
            "<h1>dopd report</h1>",
            *(f'<p class="warning">{html.escape(w)}</p>' for w in warnings),
            "<h2>runs</h2><table><tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr>",
            *(_summary_row(run, collapses.get(run.label)) for run in runs),
            "</table>",
            f"<p>collapse: student entropy below {fraction:g} × its value at the first logged step.</p>",
            "<h2>plots</h2>",
            *(images or ["<p>no metrics yet.</p>"]),
            "<h2>tokens</h2>",
            f"<p>the saved completions of the latest {token_steps} sampled steps; hover a token for its regime, gap "
            "|log q_T − log q_S|, q_S, q_T and loss.</p>",
            f'<div class="legend">{legend}</div>',
            *(token_view_html(run, token_steps, max_samples) for run in runs),
            "</body></html>",
        ]
    )
