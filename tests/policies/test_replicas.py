"""every_nth and random across replicas: no two processes select in step.

Real forked processes (BentoML and pre-forking servers fork workers from a parent that may already
have built its policies): each must draw its own random numbers and count from its own phase.
"""

from __future__ import annotations

import multiprocessing
import random
import textwrap

from edgecatch.observation import Detection, Observation
from edgecatch.policies import EngineState, PolicySet, load_policy_text
from edgecatch.policies.engine import ForkSafeRandom

T0 = 1_795_132_800.0
OBS = Observation(model="m", detections=(Detection("box", 0.9, (0.0, 0.0, 1.0, 1.0), 0),))


def build(body: str, state: EngineState | None = None) -> PolicySet:
    text = "version: 1\npolicies:\n  - name: p\n" + textwrap.indent(textwrap.dedent(body).strip(), "    ")
    return PolicySet(load_policy_text(text, "t.yaml"), state=state, clock=lambda: T0)


def _child_draws(policies: PolicySet, queue) -> None:
    # The random draws a selection policy makes, and where this process's every_nth counter starts.
    randoms = [policies.state.rng.random() for _ in range(4)]
    counting = build("every_nth: 1000000", state=policies.state)
    first = next(i for i in range(1_000_000) if counting.evaluate(OBS, now=T0).selected)
    queue.put((randoms, first))


def test_forked_workers_draw_different_numbers_and_count_from_different_phases():
    parent = build("random: 0.5")  # built before the fork, as a pre-forking server does
    parent.state.rng.random()
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    children = [ctx.Process(target=_child_draws, args=(parent, queue)) for _ in range(4)]
    for child in children:
        child.start()
    results = [queue.get(timeout=60) for _ in children]
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    streams = {tuple(randoms) for randoms, _ in results}
    phases = {first for _, first in results}
    # Without reseeding after the fork all four would repeat one stream and one phase exactly.
    assert len(streams) == 4
    assert len(phases) == 4  # four phases out of a million: equal ones would mean a shared seed
    assert parent.state.rng.random() not in {r for randoms, _ in results for r in randoms}


def test_default_random_source_is_fork_safe_and_explicit_seeds_stay_repeatable():
    assert isinstance(EngineState().rng, ForkSafeRandom)
    a = EngineState(rng=random.Random(7))
    b = EngineState(rng=random.Random(7))
    assert [a.rng.random() for _ in range(3)] == [b.rng.random() for _ in range(3)]


def test_replicas_with_their_own_phase_spread_every_nth_over_round_robin_traffic():
    # Four replicas behind a round-robin balancer, each keeping every 8th prediction it sees.
    replicas = [build("every_nth: 8", state=EngineState(rng=random.Random(seed))) for seed in range(4)]
    selected = []
    for i in range(4 * 8 * 50):
        if replicas[i % 4].evaluate(OBS, now=T0).selected:
            selected.append(i)
    assert len(selected) == 4 * 50  # the fleet keeps exactly 1 in 8
    # In step, the fleet would keep 4 consecutive predictions then none for 28: here the selections
    # of one round of 32 predictions are not one block of four.
    first_round = [i for i in selected if i < 32]
    assert len(first_round) == 4
    assert first_round != list(range(first_round[0], first_round[0] + 4))
