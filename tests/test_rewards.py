import logging
import os
import time

import pytest

from lit_sapo.rewards import (
    FormatReward,
    GradingPool,
    MathAccuracy,
    RewardFunction,
    RewardSet,
    extract_answer,
    find_boxes,
    format_score,
    grade_math,
    load_reward,
)

POWER_TOWER = r"Multiplying out, the answer is \boxed{9^{9^{9^{9^{9}}}}}"


# Module-level so that spawned pool workers can unpickle them by reference.
def _echo(x):
    return x


def _sleep_then_echo(x, seconds):
    time.sleep(seconds)
    return x


def _die(code):
    os._exit(code)


def _raise_value_error():
    raise ValueError("boom")


@pytest.fixture(scope="module")
def accuracy():
    with MathAccuracy(timeout_s=1.0, workers=2) as acc:
        acc(["\\boxed{1}"], ["1"])  # start the workers outside the timed tests
        yield acc


# --------------------------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{3} and then \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
        (r"\boxed{ \frac{\sqrt{2}}{2} }", r"\frac{\sqrt{2}}{2}"),
        (r"\boxed{\boxed{5}}", r"\boxed{5}"),
        (r"\boxed{7} then a truncated \boxed{\frac{1}{", "7"),  # unclosed last box: the last complete one
        (r"\fbox{12}", "12"),
        ("She paid $1,234.50 in total, then 2 more.", "2"),
        ("She paid 1,234 dollars.", "1234"),
        ("It is -3.", "-3"),
        ("no numbers here", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_find_boxes_positions():
    text = r"a \boxed{1} b \boxed{x^{2}}"
    assert find_boxes(text) == [(2, 11, "1"), (14, 27, "x^{2}")]
    assert text[14:27] == r"\boxed{x^{2}}"


# ------------------------------------------------------------------------------------------------- format


@pytest.mark.parametrize(
    "text, level",
    [
        (r"We add 7 and 5 to get 12. So the answer is $\boxed{12}$.", 1.0),
        ("Seven plus five is twelve.\n\\[\n\\boxed{12}\n\\]", 1.0),
        (r"7 + 5 = 12 so **\boxed{12}**", 1.0),
        (r"\boxed{12}", 0.5),  # no reasoning before it
        (r"We add them: \boxed{12} dollars is what she earns.", 0.5),  # text after it
        (r"First \boxed{11}, no wait, adding again gives \boxed{12}", 0.5),  # two boxes
        ("We add 7 and 5.\nThe answer is 12", 0.25),
        ("We add them.\nFinal answer: twelve", 0.25),
        ("I do not know.", 0.0),
        ("", 0.0),
    ],
)
def test_format_levels(text, level):
    assert format_score(text) == level


def test_format_unclosed_box_falls_to_answer_line():
    assert format_score(r"We add them and get \boxed{12") == 0.25
    assert format_score(r"We add them and get \boxed{twelve") == 0.0
    assert FormatReward()(["Adding: 7+5=12, so \\boxed{12}", "hmm"], ["12", "12"], ["p", "p"]) == [1.0, 0.0]


# ------------------------------------------------------------------------------------------------ accuracy


def test_grade_math_in_process():
    assert grade_math(r"so \boxed{72}", "72", 1) == 1.0
    assert grade_math(r"so \boxed{71}", "72", 1) == 0.0
    assert grade_math(r"first \boxed{3}, then correcting: \boxed{5}", "5", 1) == 1.0  # last box only
    assert grade_math("nothing", "5", 1) == 0.0


def test_accuracy_gsm8k_style(accuracy):
    completions = [
        r"She sold 48 + 24 = 72 clips. The answer is \boxed{72}.",
        r"She sold 48 + 25 = 73 clips. The answer is \boxed{73}.",
        "Natalia sold 48/2 = 24 in May, so 48 + 24 = 72 clips in all.",  # no box: math-verify's own extraction
        r"In total \boxed{1234} dollars.",
        r"In total \boxed{1,234} dollars.",
        r"The answer is \boxed{-3}",
    ]
    scores = accuracy.grade(completions, ["72", "72", "72", "1,234", "1234", "-3"])
    assert scores.values == [1.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    assert (scores.timeouts, scores.errors) == (0, 0)


def test_accuracy_bare_latex_gold(accuracy):
    gold = r"\frac{\sqrt{2}}{2}"
    completions = [r"So $\boxed{\frac{\sqrt2}{2}}$.", r"So $\boxed{\frac{1}{\sqrt{2}}}$.", r"So $\boxed{\sqrt{2}}$."]
    assert accuracy(completions, [gold] * 3, ["p"] * 3) == [1.0, 1.0, 0.0]
    # golds raw parsing would cut to a fragment (3\sqrt{13} -> 3): the fragment must not be accepted
    assert accuracy([r"\boxed{3}", r"\boxed{3\sqrt{13}}"], [r"3\sqrt{13}"] * 2, ["p"] * 2) == [0.0, 1.0]


def test_accuracy_power_tower_times_out_others_graded(accuracy):
    completions = [r"\boxed{12}", POWER_TOWER, r"\boxed{13}", r"\boxed{\frac{\sqrt2}{2}}"]
    golds = ["12", "12", "12", r"\frac{\sqrt{2}}{2}"]
    t0 = time.monotonic()
    scores = accuracy.grade(completions, golds)
    elapsed = time.monotonic() - t0
    assert scores.values == [1.0, 0.0, 0.0, 1.0]
    assert (scores.timeouts, scores.errors) == (1, 0)
    assert elapsed < 3.0
    # the pool is still healthy afterwards
    assert accuracy([r"\boxed{4}"], ["4"], ["p"]) == [1.0]


def test_accuracy_in_process_mode():
    acc = MathAccuracy(workers=0)
    scores = acc.grade([r"\boxed{12}", r"\boxed{13}"], ["12", "12"])
    assert scores.values == [1.0, 0.0]
    assert acc.pool._pool is None  # no processes in this mode


# ------------------------------------------------------------------------------------------------ the pool


def test_pool_hard_timeout_crash_and_error_are_isolated():
    with GradingPool(workers=2, timeout_s=0.5) as pool:
        assert pool.run(_echo, [(1,), (2,)]) == [(1, "ok"), (2, "ok")]
        t0 = time.monotonic()
        out = pool.run(_sleep_then_echo, [(1, 0.0), (2, 30.0), (3, 0.0)])
        assert time.monotonic() - t0 < 3.0  # the sleeping worker was killed at 0.5 s
        assert out == [(1, "ok"), (None, "timeout"), (3, "ok")]
        assert pool.run(_die, [(3,)]) == [(None, "error")]  # a worker dying mid-task
        assert pool.run(_raise_value_error, [()]) == [(None, "error")]
        assert pool.run(_echo, [(5,)]) == [(5, "ok")]
        pool._pool.stop()  # a pool broken under our feet is restarted on the next call
        assert pool.run(_echo, [(6,)]) == [(6, "ok")]
    assert pool._pool is None


def _failing_initializer():
    raise RuntimeError("worker cannot start")


def test_pool_that_cannot_start_does_not_hang():
    pool = GradingPool(workers=1, timeout_s=0.5, initializer=_failing_initializer, startup_grace_s=1.0,
                       respawn_grace_s=0.5)
    t0 = time.monotonic()
    out = pool.run(_echo, [(1,), (2,)])
    assert time.monotonic() - t0 < 6.0
    assert [value for value, _ in out] == [None, None]
    assert {status for _, status in out} <= {"timeout", "error"}
    pool.close()


def test_pool_validates_arguments():
    with pytest.raises(ValueError, match="workers >= 0"):
        GradingPool(workers=-1)


# -------------------------------------------------------------------------------------- loading and sets


USER_MODULE = '''
class LengthReward:
    name = "length"
    def __init__(self, scale=1.0):
        self.scale = scale
    def __call__(self, completions, answers, prompts):
        return [self.scale * len(c) for c in completions]

class Exploding:
    name = "exploding"
    def __call__(self, completions, answers, prompts):
        raise RuntimeError("user bug")

def starts_with_answer(completions, answers, prompts):
    return [float(c.startswith(a)) for c, a in zip(completions, answers)]
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards"


def test_load_reward_specs(user_module):
    assert isinstance(load_reward("format"), FormatReward)
    acc = load_reward({"class_path": "accuracy", "init_args": {"workers": 0, "timeout_s": 2.0}})
    assert isinstance(acc, MathAccuracy) and acc.timeout_s == 2.0 and acc.pool.workers == 0
    length = load_reward({"class_path": "my_rewards.LengthReward", "init_args": {"scale": 2.0}})
    assert length(["abc"], ["x"], ["p"]) == [6.0]
    assert isinstance(length, RewardFunction)
    assert load_reward("my_rewards:LengthReward")(["ab"], ["x"], ["p"]) == [2.0]
    fn = load_reward("my_rewards.starts_with_answer")
    assert fn(["12 apples", "no"], ["12", "12"], ["p", "p"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="neither a built-in"):
        load_reward("acuracy")
    with pytest.raises(ValueError, match="class_path"):
        load_reward({"path": "accuracy"})


def test_reward_set_weighted_total(user_module):
    rewards = {"accuracy": "accuracy", "format": "format", "length": "my_rewards.LengthReward"}
    with RewardSet(rewards, weights={"format": 0.5, "length": 0.01}, workers=0) as rs:
        completions = [r"Adding 7 and 5 gives \boxed{12}", "13"]
        result = rs(completions, ["12", "12"], ["What is 7+5?"] * 2)
    assert result.per_function == {"accuracy": [1.0, 0.0], "format": [1.0, 0.25], "length": [31.0, 2.0]}
    assert result.total == pytest.approx([1.0 + 0.5 + 0.31, 0.0 + 0.125 + 0.02])
    assert (result.timeouts, result.errors) == (0, 0)


def test_reward_set_numeric_shorthand():
    rs = RewardSet({"accuracy": 1.0, "format": 0.25}, timeout_s=2.0, workers=0)
    assert rs.weights == {"accuracy": 1.0, "format": 0.25}
    assert rs.functions["accuracy"].timeout_s == 2.0 and rs.functions["accuracy"].pool.workers == 0
    assert rs([r"We add: 7+5=12 so \boxed{12}"], ["12"]).total == [1.25]


def test_reward_set_raising_user_reward_scores_zero_and_warns_once(user_module, caplog):
    rs = RewardSet({"format": "format", "boom": "my_rewards.Exploding"})
    with caplog.at_level(logging.WARNING, logger="lit_sapo.rewards"):
        first = rs([r"We add them up: \boxed{12}", "no"], ["12", "12"], ["p", "p"])
        second = rs(["We add 7 and 5.\nSo 12"], ["12"], ["p"])
    assert first.per_function["boom"] == [0.0, 0.0] and first.errors == 2
    assert first.total == [1.0, 0.0]  # the other function still counts
    assert second.total == [0.25] and second.errors == 1
    assert sum("reward 'boom' failed" in r.message for r in caplog.records) == 1


def test_reward_set_checks():
    with pytest.raises(ValueError, match="unknown rewards"):
        RewardSet({"format": "format"}, weights={"accuracy": 1.0})
    with pytest.raises(ValueError, match="2 completions, 1 answers"):
        RewardSet({"format": "format"})(["a", "b"], ["1"], ["p", "p"])


def short_reward(completions, answers, prompts):
    return [1.0] * (len(completions) - 1)


def test_a_reward_with_the_wrong_number_of_scores_is_an_error_naming_it():
    from lit_sapo.rewards import RewardCountError

    rs = RewardSet({"short": short_reward}, workers=0)
    with pytest.raises(RewardCountError, match=r"reward 'short' \(short_reward\) returned 2 scores for 3 completions"):
        rs(["a", "b", "c"], ["1", "1", "1"], ["p", "p", "q"])
