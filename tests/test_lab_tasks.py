"""Lab tasks, tokenizer and prompt rendering: determinism, checkers, hints without values, round trips."""

import random
import re
from dataclasses import replace

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from dopd.lab.tasks import (
    LAB_PRIVILEGED_TEMPLATE,
    MIXED_ARITH_LEVELS,
    PRIVILEGED_KINDS,
    SPLITS,
    TASKS,
    AddSwappedTask,
    AddTask,
    ArithLevel,
    ArithmeticTask,
    Example,
    LookupTask,
    OrderTask,
    Task,
    check_same_problems,
    extract_answer,
    get_task,
    prompt_split,
    read_as_written,
)
from dopd.lab.tokenizer import build_tokenizer
from dopd.prompts import check_template, render_prompt


def numbers(text):
    return sorted(int(n) for n in re.findall(r"\d+", text))


def evaluate_steps(completion):
    """Recompute every `x op y=z` step of an arithmetic completion; return the final value."""
    steps = completion.split(";")
    assert steps[-1].startswith("A:")
    value = None
    for step in steps[:-1]:
        lhs, rhs = step.split("=")
        assert eval(lhs) == int(rhs) >= 0, step
        value = int(rhs)
    assert steps[-1] == f"A:{value}"
    return value


def without_minus_parentheses(text):
    """`text` with every parenthesis pair that follows a minus sign removed (matched with a stack)."""
    drop, stack = set(), []
    for i, char in enumerate(text):
        if char == "(":
            stack.append(i)
        elif char == ")":
            opened = stack.pop()
            if opened > 0 and text[opened - 1] == "-":
                drop |= {opened, i}
    return "".join(char for i, char in enumerate(text) if i not in drop)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_sampler_deterministic_per_seed(name):
    task = get_task(name)
    assert task.examples(50, seed=3) == task.examples(50, seed=3)
    assert task.examples(50, seed=3) != task.examples(50, seed=4)
    assert task.sample(random.Random(7)) == task.sample(random.Random(7))


@pytest.mark.parametrize("name", sorted(TASKS))
def test_examples_are_consistent(name):
    task = get_task(name)
    for ex in task.examples(200, seed=0):
        assert set(ex.privileged) == {"answer", "hints", "solution"}
        assert ex.privileged["answer"] == ex.answer
        if not getattr(task, "swapped", False):  # add-swapped's solution is the upper-first reference
            assert ex.privileged["solution"] == ex.completion
        assert ex.completion.endswith(f"A:{ex.answer}")
        assert task.check(ex, ex.completion).answer_correct and task.check(ex, ex.completion).full_match


def test_arithmetic_completion_is_the_value_of_the_prompt():
    for ex in ArithmeticTask().examples(300, seed=1):
        expression = ex.prompt[len("Q:") : -1]
        assert eval(expression) == int(ex.answer) == evaluate_steps(ex.completion)


def test_default_arithmetic_is_digits_with_two_to_six_operations():
    for ex in ArithmeticTask().examples(300, seed=0):
        assert max(numbers(ex.prompt)) <= 9 and 2 <= ex.completion.count("=") <= 6


def test_arithmetic_nesting_gives_both_shapes():
    prompts = [ex.prompt for ex in ArithmeticTask().examples(300, seed=0)]
    nested = sum("(" in p for p in prompts)
    assert 100 < nested < 300  # chains (no parentheses) and nested expressions both occur
    chains = ArithmeticTask(levels=(ArithLevel(weight=1.0, min_ops=2, max_ops=4, max_operand=99, p_left=0.0),))
    assert all("(" not in ex.prompt for ex in chains.examples(50, seed=0))


def test_arithmetic_mixed_levels_cover_the_three_difficulties():
    examples = ArithmeticTask(MIXED_ARITH_LEVELS).examples(600, seed=0)
    long_ones = [ex for ex in examples if ex.completion.count("=") >= 6]
    two_digit = [ex for ex in examples if max(numbers(ex.prompt)) >= 10]
    assert 120 < len(long_ones) < 240 and 120 < len(two_digit) < 240  # 30% each
    assert all(max(numbers(ex.prompt)) <= 9 for ex in long_ones)


def test_order_hides_exactly_the_parentheses_after_a_minus():
    plain, hidden = ArithmeticTask().examples(400, seed=4), OrderTask().examples(400, seed=4)
    ambiguous = 0
    for ex, twin in zip(plain, hidden):
        # The same draws: the same steps, answer and privileged input; only the written prompt differs.
        assert (twin.completion, twin.answer, twin.privileged) == (ex.completion, ex.answer, ex.privileged)
        assert twin.prompt == without_minus_parentheses(ex.prompt) and "-(" not in twin.prompt
        assert evaluate_steps(twin.completion) == int(twin.answer)  # the steps still compute the answer
        ambiguous += eval(twin.prompt[len("Q:") : -1]) != int(twin.answer)
    assert 0.25 < ambiguous / len(hidden) < 0.4  # the prompt misleads on about a third of the problems


def test_order_example_by_hand():
    ex = OrderTask().examples(3, seed=0)[2]
    assert ex.prompt == "Q:6+(4+(2-1-1)+9)="  # written from 6+(4+(2-(1-1))+9): the minus' parentheses left out
    assert ex.completion == "1-1=0;2-0=2;4+2=6;6+9=15;6+15=21;A:21"  # read left to right it would be 19
    assert ex.privileged["hints"] == "1-1;2-_;4+_;_+9;6+_"


def test_read_as_written_by_hand():
    assert read_as_written("6+(4+(2-1-1)+9)") == 19 and read_as_written("7-3+2") == 6
    assert read_as_written("7-(3+2)") == 2 and read_as_written("12") == 12 and read_as_written("(1+2)-(3-1)") == 1
    with pytest.raises(ValueError):
        read_as_written("7*3")


def test_determined_flag_on_hand_made_examples():
    ex = OrderTask().examples(3, seed=0)[2]  # 6+(4+(2-(1-1))+9) = 21 written 6+(4+(2-1-1)+9), read as 19
    assert ex.determined is False
    same_either_way = [e for e in OrderTask().examples(300, seed=1) if "-" not in e.prompt]
    assert same_either_way and all(e.determined for e in same_either_way)  # nothing hidden without a minus
    assert all(e.determined for e in ArithmeticTask().examples(300, seed=1))  # every parenthesis written
    assert all(e.determined for e in LookupTask().examples(50, seed=1))


def test_determined_flag_is_the_written_reading():
    examples = OrderTask().examples(1000, seed=5)
    for ex in examples:
        assert ex.determined == (eval(ex.prompt[len("Q:") : -1]) == int(ex.answer))
    assert 0.25 < sum(not e.determined for e in examples) / len(examples) < 0.4


@pytest.mark.parametrize("task", [ArithmeticTask(), OrderTask()], ids=["arith", "order"])
def test_arithmetic_hints_hold_no_computed_value(task):
    for ex in task.examples(300, seed=2):
        hints = ex.privileged["hints"]
        # Exactly the operands of the prompt, in evaluation order; results are written "_".
        assert numbers(hints) == numbers(ex.prompt)
        assert "=" not in hints and "A:" not in hints
        assert len(hints.split(";")) == ex.completion.count("=")


def test_arithmetic_hints_example():
    task = ArithmeticTask()
    ex = next(e for e in task.examples(500, seed=0) if e.prompt.count("(") == 2)
    first, second, third = ex.privileged["hints"].split(";")[:3]
    assert "_" not in first and first in ex.prompt  # the innermost operation, on two literals
    assert "_" in second and "_" in third


def test_lookup_follows_the_table_and_hints_hold_no_variable_met():
    for ex in LookupTask().examples(300, seed=5):
        table = dict(item.split("=") for item in ex.prompt[2:].split(";")[0].split(","))
        start = ex.prompt.split(";")[-1].rstrip("?")
        node, visited = start, []
        while not node.isdigit():
            visited.append(node)
            node = table[node]
        assert node == ex.answer
        assert ex.completion.count("=") == len(visited)
        hints = ex.privileged["hints"]
        assert ex.answer not in hints
        assert set(re.findall("[a-z]", hints)) == {start}  # only the queried variable, never one met on the way
        # The distractor chain ends in another digit, so the table holds at least two digits.
        assert len(set(re.findall(r"\d", ex.prompt))) >= 2


def test_chain_hints_are_the_route_without_the_digit():
    task = get_task("chain")
    for ex in task.examples(300, seed=3):
        hops = ex.completion.split(";")[:-1]
        assert ex.privileged["hints"] == ";".join(hops[:-1] + [hops[-1][:-1] + "#"])
        assert ex.answer not in ex.privileged["hints"] and ex.completion.endswith("A:" + ex.answer)
        assert 2 <= len(hops) <= 6
        assert len(set(re.findall(r"\d", ex.prompt))) >= 4  # three distractor chains, each ending in a digit


def test_chain_plan_positions_are_the_variables_looked_up():
    tokens = list("d=c;c=7;A:7")
    assert get_task("chain").plan_positions(tokens) == [
        False,
        False,
        True,
        False,
        False,
        False,
        False,
        False,
        False,
        False,
        False,
    ]  # only the `c` after `d=`: the route; the digit and the answer are not plan


def test_a_mixture_draws_each_task_keeps_its_source_and_checks_with_it():
    mixture = get_task("order+arith")
    examples = mixture.examples(400, seed=0)
    counts = {name: sum(ex.source == name for ex in examples) for name in ("order", "arith")}
    assert sum(counts.values()) == 400 and min(counts.values()) > 150  # equal shares, about 200 each
    rng = random.Random(0)
    rng.randrange(2)  # the mixture's draw of the task comes first, then the task's own draws
    assert examples[0] == replace(get_task(examples[0].source).sample(rng), source=examples[0].source)
    order = next(ex for ex in examples if ex.source == "order" and ex.determined is False)
    assert mixture.check(order, order.completion).answer_correct
    assert not mixture.check(order, "A:" + order.answer + "0").answer_correct
    assert {row["task"] for row in mixture.rows(50, seed=1, kind="hints")} == {"order", "arith"}
    assert "task" not in get_task("order").rows(2, seed=1)[0]


def test_checker_on_hand_made_completions():
    task = ArithmeticTask()
    ex = Example(
        prompt="Q:50-(12+(9+4))=",
        answer="25",
        completion="9+4=13;12+13=25;50-25=25;A:25",
        privileged={"answer": "25", "hints": "9+4;12+_;50-_", "solution": "9+4=13;12+13=25;50-25=25;A:25"},
    )
    correct = task.check(ex, "9+4=13;12+13=25;50-25=25;A:25")
    assert correct.answer_correct and correct.full_match
    wrong = task.check(ex, "9+4=13;12+13=25;50-25=26;A:26")
    assert not wrong.answer_correct and not wrong.full_match
    lucky = task.check(ex, "9+4=13;12+13=24;50-24=25;A:25")  # right answer after a wrong step
    assert lucky.answer_correct and not lucky.full_match
    assert not task.check(ex, "9+4=13;12+13=25").answer_correct  # no answer given
    assert not task.check(ex, "A:250").answer_correct
    assert extract_answer("x;A:7;A:8") == "7"  # the first answer counts


def test_rows_per_kind():
    task = get_task("arith")
    examples = task.examples(5, seed=9)
    for kind in PRIVILEGED_KINDS:
        rows = task.rows(5, seed=9, kind=kind)
        assert [r["prompt"] for r in rows] == [e.prompt for e in examples]
        assert [r["completion"] for r in rows] == [e.completion for e in examples]
        expected = [("" if kind == "none" else e.privileged[kind]) for e in examples]
        assert [r["privileged_context"] for r in rows] == expected
    with pytest.raises(ValueError, match="privileged kind"):
        task.rows(2, seed=0, kind="hint")


class _ConstantTask(Task):
    name = "constant"

    def sample(self, rng):
        return Example("Q:1+1=", "2", "1+1=2;A:2", {"answer": "2", "hints": "1+1", "solution": "1+1=2;A:2"})


def test_get_task_by_name_spec_and_error():
    assert isinstance(get_task("arith"), ArithmeticTask)
    assert isinstance(get_task("lookup"), LookupTask)
    assert isinstance(get_task(f"{__name__}:_ConstantTask"), _ConstantTask)
    with pytest.raises(ValueError, match="arith, chain, lookup"):
        get_task("arithmetic")
    with pytest.raises(ValueError, match="could not be imported"):
        get_task("no_such_module_xyz:Task")


def test_tokenizer_round_trips_text_and_save_load(tmp_path):
    tok = build_tokenizer()
    assert isinstance(tok, PreTrainedTokenizerFast) and tok.padding_side == "left"
    text = "Q:50-(12+(9+4))=\nH:9+4;12+_;50-_|9+4=13;A:25"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(text, add_special_tokens=False)["input_ids"] == ids
    assert loaded.decode(ids + [loaded.eos_token_id], skip_special_tokens=True) == text
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.padding_side) == (
        tok.pad_token_id,
        tok.eos_token_id,
        "left",
    )
    assert loaded.chat_template == tok.chat_template
    batch = loaded(["Q:1=", "Q:12+3="], padding=True, add_special_tokens=False)["input_ids"]
    assert batch[0][:3] == [loaded.pad_token_id] * 3  # left padding


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_character_is_in_the_vocabulary(name):
    tok = build_tokenizer()
    for ex in get_task(name).examples(100, seed=0):
        text = render_prompt(tok, ex.prompt, ex.privileged["hints"], template=LAB_PRIVILEGED_TEMPLATE) + ex.completion
        assert tok.unk_token_id not in tok(text, add_special_tokens=False)["input_ids"]


def test_render_prompt_with_lab_template():
    check_template(LAB_PRIVILEGED_TEMPLATE, "LAB_PRIVILEGED_TEMPLATE")
    tok = build_tokenizer()
    assert render_prompt(tok, "Q:1+2=") == "Q:1+2=|"
    privileged = render_prompt(tok, "Q:1+2=", "1+2", template=LAB_PRIVILEGED_TEMPLATE)
    assert privileged == "Q:1+2=\nH:1+2|"
    assert render_prompt(tok, "Q:1+2=", None, template=LAB_PRIVILEGED_TEMPLATE) == "Q:1+2=|"


def test_prompt_split_is_a_stable_hash_with_the_stated_shares():
    assert prompt_split("Q:1+2=") == prompt_split("Q:1+2=")  # the same in every process (no salted hash())
    prompts = [f"Q:{i}+{j}-{k}=" for i in range(30) for j in range(30) for k in range(30)]
    counts = {split: sum(prompt_split(p) == split for p in prompts) / len(prompts) for split in SPLITS}
    assert counts["test"] == pytest.approx(0.10, abs=0.01)
    assert counts["validation"] == pytest.approx(0.05, abs=0.01)
    assert counts["train"] == pytest.approx(0.85, abs=0.01)


def test_examples_of_a_split_hold_only_its_prompts_and_refuse_a_task_too_small():
    task = OrderTask()
    for split in SPLITS:
        assert {prompt_split(e.prompt) for e in task.examples(50, seed=1, split=split)} == {split}
    assert task.examples(5, seed=1, split="test") == task.examples(5, seed=1, split="test")
    with pytest.raises(ValueError, match="split 'dev' is unknown"):
        task.examples(5, seed=1, split="dev")

    class OnePrompt(Task):
        name = "one"

        def sample(self, rng):
            return Example(prompt="Q:1+1=", answer="2", completion="1+1=2;A:2")

    missing = next(s for s in SPLITS if s != prompt_split("Q:1+1="))
    with pytest.raises(ValueError, match="too small to hold prompts out"):
        OnePrompt().examples(3, seed=0, split=missing)


@pytest.mark.parametrize("name", ["order", "arith", "lookup", "chain", "add"])
def test_lab_validation_and_test_prompts_are_never_trained_on(name):
    """The lab's evaluation prompts occur neither in the pair's pretraining stream nor in any method's training
    rows, nor in each other (the tasks' prompt spaces are small: a set drawn with another seed overlaps)."""
    from dopd.lab.config import LabConfig
    from dopd.lab.models import LabPairConfig
    from dopd.lab.pretraining import training_examples
    from dopd.lab.runner import held_out_sets, training_rows

    task, config = get_task(name), LabConfig(task=name)
    validation, test = ({e.prompt for e in s} for s in held_out_sets(task, config))
    assert len(validation) > 250 and len(test) > 1000
    trained = {row["prompt"] for row in training_rows(task, config, "hints")}
    pair = LabPairConfig(task=name)
    rng = random.Random(pair.seed + 1000)  # the teacher's pretraining stream, as `pretrain` draws it
    trained |= {e.prompt for _ in range(300) for e in training_examples(task, rng, pair.batch_size)}
    assert not validation & trained and not test & trained and not validation & test


class FixedDraws(random.Random):
    """A Random whose randint/choice/random/randrange give the values listed, in order (to build a hand case)."""

    def __init__(self, values):
        super().__init__(0)
        self.values = list(values)

    def next(self, *_):
        return self.values.pop(0)

    randint = randrange = choice = random = next


def test_add_example_by_hand():
    # 4729 + 385: lengths 4 and 3, digits drawn one by one, no mask (0.9 >= p_masked).
    draws = [4, 4, "7", "2", "9", 3, 3, "8", "5", 0.9]
    example = AddTask().sample(FixedDraws(draws))
    assert example.prompt == "Q:4729+385="
    assert example.completion == "9+5=14;2+8+1=11;7+3+1=11;4+0+1=5;A:5114"
    assert example.privileged == {"answer": "5114", "hints": "9+5;2+8;7+3;4+0", "solution": example.completion}
    assert example.determined is True
    # The same draws with a mask: the upper operand's second digit is written `?`; the steps keep the true digit.
    masked = AddTask().sample(FixedDraws([*draws[:-1], 0.1, 0, 1]))
    assert masked.prompt == "Q:4?29+385=" and masked.completion == example.completion
    assert masked.privileged == example.privileged and masked.determined is False


def test_add_steps_add_up_and_the_hints_hold_no_sum():
    task = AddTask()
    examples = task.examples(500, 3)
    for example in examples:
        a, b = example.prompt[2:-1].split("+")
        steps = example.completion.split(";")[:-1]
        assert len(steps) == max(len(a), len(b)) == len(example.privileged["hints"].split(";"))
        carry, digits = 0, []
        for step, plan in zip(steps, example.privileged["hints"].split(";")):
            terms, total = step.split("=")
            assert terms == plan + ("+1" if carry else "")  # the hints are each step's two digits, nothing more
            assert int(total) == sum(int(t) for t in terms.split("+"))
            digits.append(int(total) % 10)
            carry = int(total) // 10
        assert example.answer == str(int("".join(map(str, reversed(digits)))) + 10 ** len(digits) * carry)
        if example.determined:
            assert int(example.answer) == int(a) + int(b)
        assert example.determined == ("?" not in example.prompt)
    masked = sum(not e.determined for e in examples) / len(examples)
    assert 0.25 < masked < 0.35  # p_masked = 0.3


def test_add_swapped_poses_the_same_problems_in_the_other_convention():
    plain, swapped = AddTask().examples(200, 5), AddSwappedTask().examples(200, 5)
    for a, b in zip(plain, swapped):
        assert (a.prompt, a.answer, a.privileged, a.determined) == (b.prompt, b.answer, b.privileged, b.determined)
        for step, other in zip(a.completion.split(";")[:-1], b.completion.split(";")[:-1]):
            x, y, rest = step[0], step[2], step[3:]
            assert other == f"{y}+{x}{rest}"  # the lower operand's digit first
    assert AddSwappedTask().check(swapped[0], swapped[0].completion).answer_correct
    assert AddTask().check(plain[0], swapped[0].completion).answer_correct  # both conventions are right answers
    check_same_problems("add", "add-swapped")
    with pytest.raises(ValueError, match="student_task=order does not pose task add's problems"):
        check_same_problems("add", "order")


def test_add_plan_positions_are_the_digits_each_step_picks():
    tokens = list("9+5=14;2+8+1=11;A:111")
    plan = AddTask().plan_positions(tokens)
    assert [t for t, p in zip(tokens, plan) if p] == ["9", "5", "2", "8"]
    assert [i for i, p in enumerate(plan) if p] == [0, 2, 7, 9]
