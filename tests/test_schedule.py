"""The plan and the learning-rate schedule, value by value against the formulas."""
import math
import os

import pytest

from gluon_imagenet.recipe import main as recipe_main, load_recipe, recipe_from_dict
from gluon_imagenet.schedule import (PlanError, check_batches_fit, epoch_at, interpolate, lr_at, lr_scale_for_workers,
                                     make_plan, phase_at, shard_sizes, step_at_epoch, steps_per_epoch,
                                     train_flops_per_image)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = os.path.join(ROOT, "recipes", "imagenet104.yaml")
IMAGENET_TRAIN = 1281167


def one_phase(lr, method, epochs=(0, 1), batch=10):
    return recipe_from_dict({"reference_workers": 1, "phases": [
        {"epochs": list(epochs), "lr": list(lr), "lr_method": method, "batch_size": batch, "image_size": 32,
         "data_dir": "d"}]})


@pytest.mark.parametrize("method, start, end, progress, expected", [
    ("linear", 1.0, 2.0, 0.0, 1.0),
    ("linear", 1.0, 2.0, 0.5, 1.5),
    ("linear", 2.0, 0.45, 0.25, 2.0 - 1.55 * 0.25),
    ("exp", 0.45, 0.02, 0.5, 0.45 * (0.02 / 0.45) ** 0.5),
    ("exp", 0.45, 0.02, 0.0, 0.45),
    ("exp", 0.02, 0.004, 0.75, 0.02 * 0.2 ** 0.75),
    ("cosine", 1.0, 0.0, 0.5, 0.5),
    ("cosine", 1.0, 0.0, 0.0, 1.0),
    ("cosine", 0.4, 0.1, 1.0, 0.1),
])
def test_interpolate(method, start, end, progress, expected):
    assert interpolate(method, start, end, progress) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("method, lr, step, expected", [
    # 100 images, batch 10, 1 worker: 10 steps in one epoch; progress = step / 10
    ("linear", (1.0, 2.0), 0, 1.0),
    ("linear", (1.0, 2.0), 5, 1.5),
    ("linear", (1.0, 2.0), 9, 1.9),
    ("exp", (0.45, 0.02), 5, 0.45 * (0.02 / 0.45) ** 0.5),
    ("exp", (0.45, 0.02), 9, 0.45 * (0.02 / 0.45) ** 0.9),
])
def test_lr_at_steps(method, lr, step, expected):
    plan = make_plan(one_phase(lr, method), train_images=100, workers=1)
    assert plan.total_steps == 10
    assert lr_at(plan, step) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("images, batch, workers, expected", [
    (100, 10, 1, 10),
    (101, 10, 1, 11),  # the last step wraps around the shard
    (101, 10, 2, 6),
    (1281167, 740, 8, 217),
    (1281167, 256, 8, 626),
    (1281167, 196, 8, 818),
    (1281167, 128, 8, 1252),
    (5, 10, 4, 1),
])
def test_steps_per_epoch(images, batch, workers, expected):
    assert steps_per_epoch(images, batch, workers) == expected


def test_seed_plan_for_8_workers():
    plan = make_plan(load_recipe(SEED), train_images=IMAGENET_TRAIN, workers=8)
    assert [(p.phase.epochs, p.steps_per_epoch, p.steps) for p in plan.phases] == [
        ((0, 6), 217, 1302), ((6, 21), 217, 3255), ((21, 32), 626, 6886), ((32, 36), 818, 3272),
        ((36, 40), 1252, 5008)]
    assert [p.first_step for p in plan.phases] == [0, 1302, 4557, 11443, 14715]
    assert plan.total_steps == 19723
    assert plan.lr_scale == 1.0
    assert [(p.phase.image_size, p.phase.batch_size, p.phase.data_dir) for p in plan.phases] == [
        (128, 740, "160"), (128, 740, "160"), (224, 256, "320"), (224, 196, "320"), (288, 128, "320")]
    assert lr_at(plan, 0) == 1.0
    assert lr_at(plan, 1302) == 2.0
    assert lr_at(plan, 4557) == 0.45
    assert lr_at(plan, 4557 + 3443) == pytest.approx(0.45 * (0.02 / 0.45) ** 0.5)  # halfway through phase 3
    assert lr_at(plan, 19722) == pytest.approx(0.004 * 0.5 ** (5007 / 5008))


def test_seed_flops_and_images():
    plan = make_plan(load_recipe(SEED), train_images=IMAGENET_TRAIN, workers=8)
    first = plan.phases[0]
    assert first.images == 1302 * 740 * 8
    assert first.flops == pytest.approx(first.images * 3 * 4.1e9 * 2 * (128 / 224) ** 2)
    assert train_flops_per_image(224) == pytest.approx(24.6e9)


def test_continuity_at_phase_boundaries():
    """Where a phase ends at the lr the next one starts with, the step across the boundary is no larger than a
    step inside the phase."""
    plan = make_plan(load_recipe(SEED), train_images=IMAGENET_TRAIN, workers=8)
    for before, after in zip(plan.phases, plan.phases[1:]):
        assert before.phase.lr[1] == after.phase.lr[0]
        last, first = lr_at(plan, after.first_step - 1), lr_at(plan, after.first_step)
        inside = abs(lr_at(plan, after.first_step - 2) - last)
        assert abs(first - last) <= inside * 1.0000001


def test_discontinuity_is_kept_when_the_recipe_has_one():
    recipe = recipe_from_dict({"reference_workers": 1, "phases": [
        {"epochs": [0, 1], "lr": [1.0, 1.0], "lr_method": "linear", "batch_size": 10, "image_size": 32,
         "data_dir": "d"},
        {"epochs": [1, 2], "lr": [0.1, 0.1], "lr_method": "linear", "batch_size": 5, "image_size": 32,
         "data_dir": "d"}]})
    plan = make_plan(recipe, train_images=100, workers=1)
    assert [lr_at(plan, s) for s in (9, 10)] == [1.0, 0.1]
    assert plan.phases[1].first_step == 10 and plan.total_steps == 30


@pytest.mark.parametrize("workers, reference, rule, expected", [
    (8, 8, "linear", 1.0), (2, 8, "linear", 0.25), (16, 8, "linear", 2.0), (2, 8, "none", 1.0)])
def test_lr_scale_for_workers(workers, reference, rule, expected):
    assert lr_scale_for_workers(workers, reference, rule) == expected


def test_scaled_plan_for_two_workers():
    plan = make_plan(load_recipe(SEED), train_images=IMAGENET_TRAIN, workers=2)
    assert plan.lr_scale == 0.25
    assert lr_at(plan, 0) == 0.25
    assert plan.phases[0].steps_per_epoch == math.ceil(IMAGENET_TRAIN / 1480)


def test_warmup_ramps_from_the_first_step():
    recipe = recipe_from_dict({"reference_workers": 1, "warmup_epochs": 0.5, "phases": [
        {"epochs": [0, 2], "lr": [1.0, 1.0], "lr_method": "linear", "batch_size": 10, "image_size": 32,
         "data_dir": "d"}]})
    plan = make_plan(recipe, train_images=100, workers=1)
    assert plan.warmup_steps == 5
    assert [lr_at(plan, s) for s in range(7)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0])


def test_epoch_and_phase_lookup():
    plan = make_plan(load_recipe(SEED), train_images=IMAGENET_TRAIN, workers=8)
    assert epoch_at(plan, 0) == (0, 0)
    assert epoch_at(plan, 216) == (0, 216)
    assert epoch_at(plan, 217) == (1, 0)
    assert epoch_at(plan, 4557) == (21, 0)
    assert epoch_at(plan, 4557 + 626 + 3) == (22, 3)
    assert epoch_at(plan, plan.total_steps) == (40, 0)
    assert phase_at(plan, 4556).index == 1 and phase_at(plan, 4557).index == 2
    assert step_at_epoch(plan, 21) == 4557
    assert step_at_epoch(plan, 21.5) == 4557 + 313
    with pytest.raises(IndexError):
        phase_at(plan, plan.total_steps)


def test_show_prints_the_plan(capsys):
    assert recipe_main(["show", SEED, "--workers", "8", "--train-images", str(IMAGENET_TRAIN)]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [r[:5] for r in rows] == [
        ["1", "0-6", "1,302", "0", "1,301"], ["2", "6-21", "3,255", "1,302", "4,556"],
        ["3", "21-32", "6,886", "4,557", "11,442"], ["4", "32-36", "3,272", "11,443", "14,714"],
        ["5", "36-40", "5,008", "14,715", "19,722"]]
    total = next(line for line in out.splitlines() if line.strip().startswith("total")).split()
    assert total[1:4] == ["40", "19,723", f"{sum(p for p in [1302*740, 3255*740, 6886*256, 3272*196, 5008*128]) * 8:,}"]
    assert "lr x 1" in out


@pytest.mark.parametrize("images, parts, expected", [
    (21, 1, [21]),
    (21, 2, [11, 10]),
    (21, 4, [6, 6, 6, 3]),  # ImageRecordIter's parts, counted here with num_parts/part_index
    (21, 5, [5, 5, 5, 5, 1]),
    (1, 2, [1, 0]),  # more ranks than images: an empty shard
    (21, 8, [3, 3, 3, 3, 3, 3, 3, 0]),
])
def test_shard_sizes_are_imagerecorditers_parts(images, parts, expected):
    assert shard_sizes(images, parts) == expected
    assert sum(shard_sizes(images, parts)) == images


@pytest.mark.parametrize("images, workers, batch, message", [
    (21, 1, 32, "phase 1: batch_size 32 is more than the 21 image(s) per rank (21 training image(s)): lower "
                "batch_size to <= 21, or pack more training images"),
    (1, 2, 1, "phase 1: batch_size 1 is more than the 0 image(s) per rank (1 training image(s) over 2 ranks, the "
              "smallest shard holding 0): use fewer ranks, or pack more training images"),
    (21, 4, 4, "phase 1: batch_size 4 is more than the 3 image(s) per rank (21 training image(s) over 4 ranks, the "
               "smallest shard holding 3): lower batch_size to <= 3"),
])
def test_a_batch_larger_than_a_shard_is_refused(images, workers, batch, message):
    plan = make_plan(one_phase((0.1, 0.1), "linear", batch=batch), train_images=images, workers=workers)
    with pytest.raises(PlanError) as e:
        check_batches_fit(plan)
    assert message in str(e.value)


@pytest.mark.parametrize("images, workers, batch", [(21, 1, 21), (69, 2, 16), (21, 4, 3)])
def test_a_batch_that_fits_every_shard_is_accepted(images, workers, batch):
    check_batches_fit(make_plan(one_phase((0.1, 0.1), "linear", batch=batch), train_images=images,
                                workers=workers))
