"""The policy engine's semantics: every condition, the compositions, ordering, feedback, limits."""

from __future__ import annotations

import random
import textwrap

import pytest

from edgecatch.observation import Classification, Detection, Observation, Verdict
from edgecatch.policies import EngineState, PolicySet, load_policy_text

T0 = 1_795_132_800.0  # 2026-11-20T00:00:00Z


def policy_set(yaml_text: str, seed: int = 0) -> PolicySet:
    document = load_policy_text(textwrap.dedent(yaml_text), "test.yaml")
    return PolicySet(document, state=EngineState(rng=random.Random(seed)), clock=lambda: T0)


def one_policy(body: str, **kw) -> PolicySet:
    """A document with a single policy named `p` whose body is `body` (YAML, indented under it)."""
    body = textwrap.indent(textwrap.dedent(body).strip(), "    ")
    return policy_set(f"version: 1\npolicies:\n  - name: p\n{body}\n", **kw)


def det(name: str, confidence: float, class_id: int = 0) -> Detection:
    return Detection(name, confidence, (10.0, 10.0, 50.0, 50.0), class_id)


def detections(*pairs: tuple[str, float], model: str = "m") -> Observation:
    return Observation(model=model, detections=tuple(det(n, c) for n, c in pairs))


def classification(model: str = "clf", **scores: float) -> Observation:
    return Observation(model=model, classification=Classification.from_scores(scores))


def holds(policies: PolicySet, observation: Observation) -> bool:
    return "p" in policies.evaluate(observation, now=T0).matched


# -- single conditions ------------------------------------------------------------------------


def test_confidence_below_counts_detections_under_the_threshold():
    p = one_policy("confidence_below: 0.5")
    assert holds(p, detections(("box", 0.9), ("box", 0.4)))
    assert not holds(p, detections(("box", 0.9), ("box", 0.5)))  # strictly below
    assert not holds(p, detections())


def test_confidence_above_and_between():
    above = one_policy("confidence_above: 0.9")
    assert holds(above, detections(("box", 0.95)))
    assert not holds(above, detections(("box", 0.9)))
    between = one_policy("confidence_between: [0.3, 0.6]")
    assert holds(between, detections(("box", 0.3)))  # inclusive
    assert holds(between, detections(("box", 0.6)))
    assert not holds(between, detections(("box", 0.61), ("box", 0.29)))


def test_classes_restrict_which_detections_count_and_min_matches():
    p = one_policy("""
        classes: [flat_pack]
        confidence_between: [0.3, 0.6]
        min_matches: 2
    """)
    assert not holds(p, detections(("flat_pack", 0.4), ("box", 0.4)))
    assert holds(p, detections(("flat_pack", 0.4), ("flat_pack", 0.5), ("box", 0.9)))
    assert not holds(p, detections(("flat_pack", 0.4), ("flat_pack", 0.7)))
    decision = p.evaluate(detections(("flat_pack", 0.4), ("flat_pack", 0.5)), now=T0)
    assert decision.reasons["p"] == "2 detections of flat_pack with confidence in [0.3, 0.6]"


def test_classes_alone_means_at_least_one_detection_of_those_classes():
    p = one_policy("classes: [person, cat]")
    assert holds(p, detections(("cat", 0.99)))
    assert not holds(p, detections(("dog", 0.99)))


def test_detection_count_bounds_count_listed_classes_or_all():
    nothing = one_policy("detections: {max: 0}")
    assert holds(nothing, detections())
    assert not holds(nothing, detections(("box", 0.2)))
    crowded = one_policy("detections: {min: 3}")
    assert holds(crowded, detections(("a", 0.9), ("b", 0.9), ("c", 0.9)))
    assert not holds(crowded, detections(("a", 0.9), ("b", 0.9)))
    no_person = one_policy("""
        classes: [person]
        detections: {max: 0}
    """)
    assert holds(no_person, detections(("car", 0.9)))  # cars do not count
    assert not holds(no_person, detections(("person", 0.9)))
    band = one_policy("detections: {min: 2, max: 3}")
    assert [holds(band, detections(*[("x", 0.5)] * n)) for n in range(5)] == [False, False, True, True, False]


def test_detection_count_never_holds_for_a_classification():
    p = one_policy("detections: {max: 0}")
    assert not holds(p, classification(cat=0.9, dog=0.1))


def test_classification_confidence_and_classes_look_at_the_top_class():
    p = one_policy("""
        classes: [cat]
        confidence_below: 0.6
    """)
    assert holds(p, classification(cat=0.55, dog=0.45))
    assert not holds(p, classification(dog=0.55, cat=0.45))  # top class is dog
    assert not holds(p, classification(cat=0.8, dog=0.2))
    decision = p.evaluate(classification(cat=0.55, dog=0.45), now=T0)
    assert decision.reasons["p"] == "top class cat at 0.55 (confidence < 0.6)"


def test_margin_below_is_top1_minus_top2():
    p = one_policy("margin_below: 0.1")
    assert holds(p, classification(a=0.45, b=0.40, c=0.15))
    assert not holds(p, classification(a=0.60, b=0.40))
    assert not holds(p, detections(("a", 0.5)))  # classification only


def test_entropy_above_in_bits():
    p = one_policy("entropy_above: 1.5")
    assert holds(p, classification(a=0.25, b=0.25, c=0.25, d=0.25))  # 2 bits
    assert not holds(p, classification(a=0.5, b=0.5))  # 1 bit
    assert not holds(p, detections(("a", 0.5)))


def test_random_draws_independently_at_the_given_rate():
    p = one_policy("random: 0.1", seed=42)
    hits = sum(holds(p, detections(("box", 0.9))) for _ in range(20_000))
    assert 1800 < hits < 2200  # 10% of 20,000; 4.7 standard deviations either side
    assert not any(holds(one_policy("random: 0.0"), detections()) for _ in range(1000))
    assert all(holds(one_policy("random: 1.0"), detections()) for _ in range(1000))


def every_nth_phase(pattern: list[bool], n: int) -> int:
    """The index of the first selection, after checking the pattern is one selection every n."""
    first = pattern.index(True)
    assert first < n and pattern == [i % n == first for i in range(len(pattern))], pattern
    return first


def test_every_nth_counts_per_policy_and_model_from_a_random_phase():
    # Each counter starts at a phase drawn from the state's random source, so replicas that each
    # keep every nth prediction do not keep the same ones.
    phases = set()
    for seed in range(30):
        p = one_policy("every_nth: 3", seed=seed)
        a, b = [], []
        for _ in range(9):  # interleaved: each model has its own counter
            a.append(holds(p, detections(model="a")))
            b.append(holds(p, detections(model="b")))
        phases.add((every_nth_phase(a, 3), every_nth_phase(b, 3)))
    assert {a for a, _ in phases} == {0, 1, 2}
    assert any(a != b for a, b in phases)


def test_every_nth_counts_only_predictions_its_block_accepts():
    sequence = [0.9, 0.4, 0.9, 0.4, 0.9, 0.4, 0.4]
    seen = set()
    for seed in range(20):
        p = one_policy("""
            confidence_below: 0.5
            every_nth: 2
        """, seed=seed)
        selected = [i for i, c in enumerate(sequence) if holds(p, detections(("box", c)))]
        assert selected in ([1, 5], [3, 6])  # every second one of the 0.4s at indexes 1, 3, 5, 6
        seen.add(tuple(selected))
    assert len(seen) == 2


def test_sample_keeps_a_fraction_of_the_matches():
    p = one_policy("""
        confidence_below: 0.5
        sample: 0.25
    """, seed=3)
    decisions = [p.evaluate(detections(("box", 0.1)), now=T0) for _ in range(8000)]
    assert all("p" in d.matched for d in decisions)
    kept = sum(d.selected for d in decisions)
    assert 1800 < kept < 2200
    assert all(d.sampled_out == ("p",) for d in decisions if not d.selected)


# -- composition ------------------------------------------------------------------------------


def test_conditions_of_a_block_all_hold_together():
    p = one_policy("""
        confidence_below: 0.5
        detections: {min: 2}
    """)
    assert holds(p, detections(("a", 0.4), ("b", 0.9)))
    assert not holds(p, detections(("a", 0.4)))
    assert not holds(p, detections(("a", 0.9), ("b", 0.9)))


def test_any_of_all_of_not():
    p = one_policy("""
        any_of:
          - {confidence_below: 0.2}
          - all_of:
              - {classes: [flat_pack]}
              - {confidence_below: 0.5}
        not: {detections: {min: 10}}
    """)
    assert holds(p, detections(("box", 0.1)))
    assert holds(p, detections(("flat_pack", 0.4)))
    assert not holds(p, detections(("box", 0.4)))
    assert not holds(p, detections(*[("box", 0.1)] * 10))  # excluded by not
    reason = p.evaluate(detections(("box", 0.1)), now=T0).reasons["p"]
    assert reason == "1 detection of any class with confidence < 0.2; not {detections: {min: 10}}"


def test_nested_blocks_inherit_classes():
    p = one_policy("""
        classes: [person]
        detections: {min: 1}
        any_of:
          - {confidence_below: 0.3}
          - {confidence_above: 0.95}
    """)
    assert holds(p, detections(("person", 0.2)))
    assert holds(p, detections(("person", 0.97)))
    assert not holds(p, detections(("person", 0.5), ("car", 0.1)))  # the car is not a person


# -- models, feedback, ordering ---------------------------------------------------------------


def test_models_glob():
    p = one_policy("""
        models: ["package-*", "exact"]
        random: 1.0
    """)
    assert holds(p, detections(model="package-detector"))
    assert holds(p, detections(model="exact"))
    assert not holds(p, detections(model="people-detector"))


FEEDBACK = """
version: 1
policies:
  - name: low
    confidence_below: 0.5
  - name: wrong
    feedback: incorrect
  - name: right-cats
    feedback: correct
    classes: [cat]
  - name: silent
    feedback: silent
"""


@pytest.mark.parametrize(
    ("verdict", "expected"),
    [(None, ("low",)), (Verdict.INCORRECT, ("wrong",)), (Verdict.CORRECT, ("right-cats",)),
     (Verdict.SILENT, ("silent",))],
)
def test_feedback_policies_match_only_feedback_events_with_their_verdict(verdict, expected):
    p = policy_set(FEEDBACK)
    observation = Observation(model="m", detections=(det("cat", 0.3),), feedback=verdict)
    assert p.evaluate(observation, now=T0).matched == expected


def test_a_feedback_policy_gives_the_verdict_as_its_reason():
    """The manifest's `reason` says why a sample was collected: "always" said nothing."""
    p = policy_set(FEEDBACK)
    cat = det("cat", 0.3)
    wrong = p.evaluate(Observation(model="m", detections=(cat,), feedback=Verdict.INCORRECT), now=T0)
    right = p.evaluate(Observation(model="m", detections=(cat,), feedback=Verdict.CORRECT), now=T0)
    assert wrong.reasons == {"wrong": "verdict incorrect"}
    assert right.reasons["right-cats"].startswith("verdict correct; ") and "cat" in right.reasons["right-cats"]


def test_feedback_policy_conditions_apply_to_the_recalled_prediction():
    p = policy_set(FEEDBACK)
    dog = Observation(model="m", detections=(det("dog", 0.9),), feedback=Verdict.CORRECT)
    assert not p.evaluate(dog, now=T0).matched


ORDERED = """
version: 1
tags: [production]
batch: "{model}-{date}-{week}-{month}"
policies:
  - name: first
    confidence_below: 0.5
    tags: [low]
  - name: second
    classes: [box]
    tags: [boxes, low]
  - name: third
    classes: [cat]
    tags: [cats]
"""


def test_first_holding_policy_selects_and_tags_of_every_holding_policy_apply():
    p = policy_set(ORDERED)
    decision = p.evaluate(detections(("box", 0.3)), now=T0)
    assert decision.selected and decision.policy == "first"
    assert decision.matched == ("first", "second")
    assert decision.tags == ("production", "low", "boxes")
    assert decision.batch == "m-2026-11-20-2026-W47-2026-11"
    assert set(decision.reasons) == {"first", "second"}


def test_nothing_held_means_not_selected():
    decision = policy_set(ORDERED).evaluate(detections(("dog", 0.9)), now=T0)
    assert not decision.selected and decision.policy is None and decision.matched == ()
    assert decision.batch == ""


def test_disabled_policy_is_skipped():
    p = one_policy("""
        random: 1.0
        enabled: false
    """)
    assert not holds(p, detections())


# -- limits -----------------------------------------------------------------------------------


LIMITED = """
version: 1
limits: {per_hour: 5}
policies:
  - name: a
    classes: [a]
    limits: {per_minute: 2}
  - name: b
    classes: [a, b]
"""


def test_policy_limit_is_a_rolling_window_and_next_policy_takes_over():
    p = policy_set(LIMITED)
    obs = detections(("a", 0.9))
    first = [p.evaluate(obs, now=T0 + i) for i in range(3)]
    assert [d.policy for d in first] == ["a", "a", "b"]
    assert first[2].limited == ("a",)
    assert first[2].selected and first[2].matched == ("a", "b")
    # At T0+59 the window (T0-1, T0+59] still holds both selections of a.
    assert p.evaluate(obs, now=T0 + 59.0).policy == "b"
    # At T0+60 the selection made at T0 has left the window; the one at T0+1 has not.
    assert p.evaluate(obs, now=T0 + 60.0).policy == "a"
    assert p.evaluate(obs, now=T0 + 60.5).limited == ("a", "b")  # global budget of 5 spent


def test_no_double_burst_at_a_calendar_boundary():
    p = one_policy("""
        random: 1.0
        limits: {per_hour: 10}
    """)
    boundary = T0 + 3600  # a calendar-hour boundary
    before = sum(p.evaluate(detections(), now=boundary - 1 - i * 0.01).selected for i in range(10))
    after = sum(p.evaluate(detections(), now=boundary + 1 + i * 0.01).selected for i in range(10))
    assert (before, after) == (10, 0)
    assert p.evaluate(detections(), now=boundary + 3599).selected  # the first ones have rolled out


def test_global_limit_counts_all_policies_together():
    p = policy_set(LIMITED)
    selections = [p.evaluate(detections(("b", 0.9)), now=T0 + i).selected for i in range(7)]
    assert selections == [True] * 5 + [False] * 2
    decision = p.evaluate(detections(("b", 0.9)), now=T0 + 3600)
    assert decision.selected  # the hour has rolled


def test_sampled_out_matches_do_not_spend_budget():
    p = one_policy("""
        random: 1.0
        sample: 0.0
        limits: {per_minute: 1}
    """)
    decision = p.evaluate(detections(), now=T0)
    assert decision.sampled_out == ("p",) and not decision.limited
    assert p.state.limiter.used("p", 60.0, T0) == 0


def test_limits_survive_a_new_policy_set_sharing_the_state():
    first = policy_set(LIMITED)
    for i in range(2):
        first.evaluate(detections(("a", 0.9)), now=T0 + i)
    reloaded = PolicySet(first.document, state=first.state)
    assert reloaded.evaluate(detections(("a", 0.9)), now=T0 + 2).limited == ("a",)


def test_zero_budget_limits_every_match():
    p = one_policy("""
        random: 1.0
        limits: {per_day: 0}
    """)
    decision = p.evaluate(detections(), now=T0)
    assert not decision.selected and decision.limited == ("p",)


def test_the_example_document_from_the_issue_evaluates(example_policy_path):
    from edgecatch.policies import load_policy_file

    p = PolicySet(load_policy_file(example_policy_path), state=EngineState(rng=random.Random(1)))
    crowd = Observation(model="package-detector",
                        detections=tuple(det("flat_pack" if i % 3 else "box", 0.31 + 0.01 * i) for i in range(20)))
    decision = p.evaluate(crowd, now=T0)
    assert decision.selected
    assert {"flat-packs-near-threshold", "crowded", "low-confidence"} <= set(decision.matched)
    clf = p.evaluate(classification(a=0.46, b=0.44, c=0.1), now=T0)
    assert clf.policy == "uncertain-classifier"
