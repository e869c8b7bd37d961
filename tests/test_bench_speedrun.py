"""bench/bench_speedrun.py: the GPT-2 baseline has the Nano model's size and learns, and the time-to-reach
table is computed as its description says, on hand-made curves."""

import pytest
import torch

import train
from backends import PlainBackend
from bench import bench_speedrun as speedrun
from model import ModelConfig, Transformer


@pytest.mark.parametrize("path", ["config/nano-tiny.json", "config/nano-small.json"])
def test_gpt2_baseline_has_the_nano_models_parameter_count(path):
    config = ModelConfig.from_json(path)
    nano, gpt2 = speedrun.count_params(Transformer(config)), speedrun.count_params(speedrun.gpt2_like(config))
    per_hidden_unit = config.n_layer * (2 * config.n_embd + 1)
    assert abs(gpt2 - nano) <= per_hidden_unit / 2


def test_gpt2_baseline_is_causal_and_learns_a_cycle():
    config = ModelConfig.from_json("config/nano-tiny.json")
    torch.manual_seed(0)
    model = speedrun.gpt2_like(config)
    x = torch.randint(0, config.vocab_size, (2, 16))
    later_changed = x.clone()
    later_changed[:, 8:] = (later_changed[:, 8:] + 1) % config.vocab_size
    first_targets = torch.cat([x[:, 1:9], torch.full((2, 8), -100)], 1)  # cross_entropy ignores -100
    with torch.no_grad():  # the loss at the first 8 positions does not see the tokens after them
        assert model(x, first_targets)[1] == model(later_changed, first_targets)[1]
        assert model(x, x)[1] != model(later_changed, x)[1]
    cycle = torch.arange(17).repeat(2, 1) % 5 + 10
    backend = PlainBackend(model, train.TrainConfig(learning_rate=3e-3, weight_decay=0.0), "cpu", None, 1)
    losses = []
    for _ in range(40):
        losses.append(backend.forward_backward(cycle[:, :-1], cycle[:, 1:], None, True).item())
        backend.step(1.0)
    assert losses[-1] < 0.2 * losses[0]


def curve(*points):
    """[(seconds, step, loss, bpc)] from (seconds, loss) pairs."""
    return [(t, step, loss, loss / 2) for step, (t, loss) in enumerate(points)]


def test_time_to_reach_interpolates_between_evaluations():
    points = curve((0, 9.0), (10, 7.0), (20, 6.0), (30, 5.5))
    assert speedrun.time_to_reach(points, 6.5) == pytest.approx(15)
    assert speedrun.time_to_reach(points, 7.0) == pytest.approx(10)
    assert speedrun.time_to_reach(points, 5.0) is None


def test_summary_times_each_recipe_to_the_references_final_loss():
    def runs(recipe, *curves):
        return [{"recipe": recipe, "seed": seed, "params": 100, "steps": 3, "curve": c}
                for seed, c in enumerate(curves)]
    results = (runs(speedrun.BASELINE, curve((0, 9), (50, 7), (100, 6.2)), curve((0, 9), (50, 7), (100, 5.8)))
               + runs(speedrun.ADAMW, curve((0, 9), (50, 6), (100, 5.0)), curve((0, 9), (50, 6), (100, 5.0)))
               + runs(speedrun.MUON, curve((0, 9), (20, 6), (100, 4.0)), curve((0, 9), (40, 6), (100, 4.0))))
    rows, finals = speedrun.summarise(results)
    assert finals == {speedrun.BASELINE: 6.0, speedrun.ADAMW: 5.0, speedrun.MUON: 4.0}
    baseline, adamw, muon = rows
    assert baseline["seconds_to_baseline"] == 100 and baseline["ratio_to_baseline"] == 1.0
    assert baseline["seconds_to_adamw"] is None  # the baseline never reaches AdamW's 5.0
    assert adamw["seconds_to_baseline"] == pytest.approx(50) and adamw["ratio_to_baseline"] == pytest.approx(0.5)
    # Muon reaches 6.0 at 20 s and 40 s (mean 30), 5.0 at 20 + 80 / 2 = 60 s and 40 + 60 / 2 = 70 s (mean 65)
    assert muon["seconds_to_baseline"] == pytest.approx(30) and muon["ratio_to_baseline"] == pytest.approx(0.3)
    assert muon["seconds_to_adamw"] == pytest.approx(65) and muon["ratio_to_adamw"] == pytest.approx(0.65)
