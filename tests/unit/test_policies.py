"""Selection policies on synthetic answer streams: learning, splits, combination, state."""

import json
from collections import Counter

import numpy as np
import pytest
from ketchd.policies import (
    MAX_LOG_RATIO,
    Combined,
    Exp3,
    Exp4,
    Policy,
    Shadow,
    Weighted,
    agreement,
    combine_answers,
    loss,
    make_policy,
    needs_default,
)

CLASSES = 5


def answer_of(y: int, accuracy: float, rng: np.random.Generator) -> int:
    """A classifier that is right with probability ``accuracy``, else names another class."""
    if rng.random() < accuracy:
        return y
    return int((y + 1 + rng.integers(CLASSES - 1)) % CLASSES)


def shares(names: list[str]) -> dict[str, float]:
    counts = Counter(names)
    return {m: n / len(names) for m, n in counts.items()}


# ---------------------------------------------------------------- learning


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exp3_converges_to_the_better_model(seed):
    rng = np.random.default_rng(100 + seed)
    policy = make_policy("exp3", seed=seed)
    accuracy = {"poor": 0.6, "good": 0.9}
    models = ["poor", "good"]
    chosen = []
    for _ in range(2000):
        y = int(rng.integers(CLASSES))
        sel = policy.select(models)
        assert sel.send_to == sel.answer_from and len(sel.answer_from) == 1 and not sel.wait_all
        m = sel.answer_from[0]
        chosen.append(m)
        policy.feedback({m: answer_of(y, accuracy[m], rng)}, y, selection=sel)
    assert shares(chosen[1000:])["good"] > 0.7
    p_poor, p_good = policy.probabilities(models)
    assert p_good > 0.85 and p_poor >= policy.gamma / 2  # exploration never stops
    d = policy.describe()
    assert d["models"]["good"]["mean_loss"] == pytest.approx(0.1, abs=0.03)
    assert d["models"]["good"]["weight"] > 0.9


def test_exp3_learns_without_the_selection_too():
    rng = np.random.default_rng(5)
    policy = make_policy("exp3", seed=5)
    accuracy = {"a": 0.3, "b": 0.95}
    for _ in range(1500):
        y = int(rng.integers(CLASSES))
        m = policy.select(["a", "b"]).answer_from[0]
        policy.feedback({m: answer_of(y, accuracy[m], rng)}, y)
    assert policy.weights()["b"] > 0.9


def test_exp4_weights_move_to_the_accurate_model_and_the_ensemble_beats_its_worst_member():
    rng = np.random.default_rng(7)
    policy = make_policy("exp4", seed=7)
    accuracy = {"m60": 0.6, "m70": 0.7, "m90": 0.9}
    models = list(accuracy)
    right = Counter()
    for t in range(1500):
        y = int(rng.integers(CLASSES))
        sel = policy.select(models)
        assert sel.send_to == models and sel.answer_from == models and sel.wait_all
        answers = {m: answer_of(y, accuracy[m], rng) for m in models}
        c = policy.combine(answers, sel.answer_from)
        assert c.answered == models and c.missing == []
        if t >= 1000:
            right["ensemble"] += c.output == y
            for m in models:
                right[m] += answers[m] == y
        policy.feedback(answers, y, selection=sel)
    w = policy.weights()
    assert w["m90"] > 0.95 and w["m60"] <= w["m70"] < 0.05
    assert right["ensemble"] / 500 >= right["m60"] / 500 + 0.2
    assert right["ensemble"] >= right["m90"] - 10  # as good as the best member, give or take
    assert policy.describe()["combined"]["feedback"] == 1500


def test_exp4_on_numbers_weights_the_precise_model_and_averages():
    rng = np.random.default_rng(11)
    policy = make_policy("ensemble", scale=1.0)
    noise = {"sharp": 0.1, "blurry": 1.0, "wild": 3.0}
    models = list(noise)
    errors = {m: [] for m in [*models, "ensemble"]}
    for t in range(600):
        y = float(rng.uniform(-10, 10))
        answers = {m: y + float(rng.normal(0, s)) for m, s in noise.items()}
        c = policy.combine(answers, models)
        assert isinstance(c.output, float) and c.model is None
        if t >= 300:
            for m in models:
                errors[m].append((answers[m] - y) ** 2)
            errors["ensemble"].append((c.output - y) ** 2)
        policy.feedback(answers, y)
    mse = {m: float(np.mean(e)) for m, e in errors.items()}
    assert policy.weights()["sharp"] > 0.9
    assert mse["ensemble"] < mse["wild"] / 10
    assert mse["ensemble"] < 2 * mse["sharp"]


@pytest.mark.parametrize("name", ["exp3", "exp4"])
def test_each_context_learns_its_own_preference(name):
    # alice is always right with model a, bob with model b; anonymous traffic sees both half right
    rng = np.random.default_rng(3)
    policy = make_policy(name, seed=3)
    models = ["a", "b"]
    for t in range(2400):
        user = ("alice", "bob")[t % 2]
        y = int(rng.integers(CLASSES))
        right = "a" if user == "alice" else "b"
        sel = policy.select(models, user)
        answers = {m: (y if m == right else (y + 1) % CLASSES) for m in sel.answer_from}
        policy.feedback(answers, y, user, selection=sel)
    assert policy.weights("alice")["a"] > 0.9
    assert policy.weights("bob")["b"] > 0.9
    assert 0.1 < policy.weights()["a"] < 0.9
    assert policy.weights("carol") == policy.weights()  # no table of her own: the app-wide one
    assert policy.describe()["contexts"] == 2


def test_weights_stay_finite_and_bounded_after_long_one_sided_feedback():
    policy = make_policy("exp4", eta=5.0)
    for _ in range(10_000):
        policy.feedback({"a": "x", "b": "y"}, "x")
    log = policy.state()["log_weights"]
    assert log["a"] == 0.0 and log["b"] == -MAX_LOG_RATIO
    # and a model that gets better is trusted again in bounded time
    for _ in range(int(MAX_LOG_RATIO / 5.0) + 2):
        policy.feedback({"a": "x", "b": "y"}, "y")
    assert policy.weights()["b"] > 0.5


# ---------------------------------------------------------------- single, weighted, shadow


def test_single_answers_from_its_model():
    policy = make_policy("single", model="v2")
    sel = policy.select(["v1", "v2"])
    assert sel.send_to == ["v2"] and sel.answer_from == ["v2"] and not sel.wait_all
    assert policy.select(["v1"]).answer_from == ["v1"]  # its model was unlinked: the first linked
    assert make_policy("single").select(["x", "y"]).answer_from == ["x"]
    c = policy.combine({"v2": "cat"}, ["v2"])
    assert c == Combined("cat", 1.0, ["v2"], [], "v2")
    assert not policy.use_default(c)
    assert not policy.learns
    with pytest.raises(ValueError, match="no model"):
        policy.select([])


def test_weighted_split_holds_its_ratios_with_and_without_a_context_key():
    weights = {"v1": 70, "v2": 20, "v3": 10}
    policy = make_policy("weighted", weights=weights, seed=4)
    models = list(weights)
    drawn = shares([policy.select(models).answer_from[0] for _ in range(10_000)])
    keyed = shares([policy.select(models, f"user-{i}").answer_from[0] for i in range(10_000)])
    for m, w in weights.items():
        assert drawn[m] == pytest.approx(w / 100, abs=0.015), (m, drawn)
        assert keyed[m] == pytest.approx(w / 100, abs=0.015), (m, keyed)
    assert policy.shares(models) == pytest.approx({"v1": 0.7, "v2": 0.2, "v3": 0.1})
    # a key keeps its model, across queries and across a restart
    again = Policy.from_state(json.loads(json.dumps(policy.state())))
    for i in range(200):
        first = policy.select(models, f"user-{i}").answer_from
        assert all(policy.select(models, f"user-{i}").answer_from == first for _ in range(3))
        assert again.select(models, f"user-{i}").answer_from == first
    assert policy.describe()["models"]["v1"]["served"] > 0


def test_weighted_keys_move_as_little_as_possible():
    users = [f"user-{i}" for i in range(5000)]
    canary = make_policy("weighted", weights={"stable": 95, "canary": 5})
    models = ["stable", "canary"]
    before = {u: canary.select(models, u).answer_from[0] for u in users}
    grown = canary.reconfigure(weights={"stable": 80, "canary": 20})
    after = {u: grown.select(models, u).answer_from[0] for u in users}
    assert all(after[u] == "canary" for u in users if before[u] == "canary")  # canary users stay
    assert shares(list(after.values()))["canary"] == pytest.approx(0.2, abs=0.02)
    # linking a model without a weight sends it nothing; unlinking one moves only its users
    assert {grown.select([*models, "new"], u).answer_from[0] for u in users} == set(models)
    gone = {u: grown.select(["stable"], u).answer_from[0] for u in users}
    assert all(gone[u] == "stable" for u in users)
    assert grown.figures["stable"].served > 0  # figures survive a reconfigure


def test_weighted_falls_back_to_an_equal_split_when_no_linked_model_weighs_anything():
    policy = make_policy("weighted", weights={"a": 1, "b": 0}, seed=0)
    drawn = shares([policy.select(["b", "c"]).answer_from[0] for _ in range(4000)])
    assert drawn["b"] == pytest.approx(0.5, abs=0.04)
    even = make_policy("weighted", seed=0)  # no weights: all linked models share equally
    assert even.shares(["a", "b", "c", "d"]) == pytest.approx(dict.fromkeys("abcd", 0.25))


def test_shadow_never_answers():
    policy = make_policy("shadow", primary="prod")
    models = ["cand1", "prod", "cand2"]
    for i in range(500):
        sel = policy.select(models, f"user-{i}")
        assert sel.send_to == ["prod", "cand1", "cand2"]
        assert sel.answer_from == ["prod"] and not sel.wait_all
    answers = {"prod": "cat", "cand1": "dog", "cand2": "dog"}
    c = policy.combine(answers, sel.answer_from)
    assert c.output == "cat" and c.answered == ["prod"] and c.confidence == 1.0
    policy.record_shadow("cat", {"cand1": "dog", "cand2": "cat"})
    policy.record_shadow("cat", {"cand2": "cat"}, missing=["cand1"])
    policy.record_shadow(1.0, {"cand1": -1.0, "cand2": 1.0})
    d = policy.describe()["models"]
    assert d["cand1"]["compared"] == 2 and d["cand1"]["agreement"] == 0.0 and d["cand1"]["missing"] == 1
    assert d["cand2"]["compared"] == 3 and d["cand2"]["agreement"] == 1.0
    assert d["prod"]["served"] == 500 and "compared" not in d["prod"]
    only = make_policy("shadow", shadows=["cand2"]).select(models)
    assert only.send_to == ["cand1", "cand2"] and only.answer_from == ["cand1"]
    assert make_policy("shadow", primary="gone").select(["x"]).send_to == ["x"]


# ---------------------------------------------------------------- combination and confidence


def test_weighted_majority_vote():
    asked = ["a", "b", "c"]
    answers = {"a": "cat", "b": "dog", "c": "dog"}
    c = combine_answers(answers, asked, {"a": 0.6, "b": 0.2, "c": 0.2})
    assert c.output == "cat" and c.model == "a" and c.confidence == pytest.approx(0.6)
    c = combine_answers(answers, asked)
    assert c.output == "dog" and c.model == "b" and c.confidence == pytest.approx(2 / 3)
    c = combine_answers(answers, asked, {"a": 0.1, "b": 0.2, "c": 0.5})
    assert c.model == "c"  # the heaviest voter for the winner
    assert combine_answers({"a": "x", "b": "y"}, ["a", "b"]).output == "x"  # a tie: first asked
    assert combine_answers({"a": "x", "b": "y"}, ["b", "a"]).output == "y"
    # zero weights for all who answered: they count equally
    assert combine_answers(answers, asked, {"a": 0.0}).output == "dog"


def test_what_is_a_label_and_what_is_a_number():
    ints = combine_answers({"a": 1, "b": 2, "c": 2}, ["a", "b", "c"])
    assert ints.output == 2  # integers are labels: a vote, not the mean 1.67
    assert combine_answers({"a": True, "b": 1, "c": 1}, ["a", "b", "c"]).output == 1  # bool is not int
    same = combine_answers({"a": np.array([3]), "b": np.int64(3), "c": 3}, ["a", "b", "c"])
    assert same.confidence == 1.0
    mixed = combine_answers({"a": 1.0, "b": "cat", "c": "cat"}, ["a", "b", "c"])
    assert mixed.output == "cat"  # not all numbers: a vote
    js = combine_answers({"a": {"k": [1, 2]}, "b": {"k": [1, 2]}, "c": {"k": 3}}, ["a", "b", "c"])
    assert js.output == {"k": [1, 2]} and js.confidence == pytest.approx(2 / 3)


def test_weighted_mean_and_its_confidence():
    c = combine_answers({"a": 1.0, "b": 3.0}, ["a", "b"], {"a": 3.0, "b": 1.0})
    # mean 1.5; spread^2 = .75*.25 + .25*2.25 = .75; rms^2 = .75*1 + .25*9 = 3
    assert c.output == pytest.approx(1.5) and c.model is None
    assert c.confidence == pytest.approx(0.5)
    zero_d = combine_answers({"a": np.array(1.0), "b": np.array(3.0)}, ["a", "b"], {"a": 3.0, "b": 1.0})
    assert zero_d.output.shape == () and zero_d.output == pytest.approx(1.5)  # the array path agrees
    assert zero_d.confidence == pytest.approx(0.5)
    assert combine_answers({"a": 2.0, "b": -2.0}, ["a", "b"]).confidence == pytest.approx(0.0)
    assert combine_answers({"a": 0.0, "b": 0.0}, ["a", "b"]).confidence == 1.0
    arrays = {m: np.array([[1.0, 2.0]], dtype=np.float32) for m in "ab"}
    c = combine_answers(arrays, ["a", "b"])
    assert c.output.dtype == np.float32 and c.output.shape == (1, 2) and c.confidence == pytest.approx(1.0)
    c = combine_answers({"a": [1.0, 2.0], "b": [3, 4.0]}, ["a", "b"])
    assert c.output == pytest.approx([2.0, 3.0]) and isinstance(c.output, list)
    c = combine_answers({"a": np.float32(2.0), "b": np.float32(4.0)}, ["a", "b"])
    assert isinstance(c.output, np.float32) and c.output == 3.0
    shapes = combine_answers({"a": np.zeros(2), "b": np.zeros(3)}, ["a", "b"])
    assert shapes.answered == ["a", "b"]  # shapes differ: a vote, still an answer
    rng = np.random.default_rng(0)
    for _ in range(200):  # always in [0, 1]
        vals = {m: rng.normal(rng.normal(), rng.exponential(), size=3) for m in "abc"}
        w = dict(zip("abc", rng.random(3), strict=True))
        assert 0.0 <= combine_answers(vals, ["a", "b", "c", "d"], w).confidence <= 0.75


def test_confidence_scales_with_the_share_that_answered():
    asked = ["a", "b", "c", "d"]
    assert combine_answers(dict.fromkeys(asked, "cat"), asked).confidence == 1.0
    c = combine_answers({"a": "cat", "b": "cat"}, asked)
    assert c.confidence == pytest.approx(0.5) and c.answered == ["a", "b"] and c.missing == ["c", "d"]
    c = combine_answers({"a": "cat", "b": "cat", "c": "dog"}, asked)
    assert c.confidence == pytest.approx(2 / 3 * 3 / 4)
    c = combine_answers({"a": 5.0, "b": 5.0}, asked)
    assert c.confidence == pytest.approx(0.5)
    c = combine_answers({"z": "ignored"}, asked)  # answers from models not asked do not count
    assert c == Combined(None, 0.0, [], asked)


def test_min_confidence_decides_when_the_default_is_returned():
    asked = ["a", "b", "c"]
    split = combine_answers({"a": "x", "b": "x", "c": "y"}, asked)  # 2/3
    assert not needs_default(split)
    assert needs_default(split, 0.7) and not needs_default(split, 0.6)
    assert needs_default(combine_answers({}, asked))  # nothing answered: always the default
    strict = make_policy("exp4", min_confidence=0.9)
    assert strict.use_default(strict.combine({"a": "x", "b": "x", "c": "y"}, asked))
    assert not strict.use_default(strict.combine({"a": "x", "b": "x", "c": "x"}, asked))
    assert strict.use_default(strict.combine({"a": "x", "b": "x"}, asked))  # a member missing


def test_loss_and_agreement():
    assert loss("cat", "cat") == 0.0 and loss("cat", "dog") == 1.0
    assert loss(3, 3.0) == 0.0 and loss(True, 1) == 1.0
    assert loss(2.0, 2) == 0.0
    assert loss(3.0, 2.0) == pytest.approx(1 / (1 + 4))  # relative to the label's size
    assert loss(3.0, 2.0, scale=1.0) == pytest.approx(0.5)  # an error of one scale costs half
    assert loss(0.5, 0) == 1.0 and loss(0.0, 0) == 0.0
    assert loss(np.array([1.0, 2.0]), [1, 2]) == 0.0
    assert 0.0 < loss(np.array([1.0, 2.0]), [1, 3]) < 1.0
    assert loss(float("nan"), 1.0) == 1.0
    assert agreement("a", "a") == 1.0 and agreement("a", "b") == 0.0
    assert agreement(1.0, -1.0) == pytest.approx(0.0) and agreement(10.0, 10.0) == 1.0
    assert 0.9 < agreement(10.0, 10.5) < 1.0


# ---------------------------------------------------------------- model list changes


def test_exp3_follows_the_linked_models():
    rng = np.random.default_rng(1)
    policy = make_policy("exp3", seed=1)
    for _ in range(300):
        y = int(rng.integers(CLASSES))
        sel = policy.select(["a", "b"])
        m = sel.answer_from[0]
        policy.feedback({m: answer_of(y, {"a": 0.9, "b": 0.2}[m], rng)}, y, selection=sel)
    before = policy.weights()
    w = {m: np.exp(v) for m, v in policy.state()["log_weights"].items()}
    sel = policy.select(["a", "b", "c"])
    assert sum(sel.probabilities.values()) == pytest.approx(1.0)
    mean = (w["a"] + w["b"]) / 2  # a newly linked model gets the mean weight
    assert policy.weights()["c"] == pytest.approx(mean / (w["a"] + w["b"] + mean))
    assert policy.weights()["a"] < before["a"]
    assert all(policy.select(["a", "c"]).answer_from[0] != "b" for _ in range(200))
    assert "b" not in policy.weights()
    policy.feedback({"b": 1}, 1)  # a late answer of the unlinked model breaks nothing


def test_exp4_combines_over_a_changed_model_list():
    policy = make_policy("exp4", weights={"a": 1.0, "b": 1.0})
    for _ in range(50):
        policy.feedback({"a": "x", "b": "y"}, "x")
    c = policy.combine({"a": "x", "b": "y", "c": "y"}, ["a", "b", "c"])
    w = policy.weights()
    assert w["c"] == pytest.approx((w["a"] + w["b"]) / 2)
    assert c.output == "x"  # a carries more than b and the newcomer together
    assert policy.combine({"b": "y", "c": "z"}, ["b", "c"]).answered == ["b", "c"]
    assert set(policy.weights()) == {"b", "c"}


# ---------------------------------------------------------------- state


def _train(policy: Policy, rng: np.random.Generator, rounds: int, users: int) -> None:
    models = ["a", "b", "c"]
    accuracy = {"a": 0.5, "b": 0.8, "c": 0.65}
    for t in range(rounds):
        user = f"u{t % users}" if t % 3 else ""
        y = int(rng.integers(CLASSES))
        sel = policy.select(models, user)
        answers = {m: answer_of(y, accuracy[m], rng) for m in sel.answer_from}
        policy.combine(answers, sel.answer_from, user)
        policy.feedback(answers, y, user, selection=sel)


@pytest.mark.parametrize("name", ["exp3", "exp4", "ensemble", "weighted", "shadow", "single"])
def test_state_round_trip_gives_identical_choices(name):
    options = {"weights": {"a": 2, "b": 1, "c": 1}} if name == "weighted" else {}
    policy = make_policy(name, min_confidence=0.25, **options)
    _train(policy, np.random.default_rng(2), 600, users=20)
    state = json.loads(json.dumps(policy.state()))  # JSON all the way
    again = Policy.from_state(state, rng=np.random.default_rng(9))
    assert type(again) is type(policy) and again.name == name
    assert again.state() == state and again.describe() == policy.describe()
    policy.rng = np.random.default_rng(9)
    rng = np.random.default_rng(4)
    for t in range(300):
        user = f"u{t % 30}"  # some known contexts, some new
        sel = policy.select(["a", "b", "c"], user)
        assert again.select(["a", "b", "c"], user) == sel
        answers = {m: int(rng.integers(CLASSES)) for m in sel.answer_from}
        assert again.combine(answers, sel.answer_from, user) == policy.combine(answers, sel.answer_from, user)


def test_contexts_are_bounded_least_recently_used_first():
    policy = make_policy("exp4", max_contexts=3)
    for user in ["u1", "u2", "u3"]:
        policy.feedback({"a": "x", "b": "y"}, "x", user)
    policy.combine({"a": "x"}, ["a", "b"], "u1")  # u1 is used again: u2 is now the oldest
    policy.feedback({"a": "x", "b": "y"}, "y", "u4")
    assert [k for k, _ in policy.state()["contexts"]] == ["u3", "u1", "u4"]
    restored = Exp4.from_state(policy.state())
    assert list(restored.contexts) == ["u3", "u1", "u4"]
    smaller = restored.reconfigure(max_contexts=2)
    assert list(smaller.contexts) == ["u1", "u4"]
    no_contexts = make_policy("exp3", max_contexts=0)
    no_contexts.feedback({"a": "x"}, "x", "u1")
    assert no_contexts.state()["contexts"] == []


def test_from_state_refuses_what_it_cannot_read():
    with pytest.raises(ValueError, match="version"):
        Policy.from_state({"version": 99, "policy": "exp3"})
    with pytest.raises(ValueError, match="unknown policy"):
        Policy.from_state({"version": 1, "policy": "magic"})
    with pytest.raises(ValueError, match="not a 'exp3'"):
        Exp3.from_state(make_policy("exp4").state())
    with pytest.raises(ValueError, match="malformed"):
        Policy.from_state({"version": 1, "policy": "exp4", "figures": {"a": {"nope": 1}}})
    assert isinstance(Exp4.from_state(make_policy("ensemble").state()), Exp4)


# ---------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("magic", {}, "unknown policy 'magic'"),
        ("exp3", {"gamma": 0}, "gamma"),
        ("exp3", {"gamma": 1.5}, "gamma"),
        ("exp3", {"gamma": "0.1"}, "gamma"),
        ("exp3", {"max_contexts": -1}, "max_contexts"),
        ("exp4", {"eta": -0.1}, "eta"),
        ("exp4", {"eta": float("inf")}, "eta"),
        ("weighted", {"weights": {"a": -1, "b": 2}}, "weights"),
        ("weighted", {"weights": {"a": 0, "b": 0}}, "above 0"),
        ("weighted", {"weights": {}}, "weights"),
        ("weighted", {"weights": [1, 2]}, "weights"),
        ("weighted", {"gamma": 0.1}, "takes no option 'gamma'"),
        ("single", {"min_confidence": 1.5}, "min_confidence"),
        ("single", {"model": 3}, "model"),
        ("shadow", {"shadows": "b"}, "shadows"),
        ("exp4", {"scale": 0}, "scale"),
        ("exp3", {"seed": -1}, "seed"),
    ],
)
def test_make_policy_rejects_nonsense(name, options, match):
    with pytest.raises(ValueError, match=match):
        make_policy(name, **options)


def test_make_policy_builds_each_kind_and_describes_it():
    kinds = {
        "single": "Single",
        "weighted": "Weighted",
        "shadow": "Shadow",
        "exp3": "Exp3",
        "exp4": "Exp4",
        "ensemble": "Ensemble",
    }
    for name, cls in kinds.items():
        policy = make_policy(name, seed=1)
        assert type(policy).__name__ == cls and policy.name == name
        json.dumps(policy.describe())
    assert isinstance(make_policy("weighted"), Weighted) and isinstance(make_policy("shadow"), Shadow)
    p = make_policy("exp3", gamma=0.3)
    assert p.options() == {"gamma": 0.3} and p.describe()["options"]["gamma"] == 0.3
    assert p.reconfigure(gamma=0.5).gamma == 0.5
