"""The convergence study's plan and statistics (bench/convergence.py): what each run is asked
to do, and the numbers its report rests on."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

# A script, not a package module: loaded from its file (its sibling imports happen in main()).
_spec = importlib.util.spec_from_file_location(
    "convergence", Path(__file__).resolve().parents[2] / "bench" / "convergence.py"
)
study = sys.modules["convergence"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(study)


def flag(argv, name):
    return argv[argv.index(name) + 1]


def test_the_budgets_give_every_batch_the_same_epochs_or_the_same_steps():
    for k in study.MULTIPLES:
        same_epochs, same_steps = study.Point("epochs", "lars", k), study.Point("steps", "lars", k)
        assert same_epochs.epochs == study.EPOCHS
        assert same_steps.epochs * (1536 // same_steps.batch) == study.STEPS  # the data divides exactly


def test_a_run_asks_the_job_for_its_global_batch_however_it_is_split(tmp_path):
    point = study.Point("epochs", "lars", 16)
    plain = study.Run(point, 4.0, 0.1, 1, "study").argv(tmp_path, tmp_path)
    accumulated = study.Run(point, 4.0, 0.1, 1, "study", accumulate=16).argv(tmp_path, tmp_path)
    two = study.Run(point, 4.0, 0.1, 1, "study", np=2, engine="horovod").argv(tmp_path, tmp_path)
    assert (flag(plain, "--batch-size"), flag(plain, "--batches-per-allreduce")) == ("128", "1")
    assert (flag(accumulated, "--batch-size"), flag(accumulated, "--batches-per-allreduce")) == ("8", "16")
    assert (flag(two, "--batch-size"), flag(two, "--engine")) == ("64", "horovod")  # per process
    assert flag(plain, "--warmup-epochs") == "1"  # a fraction of the run's epochs
    # the sweep never sees the validation images
    sweep = study.Run(point, 4.0, 0.1, 100, "sweep").argv(tmp_path, tmp_path)
    assert flag(sweep, "--val-dir").endswith("sweep-holdout") and flag(sweep, "--train-dir").endswith("sweep-train")


def test_sweep_split_holds_out_part_of_the_training_set(tmp_path):
    study.write_data(tmp_path)
    held = {p.name for p in (tmp_path / "sweep-holdout").glob("*/*.jpg")}
    trained = {p.name for p in (tmp_path / "sweep-train").glob("*/*.jpg")}
    train = {p.name for p in (tmp_path / "train").glob("*/*.jpg")}
    val = {p.name for p in (tmp_path / "val").glob("*/*.jpg")}
    assert (len(held), len(trained), len(train), len(val)) == (512, 1024, 1536, 261)
    assert held | trained == train and not held & trained and not (held | trained) & val


def test_confidence_interval_and_welch_test():
    s = study.sample([1.0, 2.0, 3.0, 4.0, 5.0])
    assert s["mean"] == 3.0 and s["std"] == pytest.approx(math.sqrt(2.5))
    assert s["ci95"] == pytest.approx([3 - 2.776445 * math.sqrt(0.5), 3 + 2.776445 * math.sqrt(0.5)])
    w = study.welch([10.0, 11.0, 12.0], [1.0, 2.0, 3.0, 4.0, 5.0])
    assert w["diff"] == 8.0 and w["p"] < 0.001 and w["ci95"][0] < 8 < w["ci95"][1]
    assert study.welch([5.0, 5.0], [5.0, 5.0]) == {"diff": 0.0, "ci95": [0.0, 0.0], "p": 1.0}


def test_the_largest_batch_held_is_the_last_before_the_first_fall():
    def row(k, diff):
        return {"k": k, "vs_reference": {"diff": diff, "ci95": [diff - 1, diff + 1], "p": 0.5}}

    rows = [row(1, 0.0), row(4, -0.5), row(16, -1.5), row(32, -0.2), row(64, -4.0)]
    held = study.holds(rows)  # in the order given (the study passes them by batch)
    assert held["k"] == 4 and held["first_outside"]["k"] == 16  # 32 is back within, but 16 was not
    assert study.holds([row(1, -2.0)])["k"] is None
    assert study.holds(rows[:2])["first_outside"] is None
