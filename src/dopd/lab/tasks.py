"""Tasks of the privilege-illusion lab; over 450 lines: every task, its share and mixture forms and `get_task` in one.

Each task samples an `Example`: a prompt, the reference completion (worked steps ending in `A:<answer>`), and three
forms of privileged input (docs/method.md, "Privileged input"): the final answer, step-wise hints without execution (the
plan: which operations in which order, never a computed value), and the full worked solution. Three families of
different structure:

- `arith`: nested +/- expressions such as `Q:50-(12+(9+4))=`. The plan (which subexpression first) depends on
  the parenthesis structure, so hints (the operations in evaluation order, previous results written `_`) remove
  the parsing and leave only the column arithmetic; the solution removes both.
- `add`: column addition with carries (`Q:4729+385=` -> `9+5=14;2+8+1=11;...;A:5114`), a local, positional skill;
  the hints are each column's two digits, and a digit written `?` is the undetermined part. `add-swapped` poses
  the same problems in another convention (the lower digit first), for a teacher-student mismatch pair.
- `lookup`: multi-hop variable lookup (`Q:c=b,a=7,d=c,b=a,e=3,f=e;d?` -> `d=c;c=b;b=a;a=7;A:7`), with a
  distractor chain. Its hints can only give the shape of the plan (the number of hops), not the variables met.
  `chain` is its harder form (three distractor chains) whose hints give the route without the final digit.

`ShareTask` sets a task's share of undetermined problems; `MixtureTask` draws from several tasks (`order+arith`).

The privileged context is inserted after the prompt with `LAB_PRIVILEGED_TEMPLATE`, for the teacher, the
privileged student and the lab's pretraining alike.
"""

from __future__ import annotations

import abc
import hashlib
import importlib
import random
import re
from dataclasses import dataclass, field, replace

PRIVILEGED_KINDS = ("none", "answer", "hints", "solution")
# The privileged block sits on its own line right after the question, tagged so the model knows it is not
# part of the problem. Contains both placeholders, as `dopd.prompts.check_template` requires.
LAB_PRIVILEGED_TEMPLATE = "{prompt}\nH:{privileged_context}"

# Held-out prompts. A task's prompt space is small (a two-operation problem recurs every few hundred draws), so
# drawing evaluation sets with another seed does not hold them out: the lab holds problems out by prompt. A stable
# hash of the prompt text gives every prompt one split for good, the same in every process, so pretraining, the
# methods' training rows, validation and test never share a prompt. The hash does not look at a problem's
# difficulty, so each split keeps the task's distribution.
SPLITS = ("train", "validation", "test")
SPLIT_RULE = "sha256(prompt) mod 10000: test < 1000 <= validation < 1500 <= train"  # part of the pairs' cache key


def prompt_split(prompt: str) -> str:
    """The split ("train", "validation" or "test") that `prompt` belongs to, by `SPLIT_RULE`: 10% of the prompts
    are test prompts, 5% validation prompts, the rest training prompts."""
    bucket = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big") % 10_000
    return "test" if bucket < 1000 else "validation" if bucket < 1500 else "train"


@dataclass
class Example:
    prompt: str
    answer: str
    completion: str  # worked steps ending in "A:<answer>", without eos
    privileged: dict[str, str] = field(default_factory=dict)  # keys "answer", "hints", "solution"
    # Whether the prompt alone determines the answer (None: the task does not say). Where it does not, only the
    # privileged input carries what is missing: the part of the problems where the privilege illusion lives.
    determined: bool | None = None
    source: str | None = None  # in a mixture task, the task the example was drawn from (its rows' `task` column)


@dataclass(frozen=True)
class CheckResult:
    answer_correct: bool  # the final answer matches
    full_match: bool  # the whole completion matches the reference steps


_ANSWER = re.compile(r"A:([^;\s|]*)")


def extract_answer(completion_text: str) -> str | None:
    """The text after the first `A:` up to a separator, or None when the completion gives no answer."""
    match = _ANSWER.search(completion_text)
    return match.group(1) if match else None


class Task(abc.ABC):
    """A family of problems. Subclasses set `name` and implement `sample`; `sample` may set each example's
    `determined` flag (whether its prompt alone determines the answer), which the lab reports accuracy by."""

    name: str = "task"
    # What a finished completion ends with when it gives an answer (the collapse diagnostics count completions
    # that stop before it).
    answer_pattern: str = r"A:[^;\s|]+$"
    # A task with the same problems whose worked solutions follow another, equally valid convention, by name: the
    # student task of a teacher-student mismatch pair (`LabPairConfig.student_task`, `dopd lab --study mismatch`).
    other_convention: str | None = None

    @abc.abstractmethod
    def sample(self, rng: random.Random) -> Example:
        """One example drawn with `rng` (all randomness must come from `rng`)."""

    def check(self, example: Example, completion_text: str) -> CheckResult:
        text = completion_text.strip()
        return CheckResult(answer_correct=extract_answer(text) == example.answer, full_match=text == example.completion)

    def plan_positions(self, tokens: list[str]) -> list[bool] | None:
        """Which completion tokens carry the plan (the choices a worked solution makes), for the lab's attribution
        (`lab/attribution.py`); None when the task does not say."""
        return None

    def examples(self, n: int, seed: int, split: str | None = None) -> list[Example]:
        """`n` examples drawn with `random.Random(seed)`; with `split`, only those whose prompt lies in that split
        (`prompt_split`), drawn until there are `n`."""
        rng = random.Random(seed)
        if split is None:
            return [self.sample(rng) for _ in range(n)]
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is unknown; choose one of {', '.join(SPLITS)}")
        found: list[Example] = []
        for _ in range(100 * n + 10_000):
            example = self.sample(rng)
            if prompt_split(example.prompt) == split:
                found.append(example)
                if len(found) == n:
                    return found
        raise ValueError(
            f"task {self.name!r}: only {len(found)} of {n} examples drawn fall in the {split!r} split; its prompt "
            "space is too small to hold prompts out (give it more distinct prompts)"
        )

    def rows(self, n: int, seed: int, kind: str = "none", split: str | None = None) -> list[dict[str, str]]:
        """Dataset rows {"prompt", "privileged_context" ("" for kind "none"), "answer", "completion"} (and "task", the
        source task, in a mixture), drawn as `examples` draws them."""
        check_kind(kind)
        return [
            {
                "prompt": ex.prompt,
                "privileged_context": privileged_context(ex, kind) or "",
                "answer": ex.answer,
                "completion": ex.completion,
                **({"task": ex.source} if ex.source is not None else {}),
            }
            for ex in self.examples(n, seed, split)
        ]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def check_kind(kind: str) -> None:
    if kind not in PRIVILEGED_KINDS:
        raise ValueError(f"privileged kind {kind!r} is unknown; choose one of {', '.join(PRIVILEGED_KINDS)}")


def privileged_context(example: Example, kind: str) -> str | None:
    """The privileged text for `kind`, or None for kind "none" (render_prompt then gives the plain prompt)."""
    check_kind(kind)
    return None if kind == "none" else example.privileged[kind]


@dataclass(frozen=True)
class ArithLevel:
    """One difficulty level of `ArithmeticTask`: its share, number of operations, operand size, nesting."""

    weight: float
    min_ops: int
    max_ops: int
    max_operand: int
    p_left: float
    # Leave out the parentheses of `literal-(X)`: the prompt then reads `literal-X` and no longer determines the
    # order (or the value); only the privileged input (hints, solution) carries it. Draws nothing at random.
    hide_minus_parentheses: bool = False


# The default (and the shipped pair's) distribution: 2-6 operations on digits, half of the new literals on the
# left, so that about half the problems need the parenthesis structure to be parsed (the plan).
DEFAULT_ARITH_LEVELS = (ArithLevel(weight=1.0, min_ops=2, max_ops=6, max_operand=9, p_left=0.5),)
# A mixture tried as an alternative (docs/lab_design.md, run r4): short problems on digits, short problems on
# two-digit numbers (the column arithmetic is the hard part) and long, deeply nested problems on digits (the plan
# is the hard part), so that each form of privileged input pays off on a part of the problems.
MIXED_ARITH_LEVELS = (
    ArithLevel(weight=0.4, min_ops=2, max_ops=4, max_operand=9, p_left=0.5),
    ArithLevel(weight=0.3, min_ops=2, max_ops=3, max_operand=99, p_left=0.5),
    ArithLevel(weight=0.3, min_ops=6, max_ops=9, max_operand=9, p_left=0.7),
)


class ArithmeticTask(Task):
    """Nested +/- expressions evaluated innermost first; every intermediate result stays non-negative.

    The expression is built from its evaluation order: a first operation on two literals, then operations that
    each combine the running result with one new literal, written on the right (`X+7`, no parentheses needed,
    left to right) or, with probability `p_left`, on the left (`7+(X)`, which forces the reader to find the
    innermost parentheses first). A level with `p_left = 0` gives the plain chains of the lab notes.
    """

    name = "arith"

    def __init__(self, levels: tuple[ArithLevel, ...] = DEFAULT_ARITH_LEVELS):
        for level in levels:
            if not 1 <= level.min_ops <= level.max_ops or level.max_operand < 1 or level.weight < 0:
                raise ValueError(f"invalid arithmetic level {level}: need 1 <= min_ops <= max_ops, max_operand >= 1")
        self.levels = tuple(levels)

    @staticmethod
    def _step(rng: random.Random, acc: int, literal_left: bool, max_operand: int) -> tuple[str, int, int]:
        """An operator, a literal and the new running result, keeping the result non-negative."""
        op = rng.choice("+-")
        if op == "-":
            if literal_left and acc <= max_operand:  # literal - acc
                literal = rng.randint(max(acc, 1), max_operand)
                return op, literal, literal - acc
            if not literal_left and acc >= 1:  # acc - literal
                literal = rng.randint(1, min(acc, max_operand))
                return op, literal, acc - literal
        literal = rng.randint(1, max_operand)
        return "+", literal, acc + literal

    def sample(self, rng: random.Random) -> Example:
        # One level draws nothing, so that a one-level task samples the same stream as a plain sampler.
        weights = [level.weight for level in self.levels]
        level = self.levels[0] if len(self.levels) == 1 else rng.choices(self.levels, weights)[0]
        n_ops = rng.randint(level.min_ops, level.max_ops)
        a = rng.randint(1, level.max_operand)
        op, b, acc = self._step(rng, a, False, level.max_operand)
        expression = f"{a}{op}{b}"
        hints = [f"{a}{op}{b}"]
        steps = [f"{a}{op}{b}={acc}"]
        for _ in range(n_ops - 1):
            left = rng.random() < level.p_left
            op, literal, new = self._step(rng, acc, left, level.max_operand)
            if left:
                hidden = op == "-" and level.hide_minus_parentheses
                expression = f"{literal}{op}{expression}" if hidden else f"{literal}{op}({expression})"
                hints.append(f"{literal}{op}_")
                steps.append(f"{literal}{op}{acc}={new}")
            else:
                expression = f"{expression}{op}{literal}"
                hints.append(f"_{op}{literal}")
                steps.append(f"{acc}{op}{literal}={new}")
            acc = new
        answer = str(acc)
        completion = ";".join(steps) + f";A:{answer}"
        return Example(
            prompt=f"Q:{expression}=",
            answer=answer,
            completion=completion,
            privileged={"answer": answer, "hints": ";".join(hints), "solution": completion},
            determined=read_as_written(expression) == acc,
        )

    def plan_positions(self, tokens: list[str]) -> list[bool]:
        """The operands each step chooses: the first token of a step and the token after its operator. On `order`
        they carry the evaluation order that only the privileged input gives; results, separators and the answer
        are the rest."""
        plan, step_start = [False] * len(tokens), True
        for i, token in enumerate(tokens):
            plan[i] = plan[i] or (step_start and token != "A")
            step_start = token == ";"
            if token in ("+", "-") and i + 1 < len(tokens):
                plan[i + 1] = True
        return plan


def read_as_written(expression: str) -> int:
    """The value of a +/- expression of non-negative integers and parentheses read by the usual rules (left to
    right, parentheses first): what a reader who cannot see hidden parentheses computes."""
    position = 0

    def term() -> int:
        nonlocal position
        if expression[position] == "(":
            position += 1
            value = chain()
            position += 1  # the closing parenthesis
            return value
        start = position
        while position < len(expression) and expression[position].isdigit():
            position += 1
        if start == position:
            raise ValueError(f"not a +/- expression at position {start}: {expression!r}")
        return int(expression[start:position])

    def chain() -> int:
        nonlocal position
        value = term()
        while position < len(expression) and expression[position] in "+-":
            sign = 1 if expression[position] == "+" else -1
            position += 1
            value += sign * term()
        return value

    value = chain()
    if position != len(expression):
        raise ValueError(f"unexpected {expression[position]!r} at position {position}: {expression!r}")
    return value


# `order`: the default problems, except that parentheses after a minus sign are never written, so the prompt alone
# does not fix the value of about a third of the problems (`7-3+2` may mean `(7-3)+2` or `7-(3+2)`).
# The privileged input carries that order: information, not skill, which is the privilege illusion in its plain
# form. Both models can only guess it without privileged input, and both gain from reading it; the teacher keeps
# its capability edge on the rest. See docs/lab_design.md.
ORDER_LEVELS = (ArithLevel(weight=1.0, min_ops=2, max_ops=6, max_operand=9, p_left=0.5, hide_minus_parentheses=True),)


class OrderTask(ArithmeticTask):
    """`arith` where some evaluation orders are known only from the privileged input (hidden parentheses)."""

    name = "order"

    def __init__(self, levels: tuple[ArithLevel, ...] = ORDER_LEVELS):
        super().__init__(levels)


class LookupTask(Task):
    """Multi-hop variable lookup: follow `x=y` definitions from the queried variable to a digit.

    The table holds the queried chain and `n_distractors` other chains (ending in other digits), shuffled, so
    neither the first digit nor any position gives the answer away: each step is one content lookup.
    """

    name = "lookup"

    def __init__(self, min_hops: int = 2, max_hops: int = 5, n_distractors: int = 1):
        if not 1 <= min_hops <= max_hops or max_hops * (n_distractors + 1) > 26 or n_distractors > 9:
            raise ValueError("need 1 <= min_hops <= max_hops and (n_distractors + 1) * max_hops <= 26 variables")
        self.min_hops, self.max_hops, self.n_distractors = min_hops, max_hops, n_distractors

    def sample(self, rng: random.Random) -> Example:
        lengths = [rng.randint(self.min_hops, self.max_hops) for _ in range(self.n_distractors + 1)]
        names = rng.sample("abcdefghijklmnopqrstuvwxyz", sum(lengths))
        digits = rng.sample("0123456789", len(lengths))
        chains, start = [], 0
        for length, digit in zip(lengths, digits):
            chains.append((names[start : start + length], digit))
            start += length
        definitions = []
        for chain, digit in chains:
            definitions += [f"{x}={y}" for x, y in zip(chain, chain[1:])] + [f"{chain[-1]}={digit}"]
        rng.shuffle(definitions)
        chain, digit = chains[0]
        steps = [f"{x}={y}" for x, y in zip(chain, chain[1:])] + [f"{chain[-1]}={digit}"]
        completion = ";".join(steps) + f";A:{digit}"
        plan = [f"{chain[0]}=_"] + ["_=_"] * (len(chain) - 2) + ["_=#"] if len(chain) > 1 else [f"{chain[0]}=#"]
        hints = ";".join(plan)
        return Example(
            prompt=f"Q:{','.join(definitions)};{chain[0]}?",
            answer=digit,
            completion=completion,
            privileged={"answer": digit, "hints": hints, "solution": completion},
            determined=True,
        )


class ChainTask(LookupTask):
    """`lookup` with more chains to search and hints that give the route: `Q:...;d?` -> `d=c;c=b;b=a;a=7;A:7`
    with the hints `d=c;c=b;b=a;a=#` (every variable met, not the digit).

    A structure other than arithmetic: the capability is retrieval over a shuffled table (each hop one content
    lookup among three distractor chains), the plan is the route, and the last lookup is left to the model even
    with the hints. No pair for it meets the lab's properties: the 3 x 64 teacher does not learn the lookup in
    8,000 steps (docs/lab_design.md, "The chain task"); the lab's second task is `add`.
    """

    name = "chain"

    def __init__(self, min_hops: int = 2, max_hops: int = 6, n_distractors: int = 3):
        super().__init__(min_hops, max_hops, n_distractors)

    def sample(self, rng: random.Random) -> Example:
        example = super().sample(rng)
        steps = example.completion.split(";")[:-1]  # the hops, without "A:digit"
        route = ";".join(steps[:-1] + [steps[-1].split("=")[0] + "=#"])
        return replace(example, privileged={**example.privileged, "hints": route})

    def plan_positions(self, tokens: list[str]) -> list[bool] | None:
        """The variables looked up on the way (the letter after each `=`): the route that the hints give."""
        return [token.isalpha() and previous == "=" for previous, token in zip(["", *tokens], tokens)]


class AddTask(Task):
    """Column addition with carries, worked from the rightmost column: `Q:4729+385=` ->
    `9+5=14;2+8+1=11;7+3+1=11;4+0+1=5;A:5114`.

    A structure other than the nested expressions of `arith` and `order`: the skill is local and positional (line
    the digits of each column up, add two digits and a carry, assemble the answer from the columns' last digits in
    reverse), and nothing has to be parsed. The hints give the plan: the digit pairs of each column in working order
    (`9+5;2+8;7+3;4+0`), never a sum or a carry. With probability `p_masked` one operand digit is written `?`: the
    prompt no longer determines the answer and only the privileged input carries the digit (the undetermined part,
    as the hidden parentheses are in `order`).
    """

    name = "add"
    # The order a step writes a column's two digits in: the upper operand's first (`9+5=14`), or the lower's
    # (`5+9=14`, `AddSwappedTask`). Both are right; the privileged input always follows the upper-first convention.
    swapped = False
    other_convention: str | None = "add-swapped"  # the task a mismatch pair's student learns (`--study mismatch`)

    def __init__(self, min_digits: int = 2, max_digits: int = 5, p_masked: float = 0.3):
        if not 1 <= min_digits <= max_digits or not 0.0 <= p_masked <= 1.0:
            raise ValueError("need 1 <= min_digits <= max_digits and 0 <= p_masked <= 1")
        self.min_digits, self.max_digits, self.p_masked = min_digits, max_digits, p_masked

    def _operand(self, rng: random.Random) -> str:
        length = rng.randint(self.min_digits, self.max_digits)
        return str(rng.randint(1, 9)) + "".join(rng.choice("0123456789") for _ in range(length - 1))

    def sample(self, rng: random.Random) -> Example:
        a, b = self._operand(rng), self._operand(rng)
        written = [a, b]
        if rng.random() < self.p_masked:
            which = rng.randrange(2)
            position = rng.randrange(len(written[which]))
            written[which] = written[which][:position] + "?" + written[which][position + 1 :]
        steps, reference, plan, carry = [], [], [], 0  # reference: the upper-first steps, whatever the convention
        for column in range(max(len(a), len(b))):
            x = a[-1 - column] if column < len(a) else "0"
            y = b[-1 - column] if column < len(b) else "0"
            total = int(x) + int(y) + carry
            rest = f"{'+1' if carry else ''}={total}"
            steps.append(f"{y}+{x}{rest}" if self.swapped else f"{x}+{y}{rest}")
            reference.append(f"{x}+{y}{rest}")
            plan.append(f"{x}+{y}")
            carry = total // 10
        answer = str(int(a) + int(b))
        completion = ";".join(steps) + f";A:{answer}"
        solution = ";".join(reference) + f";A:{answer}"  # a data set's reference solution: upper-first
        return Example(
            prompt=f"Q:{written[0]}+{written[1]}=",
            answer=answer,
            completion=completion,
            privileged={"answer": answer, "hints": ";".join(plan), "solution": solution},
            determined="?" not in written[0] + written[1],
        )

    def plan_positions(self, tokens: list[str]) -> list[bool]:
        """The two digits each step picks from the operands (its first token and the token after its first `+`):
        the column alignment that the hints give. Carries, sums, separators and the answer are the rest."""
        plan, step_start, first_plus = [False] * len(tokens), True, False
        for i, token in enumerate(tokens):
            if step_start and token != "A":
                plan[i], first_plus = True, True
            elif token == "+" and first_plus and i + 1 < len(tokens):
                plan[i + 1], first_plus = True, False
            step_start = token == ";"
        return plan


class AddSwappedTask(AddTask):
    """`add` written in the other convention: each step gives the lower operand's digit first (`5+9=14` where
    `add` writes `9+5=14`). Same prompts, answers and privileged input (hints and solution upper-first) as `add`
    with the same draws: the student of a mismatch pair (`LabPairConfig.student_task`) learns this one.
    """

    name = "add-swapped"
    swapped = True
    other_convention = "add"


def check_same_problems(task: str, other: str, n: int = 50) -> None:
    """One clear ValueError unless `other` draws the same prompts, answers and privileged input as `task` (the
    completions may differ): the condition for pretraining a pair's student on `other` (`student_task`)."""
    first, second = get_task(task), get_task(other)
    for a, b in zip(first.examples(n, 0), second.examples(n, 0)):
        if (a.prompt, a.answer, a.privileged) != (b.prompt, b.answer, b.privileged):
            raise ValueError(
                f"student_task={other} does not pose task {task}'s problems (prompt {a.prompt!r} against "
                f"{b.prompt!r}): a student task must differ from the task in its worked solutions only"
            )


class ShareTask(Task):
    """A task with a set share of undetermined problems (those whose answer only the privileged input determines):
    each draw first decides, with probability `share`, which part the problem comes from, then draws from `base`
    until it gives a problem of that part. The problems of each part keep `base`'s distribution within the part.

    The lab's information-share factor (`dopd lab --undetermined-share`, `--study share`) sets the share of the
    methods' training, validation and test prompts this way; the pair stays the one pretrained on `base`.
    """

    MAX_DRAWS = 10_000  # draws for one problem of the wanted part before the part is declared absent

    def __init__(self, base: Task, share: float):
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"--undetermined-share {share:g} must lie between 0 and 1 (a share of the problems)")
        self.base, self.share = base, float(share)
        self.name, self.answer_pattern = base.name, base.answer_pattern

    def sample(self, rng: random.Random) -> Example:
        undetermined = rng.random() < self.share
        for _ in range(self.MAX_DRAWS):
            example = self.base.sample(rng)
            if (example.determined is False) == undetermined:
                return example
        part = "undetermined" if undetermined else "determined"
        raise ValueError(
            f"task {self.base.name!r} gave no {part} problem in {self.MAX_DRAWS} draws: it cannot be set to an "
            f"undetermined share of {self.share:g} (a task whose prompts always determine the answer has share 0)"
        )

    def check(self, example: Example, completion_text: str) -> CheckResult:
        return self.base.check(example, completion_text)

    def plan_positions(self, tokens: list[str]) -> list[bool] | None:
        return self.base.plan_positions(tokens)

    def __repr__(self) -> str:
        return f"ShareTask({self.base!r}, share={self.share:g})"


def with_undetermined_share(task: Task, share: float | None) -> Task:
    """`task` itself for `share` None, else `ShareTask(task, share)`; a share the task cannot give fails here, on
    one line, before any work (a test draw of both parts)."""
    if share is None:
        return task
    shared = ShareTask(task, share)
    rng = random.Random(0)
    for part, wanted in (("undetermined", share > 0), ("determined", share < 1)):
        if wanted and not any((task.sample(rng).determined is False) == (part == "undetermined") for _ in range(2000)):
            raise ValueError(
                f"--undetermined-share {share:g}: task {task.name!r} has no {part} problems in 2,000 draws; "
                "use a task whose examples set `determined` (order), or leave the share unset"
            )
    return shared


class MixtureTask(Task):
    """Several tasks in equal shares (`--task order+arith`): each draw picks a task, then draws from it, and the
    example keeps the task's name as its `source` (its row's `task` column: with `--teacher-per-task`, the name of
    the row's teacher). Checks and the answer format are each source task's own.
    """

    def __init__(self, tasks: list[Task]):
        names = [task.name for task in tasks]
        if len(tasks) < 2 or len(set(names)) != len(names):
            got = "+".join(names)
            raise ValueError(f"a mixture task needs two or more different tasks, e.g. order+arith; got {got}")
        self.tasks = {task.name: task for task in tasks}
        self.name = "+".join(names)
        self.answer_pattern = tasks[0].answer_pattern

    def sample(self, rng: random.Random) -> Example:
        task = list(self.tasks.values())[rng.randrange(len(self.tasks))]
        return replace(task.sample(rng), source=task.name)

    def check(self, example: Example, completion_text: str) -> CheckResult:
        """The source task's check; an example without a source (a reward's row) is checked as `Task` checks."""
        source = self.tasks.get(example.source)
        return source.check(example, completion_text) if source else super().check(example, completion_text)

    def __repr__(self) -> str:
        return f"MixtureTask({list(self.tasks.values())!r})"


TASKS: dict[str, type[Task]] = {
    ArithmeticTask.name: ArithmeticTask,
    OrderTask.name: OrderTask,
    LookupTask.name: LookupTask,
    ChainTask.name: ChainTask,
    AddTask.name: AddTask,
    AddSwappedTask.name: AddSwappedTask,
}


def get_task(name_or_spec: str | Task) -> Task:
    """A registered task by name (`arith`, `lookup`), a user's Task subclass given as "module:Class", or a mixture
    of either joined by `+` (`order+arith`)."""
    if isinstance(name_or_spec, Task):
        return name_or_spec
    if "+" in name_or_spec:
        return MixtureTask([get_task(part) for part in name_or_spec.split("+")])
    if name_or_spec in TASKS:
        return TASKS[name_or_spec]()
    if ":" in name_or_spec:
        module_name, _, class_name = name_or_spec.partition(":")
        try:
            obj = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"lab task {name_or_spec!r} could not be imported: {error}") from None
        task = obj() if isinstance(obj, type) else obj
        if not isinstance(task, Task):
            raise ValueError(f"lab task {name_or_spec!r} is not a dopd.lab.tasks.Task subclass")
        return task
    raise ValueError(
        f"lab task {name_or_spec!r} is unknown; known tasks: {', '.join(sorted(TASKS))}, "
        "or give your own Task subclass as 'module:Class'"
    )
