"""finetune: distillation, recovery after pruning, new heads, determinism, resume, refusals -- driven like a user would."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import digits_recipe, run_cli, write_recipe

from optcli.examples.digits import build_cnn

FAST = {"batch_size": 32, "lr": 0.01}


def _recipe(digits: Path, passes: list[dict], **extra) -> dict:
    recipe = digits_recipe(digits, passes, **extra)
    recipe["data"]["train"] = {"path": str(digits / "digits_train.npz"), "labels": "y", "batch_size": 32}
    recipe["report"]["latency"] = {"batch_sizes": [1], "warmup": 1, "runs": 2, "threads": 1}
    return recipe


def _run(tmp_path: Path, recipe: dict, *args: str, out: str = "out"):
    path = write_recipe(tmp_path, recipe, name=f"{out}.yaml")
    return run_cli("run", path, "-o", tmp_path / out, "--quiet", "--json", *args)


def _state(path: Path) -> dict[str, torch.Tensor]:
    program = torch.export.load(str(path))
    return {k: v for k, v in program.state_dict.items()}


def _accuracy(path: Path, npz: Path) -> tuple[float, np.ndarray]:
    data = np.load(npz)
    with torch.inference_mode():
        logits = torch.export.load(str(path)).module()(torch.from_numpy(data["x"]))
    return float((logits.argmax(1).numpy() == data["y"]).mean()), logits.numpy()


def _step(report: dict, name: str) -> dict:
    return next(s for s in report["steps"] if s["name"] == name)


def test_distilling_into_a_half_width_student_keeps_95_percent_of_teacher_accuracy(digits, tmp_path):
    passes = [
        {
            "type": "finetune",
            "epochs": 8,
            **FAST,
            "student": {"factory": "optcli.examples.digits:build_cnn", "factory_kwargs": {"width": 8}},
            "distill": {"teacher": "reference", "temperature": 4.0, "alpha": 0.7},
        }
    ]
    result = _run(tmp_path, _recipe(digits, passes))
    assert result.exit_code == 0, result.stderr
    report = result.json()
    teacher = _step(report, "original")["accuracy"]["value"]
    # Re-measured here, from the file the run wrote.
    student, logits = _accuracy(tmp_path / "out" / "model.pt2", digits / "digits_test.npz")
    assert student >= 0.95 * teacher, (student, teacher)
    assert abs(student - _step(report, "1-finetune")["accuracy"]["value"]) < 1e-9
    params = sum(v.numel() for v in _state(tmp_path / "out" / "model.pt2").values() if v.is_floating_point())
    dense = sum(p.numel() for p in build_cnn(16).parameters())
    assert params < dense / 3  # half the width is about a quarter of the weights
    training = _step(report, "1-finetune")["details"]["training"]
    assert [e["epoch"] for e in training["epochs"]] == list(range(1, 9))
    assert training["best_epoch"] in range(1, 9) and training["seconds"] > 0 and training["samples_per_s"] > 0
    assert {"epoch", "loss", "metric", "seconds", "samples_per_s"} <= set(training["epochs"][0])
    assert training["epochs"][training["best_epoch"] - 1]["metric"] == max(e["metric"] for e in training["epochs"])


def test_finetune_after_50_percent_channel_pruning_beats_the_pruned_only_model(digits, tmp_path):
    passes = [
        {"type": "prune", "sparsity": 0.5, "structured": "channels"},
        {"type": "finetune", "epochs": 4, **FAST, "distill": {"teacher": "reference"}},
    ]
    result = _run(tmp_path, _recipe(digits, passes))
    assert result.exit_code == 0, result.stderr
    report = result.json()
    pruned, tuned = _step(report, "1-prune"), _step(report, "2-finetune")
    assert pruned["parameters"] < 0.6 * _step(report, "original")["parameters"]
    assert tuned["parameters"] == pruned["parameters"]  # training does not regrow channels
    pruned_acc, _ = _accuracy(tmp_path / "out" / "steps" / "1-prune" / "model.pt2", digits / "digits_test.npz")
    tuned_acc, _ = _accuracy(tmp_path / "out" / "model.pt2", digits / "digits_test.npz")
    assert tuned_acc > pruned_acc + 0.01, (pruned_acc, tuned_acc)


def test_pruned_weights_stay_zero_through_finetune(digits, tmp_path):
    passes = [{"type": "prune", "sparsity": 0.5}, {"type": "finetune", "epochs": 2, **FAST}]
    result = _run(tmp_path, _recipe(digits, passes))
    assert result.exit_code == 0, result.stderr
    pruned = _state(tmp_path / "out" / "steps" / "1-prune" / "model.pt2")
    tuned = _state(tmp_path / "out" / "model.pt2")
    checked = 0
    for name, before in pruned.items():
        zeros = before == 0
        if before.ndim >= 2 and zeros.float().mean() > 0.2:
            assert torch.count_nonzero(tuned[name][zeros]) == 0, name
            assert not torch.equal(tuned[name], before), f"{name} was not trained"
            checked += 1
    assert checked >= 3


def test_weights_masked_by_torch_prune_stay_zero_in_the_training_loop(digits):
    from torch.nn.utils import prune

    from optcli.data import Dataset
    from optcli.passes.base import attach_training_hook
    from optcli.passes.finetune import Config
    from optcli.passes.finetune.loop import TrainJob, train

    data = np.load(digits / "digits_train.npz")
    model = build_cnn(16)
    model.load_state_dict(torch.load(digits / "digits_cnn.pt"))
    prune.l1_unstructured(model.hidden, "weight", amount=0.5)
    zeros = model.hidden.weight_mask == 0

    class CountingSchedule:  # stands in for a gradual prune schedule: the loop must step it once per optimizer step
        steps = finished = 0
        done = False

        def step(self):
            self.steps += 1

        def finish(self):
            self.finished += 1
            self.done = True

    schedule = CountingSchedule()
    attach_training_hook(model, schedule)
    job = TrainJob(
        config=Config(epochs=2, batch_size=64, seed=0),
        student=model,
        input_names=["x"],
        train=Dataset("train", {"x": data["x"]}, data["y"], 64, "accuracy"),
    )
    result = train(job, progress=False)
    weight = result.student.hidden.weight
    assert torch.count_nonzero(weight[zeros]) == 0 and torch.count_nonzero(weight[~zeros]) == int((~zeros).sum())
    batches = -(-len(data["x"]) // 64)
    assert schedule.steps == 2 * batches == result.steps
    assert schedule.finished == 1


def test_gradual_prune_schedule_reaches_its_sparsity_during_finetune(digits, tmp_path):
    passes = [
        {"type": "prune", "sparsity": 0.6, "scope": "layer", "schedule": {"steps": 40}},
        {"type": "finetune", "epochs": 2, **FAST},
    ]
    result = _run(tmp_path, _recipe(digits, passes))
    assert result.exit_code == 0, result.stderr
    assert _step(result.json(), "1-prune")["sparsity"] < _step(result.json(), "2-finetune")["sparsity"]
    tuned = _state(tmp_path / "out" / "model.pt2")
    hidden = tuned["hidden.weight"]
    assert abs(float((hidden == 0).float().mean()) - 0.6) < 0.01


def test_head_replacement_trains_a_new_three_class_head_and_leaves_frozen_layers_alone(digits, tmp_path):
    for split in ("train", "test"):
        z = np.load(digits / f"digits_{split}.npz")
        keep = z["y"] < 3
        np.savez(tmp_path / f"abc_{split}.npz", x=z["x"][keep], y=z["y"][keep])
    passes = [
        {
            "type": "finetune",
            "epochs": 3,
            **FAST,
            "head": {"replace": "classifier", "num_classes": 3},
            "freeze": ["stem.*", "block.*", "features.*"],
        }
    ]
    recipe = _recipe(digits, passes)
    recipe["data"]["train"]["path"] = str(tmp_path / "abc_train.npz")
    recipe["data"]["eval"]["path"] = str(tmp_path / "abc_test.npz")
    result = _run(tmp_path, recipe)
    assert result.exit_code == 0, result.stderr
    acc, logits = _accuracy(tmp_path / "out" / "model.pt2", tmp_path / "abc_test.npz")
    assert logits.shape[1] == 3
    assert acc > 0.9
    original = torch.load(digits / "digits_cnn.pt")
    tuned = _state(tmp_path / "out" / "model.pt2")
    assert torch.equal(tuned["stem.0.weight"], original["stem.0.weight"])
    assert torch.equal(
        tuned["features.1.running_mean"], original["features.1.running_mean"]
    )  # frozen BatchNorm keeps its statistics
    assert not torch.equal(tuned["hidden.weight"], original["hidden.weight"])


def test_same_seed_twice_gives_bit_identical_weights(digits, tmp_path):
    passes = [{"type": "finetune", "epochs": 2, **FAST, "distill": {"teacher": "reference"}, "seed": 7}]
    assert _run(tmp_path, _recipe(digits, passes), out="a").exit_code == 0
    assert _run(tmp_path, _recipe(digits, passes), out="b").exit_code == 0
    passes[0]["seed"] = 8
    assert _run(tmp_path, _recipe(digits, passes), out="c").exit_code == 0
    a, b, c = (_state(tmp_path / o / "model.pt2") for o in "abc")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)  # the seed does matter


@pytest.mark.system
def test_resume_after_an_interrupted_epoch_ends_with_the_same_weights(digits, tmp_path, monkeypatch):
    passes = [{"type": "finetune", "epochs": 3, **FAST, "optimizer": "adam", "distill": {"teacher": "reference"}}]
    assert _run(tmp_path, _recipe(digits, passes), out="whole").exit_code == 0

    calls = {"n": 0}
    step = torch.optim.Adam.step

    def interrupting_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 34 + 10:  # 34 batches per epoch: Ctrl-C in the middle of epoch 2
            raise KeyboardInterrupt
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", interrupting_step)
    first = _run(tmp_path, _recipe(digits, passes), out="cut")
    assert first.exit_code == 130
    assert [p.name for p in (tmp_path / "cut" / "steps" / "1-finetune.ckpt").iterdir()] == ["epoch-1.pt"]
    assert not (tmp_path / "cut" / "report.json").exists()
    monkeypatch.setattr(torch.optim.Adam, "step", step)

    resumed = _run(tmp_path, _recipe(digits, passes), "--resume", out="cut")
    assert resumed.exit_code == 0, resumed.stderr
    training = _step(resumed.json(), "1-finetune")["details"]["training"]
    assert training["resumed_from_epoch"] == 1 and [e["epoch"] for e in training["epochs"]] == [1, 2, 3]
    whole, cut = _state(tmp_path / "whole" / "model.pt2"), _state(tmp_path / "cut" / "model.pt2")
    assert all(torch.equal(whole[k], cut[k]) for k in whole)
    assert not (tmp_path / "cut" / "steps" / "1-finetune.ckpt").exists()


def test_teacher_and_student_given_as_files(digits, tmp_path):
    torch.save(build_cnn(8).state_dict(), tmp_path / "small.pt")
    passes = [
        {
            "type": "finetune",
            "epochs": 1,
            **FAST,
            "distill": {"teacher": str(digits / "digits_cnn.pt2")},
            "student": {
                "path": "small.pt",
                "factory": "optcli.examples.digits:build_cnn",
                "factory_kwargs": {"width": 8},
            },
        }
    ]
    result = _run(tmp_path, _recipe(digits, passes))
    assert result.exit_code == 0, result.stderr
    assert _state(tmp_path / "out" / "model.pt2")["stem.0.weight"].shape[0] == 8
    passes[0]["student"] = {"path": "small.pt"}  # a state_dict with no factory: say which key to set
    _refused(_run(tmp_path, _recipe(digits, passes), out="again"), "student", "student.factory")


def test_hidden_features_of_a_narrower_student_are_matched_through_a_projection(digits, tmp_path):
    distill = {"teacher": "reference", "features": [{"student": "block", "teacher": "block", "weight": 0.5}]}
    passes = [
        {
            "type": "finetune",
            "epochs": 2,
            **FAST,
            "student": {"factory": "optcli.examples.digits:build_cnn", "factory_kwargs": {"width": 8}},
            "distill": distill,
        }
    ]
    result = _run(tmp_path, _recipe(digits, passes))
    assert result.exit_code == 0, result.stderr
    assert "features MSE" in _step(result.json(), "1-finetune")["details"]["training"]["loss"]
    state = _state(tmp_path / "out" / "model.pt2")
    assert not any("projection" in k for k in state)  # the projection trains with the student but is not shipped
    distill["features"][0]["teacher"] = "blocks"
    _refused(_run(tmp_path, _recipe(digits, passes), out="typo"), "distill.features", "'blocks'")
    distill["features"][0]["teacher"] = "features"  # (N, 32, 4, 4) against the student's (N, 8, 8, 8)
    _refused(_run(tmp_path, _recipe(digits, passes), out="shape"), "distill.features", "only the width")


def test_early_stopping_keeps_the_best_epoch(digits, tmp_path):
    passes = [{"type": "finetune", "epochs": 6, "batch_size": 32, "lr": 1e-12, "patience": 2, "schedule": "constant"}]
    result = _run(tmp_path, _recipe(digits, passes))
    assert result.exit_code == 0, result.stderr
    training = _step(result.json(), "1-finetune")["details"]["training"]
    assert training["stopped_early"] and len(training["epochs"]) == 3 and training["best_epoch"] == 1


def test_progress_is_shown_unless_quiet(digits, tmp_path):
    recipe = write_recipe(tmp_path, _recipe(digits, [{"type": "finetune", "epochs": 1, **FAST}]))
    loud = run_cli("run", recipe, "-o", tmp_path / "loud")
    assert loud.exit_code == 0 and "epoch 1/1" in loud.stderr and "samples/s" in loud.stderr
    quiet = run_cli("run", recipe, "-o", tmp_path / "quiet", "--quiet")
    assert quiet.exit_code == 0 and quiet.stderr == ""


def test_a_job_saved_for_a_worker_trains_to_the_same_weights(digits, tmp_path):
    from optcli.data import Dataset
    from optcli.passes.finetune import Config
    from optcli.passes.finetune.loop import TrainJob, train

    z = np.load(digits / "digits_train.npz")

    def job():
        teacher = build_cnn(16)
        teacher.load_state_dict(torch.load(digits / "digits_cnn.pt"))
        torch.manual_seed(0)
        config = Config(
            epochs=1,
            batch_size=64,
            seed=3,
            distill={"teacher": "reference", "features": [{"student": "block", "teacher": "block"}]},
        )
        return TrainJob(
            config=config,
            student=build_cnn(8),
            teacher=teacher.eval(),
            input_names=["x"],
            train=Dataset("train", {"x": z["x"]}, z["y"], 64, "accuracy"),
        )

    job().save(tmp_path / "job")
    direct = train(job(), progress=False).student.state_dict()
    rebuilt = train(TrainJob.load(tmp_path / "job"), progress=False).student.state_dict()
    assert all(torch.equal(direct[k], rebuilt[k]) for k in direct)


# ---------------------------------------------------------------- refusals: exit 2, one line, nothing trained


def _refused(result, *words: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_finetune_on_an_onnx_model_is_refused_with_what_to_give_instead(digits, tmp_path):
    recipe = _recipe(digits, [{"type": "finetune"}])
    recipe["model"] = {"path": str(digits / "digits_cnn.onnx")}
    _refused(run_cli("validate", write_recipe(tmp_path, recipe)), "finetune", "ONNX", "torch checkpoint")


def test_finetune_without_training_data_is_refused(digits, tmp_path):
    recipe = _recipe(digits, [{"type": "finetune"}])
    del recipe["data"]["train"]
    _refused(run_cli("validate", write_recipe(tmp_path, recipe)), "data.train")


def test_training_data_keyed_by_another_name_is_refused(digits, tmp_path):
    z = np.load(digits / "digits_train.npz")
    np.savez(tmp_path / "images.npz", images=z["x"], y=z["y"])
    recipe = _recipe(digits, [{"type": "finetune"}])
    recipe["data"]["train"]["path"] = str(tmp_path / "images.npz")
    _refused(run_cli("validate", write_recipe(tmp_path, recipe)), "data.train", "images")
    # a .pt data file is only opened when the pass runs: still exit 2, before any training
    torch.save({"images": torch.from_numpy(z["x"]), "y": torch.from_numpy(z["y"])}, tmp_path / "images.pt")
    recipe["data"]["train"]["path"] = str(tmp_path / "images.pt")
    _refused(_run(tmp_path, recipe), "data.train", "images")
    assert not (tmp_path / "out" / "report.json").exists()


def test_teacher_with_another_output_shape_is_refused(digits, tmp_path):
    torch.save(build_cnn(16, num_classes=3).state_dict(), tmp_path / "teacher3.pt")
    passes = [
        {
            "type": "finetune",
            "distill": {
                "teacher": {
                    "path": "teacher3.pt",
                    "factory": "optcli.examples.digits:build_cnn",
                    "factory_kwargs": {"width": 16, "num_classes": 3},
                }
            },
        }
    ]
    result = _run(tmp_path, _recipe(digits, passes))
    _refused(result, "distill.teacher", "(2, 3)", "(2, 10)")
    assert not (tmp_path / "out" / "report.json").exists()


def test_learning_rate_warms_up_then_follows_the_schedule():
    from optcli.passes.finetune import Config
    from optcli.passes.finetune.loop import lr_at

    cosine = Config(lr=0.1, warmup_steps=4, schedule="cosine")
    assert [round(lr_at(s, 104, cosine, 10), 4) for s in range(4)] == [0.02, 0.04, 0.06, 0.08]
    assert lr_at(4, 104, cosine, 10) == pytest.approx(0.1) and lr_at(54, 104, cosine, 10) == pytest.approx(0.05)
    assert lr_at(103, 104, cosine, 10) < 1e-4
    step = Config(lr=0.1, schedule="step", step_epochs=2, gamma=0.5)
    assert [lr_at(s, 100, step, 10) for s in (0, 19, 20, 45)] == pytest.approx([0.1, 0.1, 0.05, 0.025])
    assert lr_at(99, 100, Config(lr=0.1, schedule="constant"), 10) == 0.1


def test_max_steps_stops_training_mid_epoch(digits):
    from optcli.data import Dataset
    from optcli.passes.finetune import Config
    from optcli.passes.finetune.loop import TrainJob, train

    z = np.load(digits / "digits_train.npz")
    job = TrainJob(
        config=Config(epochs=5, max_steps=7, batch_size=64, seed=0),
        student=build_cnn(8),
        input_names=["x"],
        train=Dataset("train", {"x": z["x"]}, z["y"], 64, "accuracy"),
    )
    result = train(job, progress=False)
    assert result.steps == 7 and len(result.epochs) == 1 and result.epochs[0]["samples"] == 7 * 64
