"""The engine end to end on the embedded digits: stages, files, resume, errors."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from astkit import DistilledSet, Engine, Trajectory
from astkit.errors import FileFormatError, UserError

from conftest import tiny_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits):
    tmp = tmp_path_factory.mktemp("engine")
    engine = Engine(tiny_config(tmp), dataset=digits)
    result = engine.run()
    return engine, result


def test_run_writes_every_file(trained):
    engine, result = trained
    out = engine.out
    assert sorted(p.name for p in (out / "experts").iterdir()) == ["expert_000.safetensors", "expert_001.safetensors"]
    for name in ("distilled.safetensors", "checkpoint.safetensors", "config.toml", "metrics.jsonl"):
        assert (out / name).is_file()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines if r["event"] == "iteration"] == [0, 1, 2]
    assert lines[-1]["event"] == "final_evaluation"
    assert result.distilled.images.shape == (20, 1, 8, 8) and result.distilled.iteration == 3
    acc = result.evaluation["convnet"]
    assert len(acc.accuracies) == 1 and 0.0 <= acc.mean <= 1.0 and acc.max_accuracies == []


def test_trajectory_file_records_everything(trained):
    engine, result = trained
    t = Trajectory.load(engine.out / "experts" / "expert_000.safetensors")
    assert t.snapshots.shape == (5, t.layout.size) and t.num_epochs == 4
    assert len(t.test_accuracy) == 4 and t.avg_var > 0
    assert t.model.name == "convnet" and t.model.options == {"width": 8}
    assert t.meta["dataset"]["name"] == "digits" and t.meta["dataset"]["class_names"][3] == "3"
    assert "mean" in t.meta["dataset"] and t.meta["experts"]["lr"] == 0.01
    assert t.meta["astkit_version"]
    torch.testing.assert_close(t.snapshots, result.experts[0].snapshots)
    model = t.build_model()
    assert sum(p.numel() for p in model.parameters()) == t.layout.size


def test_avg_var_is_mean_squared_step():
    from astkit.trajectory import avg_var

    snaps = torch.tensor([[0.0, 0.0], [3.0, 4.0], [3.0, 5.0]])
    assert avg_var(snaps) == pytest.approx((25 + 1) / 2)


def test_distilled_file_records_what_is_needed_elsewhere(trained):
    engine, result = trained
    d = DistilledSet.load(engine.out / "distilled.safetensors")
    torch.testing.assert_close(d.images, result.distilled.images)
    assert d.lr == pytest.approx(result.distilled.lr)
    assert d.meta["dataset"]["mean"] and d.meta["dataset"]["class_names"]
    assert d.meta["model"]["name"] == "convnet" and d.meta["config"]["distill"]["ipc"] == 2
    assert "plugins" in d.meta


def test_engine_matches_plain_mtt_with_augmentation_off(tmp_path, digits, trained):
    """Iteration 0 of the engine == MTT's loss and image update in plain PyTorch."""
    engine_trained, _ = trained
    experts = engine_trained.load_experts()
    engine = Engine(tiny_config(tmp_path, "augment.strategy=none", "distill.iterations=1"), dataset=digits)
    distiller = engine.make_distiller(experts)
    images0 = distiller.images.detach().clone()
    metrics = distiller.step()
    t = experts[metrics.expert]
    start, target = t.snapshots[metrics.start_epoch], t.snapshots[metrics.start_epoch + 2]
    x = images0.clone().requires_grad_(True)
    lr = torch.tensor(0.01, requires_grad=True)
    net = distiller.student
    student = [start.clone().requires_grad_(True)]
    for _ in range(4):
        ce = F.cross_entropy(net(student[-1], x), distiller.labels)
        grad = torch.autograd.grad(ce, student[-1], create_graph=True)[0]
        student.append(student[-1] - lr * grad)
    loss = F.mse_loss(student[-1], target, reduction="sum") / F.mse_loss(start, target, reduction="sum")
    loss.backward()
    assert metrics.loss == pytest.approx(loss.item(), rel=1e-5)
    torch.testing.assert_close(distiller.images.detach(), images0 - 100 * x.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(distiller.lr.detach(), 0.01 - 1e-5 * lr.grad, rtol=1e-5, atol=1e-9)


def test_resume_continues_exactly(tmp_path, digits, trained):
    engine_trained, result = trained
    experts = engine_trained.load_experts()
    full = Engine(tiny_config(tmp_path / "a", "distill.iterations=4"), dataset=digits).distill(experts)
    first = Engine(tiny_config(tmp_path / "b", "distill.iterations=2"), dataset=digits)
    first.distill(experts)
    resumed = Engine(tiny_config(tmp_path / "b", "distill.iterations=4"), dataset=digits).distill(experts, resume=True)
    assert torch.equal(full.images, resumed.images) and full.lr == resumed.lr
    lines = (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [0, 1, 2, 3]


def test_same_seed_gives_byte_identical_files(tmp_path, digits, trained):
    engine_trained, _ = trained
    experts = engine_trained.load_experts()
    contents = []
    for _ in range(2):
        engine = Engine(tiny_config(tmp_path), dataset=digits)
        engine.distill(experts)
        contents.append((engine.out / "distilled.safetensors").read_bytes())
    assert contents[0] == contents[1]


def test_experts_are_independent_of_order(tmp_path, digits):
    a = Engine(tiny_config(tmp_path / "a", "experts.epochs=1", "distill.max_start_epoch=1",
                           "distill.expert_epochs=1"), dataset=digits)
    b = Engine(tiny_config(tmp_path / "b", "experts.epochs=1", "distill.max_start_epoch=1",
                           "distill.expert_epochs=1"), dataset=digits)
    both = a.train_experts()
    only_second = b.train_experts(indices=[1])
    assert torch.equal(both[1].snapshots, only_second[0].snapshots)


def test_stage_errors(tmp_path, digits, trained):
    engine_trained, _ = trained
    experts = engine_trained.load_experts()
    with pytest.raises(UserError, match="no expert trajectories"):
        Engine(tiny_config(tmp_path), dataset=digits).distill()
    with pytest.raises(FileFormatError, match="made for convnet\\(width=8\\).*this run uses convnet\\(width=16\\)"):
        Engine(tiny_config(tmp_path, "model.width=16"), dataset=digits).distill(experts)
    with pytest.raises(UserError, match="has 4 epochs, but the last start epoch"):
        Engine(tiny_config(tmp_path, "distill.max_start_epoch=4", "experts.epochs=10"), dataset=digits).distill(experts)
    with pytest.raises(UserError, match="exceeds the smallest class"):
        Engine(tiny_config(tmp_path, "distill.ipc=500"), dataset=digits).distill(experts)
    with pytest.raises(UserError, match="unknown model 'nonet'"):
        Engine(tiny_config(tmp_path, "model.name=nonet"), dataset=digits)
    with pytest.raises(UserError, match="unknown dataset 'nodata'"):
        Engine(tiny_config(tmp_path, "data.dataset=nodata"))
    with pytest.raises(UserError, match="unknown option weight-perturbation.rhoo"):
        Engine(tiny_config(tmp_path, "weight-perturbation.rhoo=1"), dataset=digits)


def test_files_are_never_unpickled(tmp_path):
    """A pickle disguised as an astkit file is refused without being executed."""
    import pickle

    class Boom:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    bad = tmp_path / "evil.safetensors"
    bad.write_bytes(pickle.dumps(Boom()))
    for loader in (Trajectory.load, DistilledSet.load):
        with pytest.raises(FileFormatError, match="not an astkit file"):
            loader(bad)
    assert not (tmp_path / "pwned").exists()
    files = list(Path(__file__).parents[1].joinpath("astkit").rglob("*.py"))
    assert not any("pickle.load" in p.read_text() for p in files)  # never unpickled by hand
    # torch.load only in the importer of reference .pt files, and only with weights_only=True
    calls = {(p.name, line.strip()) for p in files for line in p.read_text().splitlines() if "torch.load(" in line}
    assert calls and all("weights_only=True" in line for _, line in calls)  # every mention and the one call
    assert {name for name, line in calls if line.startswith("return torch.load(")} == {"torch_files.py"}


def test_truncated_and_foreign_files(tmp_path, trained):
    engine, _ = trained
    data = (engine.out / "distilled.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(FileFormatError):
        DistilledSet.load(cut)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    with pytest.raises(FileFormatError, match="not one astkit wrote"):
        DistilledSet.load(foreign)
    with pytest.raises(FileFormatError, match="expected an astkit trajectory file"):
        Trajectory.load(engine.out / "distilled.safetensors")
