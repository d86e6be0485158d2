"""What an optimizer step holds (common/runs.minibatch_plan, as the four scripts call it): whole GRPO groups
(atod.py), every domain or task in its batch ratio (mopd.py, two_phase.py), a shuffle drawn from the run's seed
and the iteration, the same however the batch is spread over ranks; and the scripts' training steps take the
rows their plan names."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
import torch.distributed as dist

import atod
import guided_opd
import mopd
import two_phase
from common.runs import minibatch_plan


def parts(plan: list[int], n: int) -> list[list[int]]:
    return [[g for g, m in enumerate(plan) if m == k] for k in range(n)]


def test_groups_stay_whole_and_are_shuffled():
    keys = [g // 4 for g in range(16)]  # atod.py's default: 4 groups of 4
    plans = [minibatch_plan(keys, 4, random.Random(f"1/mb/{it}"), together=True) for it in range(8)]
    for plan in plans:
        for members in parts(plan, 4):
            assert len(members) == 4 and len({keys[g] for g in members}) == 1  # one whole group a step
    assert len({tuple(p) for p in plans}) > 1  # the order of the groups changes between iterations
    # two groups per step when there are twice as many groups as steps
    for members in parts(minibatch_plan([g // 2 for g in range(16)], 4, random.Random(0), together=True), 4):
        assert len(members) == 4 and Counter(keys[g] for g in members)


@pytest.mark.parametrize("counts,n", [((6, 5, 5), 4), ((4, 4, 4), 4), ((6, 5, 5), 2), ((3, 2), 2), ((8,), 8)])
def test_every_key_is_in_every_step_in_its_ratio(counts, n):
    keys = [k for k, c in enumerate(counts) for _ in range(c)]
    random.Random(0).shuffle(keys)  # the slots of a key need not be together
    plan = minibatch_plan(keys, n, random.Random(1))
    sizes = [len(p) for p in parts(plan, n)]
    assert sum(sizes) == len(keys) and max(sizes) - min(sizes) <= 1
    for members in parts(plan, n):
        held = Counter(keys[g] for g in members)
        for k, c in enumerate(counts):
            assert abs(held[k] - c / n) < 1, (held, counts)  # floor or ceil of its share
    assert all(min(counts) < n or held[k] >= 1 for k in range(len(counts)))


def test_the_shuffle_is_fixed_by_the_seed_and_changes_with_it():
    keys = [g % 3 for g in range(12)]
    a = minibatch_plan(keys, 4, random.Random("1/mb/7"))
    assert a == minibatch_plan(keys, 4, random.Random("1/mb/7"))  # a resumed run splits the same way
    assert a != minibatch_plan(keys, 4, random.Random("1/mb/8")) or a != minibatch_plan(keys, 4, random.Random("2/mb/7"))
    assert a != [g % 4 for g in range(12)]  # not the old strided split


# ------------------------------------------------------------------------------ the scripts take their plan's rows
@pytest.fixture
def process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("module", [guided_opd, mopd, two_phase, atod])
def test_each_step_trains_the_rows_its_plan_names(process_group, monkeypatch, module):
    """The training step's micro-batches of step m hold exactly the rows with plan[slot] == m (the slots are not
    the row order: a dropped episode shifts rows, never slots)."""
    seen = []

    def record(lengths, budget, order):
        seen.append(sorted(order))
        return [order] if order else []
    monkeypatch.setattr(module, "pack_by_tokens", record)

    class Stop(Exception):
        pass

    def loss_stub(*a, **k):
        raise Stop
    name = {guided_opd: "guided_opd_loss", mopd: "mopd_loss", two_phase: "two_phase_loss", atod: "atod_loss"}[module]
    monkeypatch.setattr(module, name, loss_stub)
    slots = [5, 0, 3, 7, 1, 6]  # 6 surviving rows of an 8-slot batch
    plan = [0, 0, 1, 1, 1, 1, 0, 1]
    episodes = [type("E", (), {"slot": s, "__len__": lambda self: 4})() for s in slots]
    expected = sorted(i for i, s in enumerate(slots) if plan[s] == 0)
    # the step's first call of pack_by_tokens is the first mini-batch's; the loss stub stops the step there
    n = torch.zeros(len(slots), 6, dtype=torch.bool)
    n[:, 1:] = True
    batch = {"loss_mask": n, "role": torch.full((len(slots), 6), 1), "input_ids": torch.zeros(len(slots), 6, dtype=torch.long),
             "attention_mask": torch.ones(len(slots), 6, dtype=torch.long), "domain": torch.zeros(len(slots), 6, dtype=torch.long)}
    scores = type("S", (), {"full": None, "topk_ids": None, "logp": torch.zeros(len(slots), 6)})()
    args = module.Args(num_minibatches=2)
    with pytest.raises(Stop):
        if module is atod:
            z = torch.ones(len(slots), 6)
            module.train_step(_FakeStudent(), torch.optim.SGD([torch.zeros(1, requires_grad=True)]), episodes, batch, scores, z, z, z,
                              {}, [plan], args, 1, torch.device("cpu"))
        else:
            module.train_step(_FakeStudent(), torch.optim.SGD([torch.zeros(1, requires_grad=True)]), episodes, batch, scores,
                              None, *((0.0,) if module is guided_opd else ()), plan, args, 1, torch.device("cpu"))
    assert seen[0] == expected == [1, 4, 5]  # (a strided split would take rows 0, 2, 4)


class _FakeStudent:
    def set_requires_gradient_sync(self, flag):
        pass
