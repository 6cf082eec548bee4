"""The study's plan without training: phase-1 seed replacement below the in-distribution bar
(paired for both arms, capped), the phase-2 runs each slot gets, config validation and round trip."""
import dataclasses
import json
from pathlib import Path

import pytest

from megatron_kd.config import ConfigError
from megatron_kd.study.runner import DISTANCE_MARGIN, Study, StudyError
from megatron_kd.study.spec import StudyConfig, preset


class FakeStudy(Study):
    """execute() returns a phase-1 probe at the accuracy ``acc[(theta, seed)]`` (default 1.0)."""

    def __init__(self, cfg, root, acc):
        super().__init__(cfg, root, log=lambda msg: None)
        self.acc, self.trained = acc, []

    def _run_tasks(self, tasks, sets):
        self.trained += [s.name for t in tasks for s in t if s.name not in self.trained]

    def execute(self, spec, sets):
        a = self.acc.get((spec.meta["theta"], spec.meta["seed"]), 1.0)
        return {"phase1_probe": {"16": [1] * int(a * 100) + [0] * (100 - int(a * 100))}}


def _cfg(**kw):
    return dataclasses.replace(preset("default"), **kw)


def test_failed_seed_replaced_by_a_spare_for_both_arms(tmp_path):
    s = FakeStudy(_cfg(), tmp_path, {(500_000, 1): 0.03})
    seeds, _ = s._phase1("tok", Path("data"), None)
    assert seeds == {10_000: [0, 1, 2], 500_000: [0, 3, 2]}
    assert s.replaced == {"phase1_theta500k/seed1": 0.03}
    assert "phase1_theta500k/seed3" in s.trained
    runs = {r.name: r for r in s.phase2_runs("tok", Path("data"), seeds)}
    for arm in ("kd", "ce"):  # the 500k->500k slot 1 uses seed 3 in both arms, loading its phase 1
        r = runs[f"500k_to_500k/{arm}/seed3"]
        assert any(o.endswith("phase1_theta500k/seed3") for o in r.overrides)
        assert "train.seed=1237" in r.overrides and "data.seed=1237" in r.overrides
        assert f"10k_to_500k/{arm}/seed1" in runs and f"500k_to_500k/{arm}/seed1" not in runs
    assert len(runs) == 3 * (6 + 3 + 4)  # slots x (3 setups x 2 arms + 3 KD-only controls + 2 x 2 freeze)


def test_spares_used_up_stops_with_the_numbers(tmp_path):
    s = FakeStudy(_cfg(seeds=1), tmp_path, {(10_000, 0): 0.05, (10_000, 1): 0.10})
    with pytest.raises(StudyError) as e:
        s._phase1("tok", Path("data"), None)
    msg = str(e.value)
    assert "phase1_theta10k/seed0 0.05" in msg and "phase1_theta10k/seed1 0.10" in msg and "--phase1-iters" in msg


def test_most_runs_below_the_bar_is_a_budget_problem_no_spares(tmp_path):
    acc = {(th, s): 0.04 for th in (10_000, 500_000) for s in range(3)}
    acc[(10_000, 1)] = 0.9
    s = FakeStudy(_cfg(), tmp_path, acc)
    with pytest.raises(StudyError) as e:
        s._phase1("tok", Path("data"), None)
    assert "5 of 6 runs" in str(e.value) and "phase1_theta500k/seed2 0.04" in str(e.value)
    assert len(s.trained) == 6  # no spare trained


def test_bar_off_keeps_every_seed(tmp_path):
    s = FakeStudy(_cfg(in_distribution_bar=0.0), tmp_path, {(10_000, 0): 0.0})
    seeds, _ = s._phase1("tok", Path("data"), None)
    assert seeds[10_000] == [0, 1, 2] and s.replaced == {}


@pytest.mark.parametrize("name", ["default", "quick", "demo"])
def test_presets_valid_and_round_trip(name):
    cfg = preset(name)
    cfg.validate(lambda n: n - DISTANCE_MARGIN)
    assert StudyConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("change, words", [
    (dict(seeds=0), "--seeds"), (dict(jobs=0), "--jobs"), (dict(setups=("10k_to_1m",)), "--setups"),
    (dict(phase2_doc_tokens=(16, 300)), "do not fit"),
    (dict(distances={"in_distribution": (24,), "beyond_document": (100,), "beyond_window": (300,)}),
     "--distances-beyond-document 100"),
])
def test_invalid_study_configs(change, words):
    with pytest.raises(ConfigError) as e:
        _cfg(**change).validate(lambda n: n - DISTANCE_MARGIN)
    assert words in str(e.value)
