"""CRaC's training state: the once-per-epoch multiplier update and penalty growth over simulated epochs, the
trainer's end-of-epoch hook and the MLflow log, a stop and resume through ``last.pt``, and two gloo processes."""

from __future__ import annotations

import mlflow
import pytest
import torch
from ignite.engine import Events
from torch.utils.data import DataLoader

from pipeline.checkpoints import TrainingCheckpoint
from pipeline.engines import create_trainer
from pipeline.losses import build_loss
from pipeline.tracking import RunTracker

K = 3


def _batches(seed: int, n: int = 3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        labels = (torch.rand(2, 6, 6, generator=g) * K).long()
        labels[:, :3, :3] = 1  # an interior region of class 1
        out.append((torch.randn(2, K, 6, 6, generator=g, dtype=torch.float64) * 4, labels))
    return out


def _reference_epochs(epoch_batches, margin, rho0, rho_max, rho_step, gamma, tao):
    """The released update written out: λ ← clamp(mean_voxels clamp(λ + ρh, 1e-6, 1e6)); every rho_step epochs ρ ← γρ
    where mean h > tao · previous mean h (previous = the epoch before), within [rho0, rho_max]."""
    loss = build_loss("crac", num_classes=K, margin=margin, rho=rho0)  # for h only (its λ, ρ are not used)
    lambd = torch.full((2 * K,), 1e-6, dtype=torch.float64)
    rho = torch.full((2 * K,), rho0, dtype=torch.float64)
    previous, history = None, []
    for epoch, batches in enumerate(epoch_batches, start=1):
        grads, hs, n = 0, 0, 0
        for logits, labels in batches:
            h = loss.constraints(logits, labels).movedim(1, -1).reshape(-1, 2 * K)
            grads = grads + (lambd + rho * h).clamp(1e-6, 1e6).sum(0)
            hs, n = hs + h.sum(0), n + h.shape[0]
        lambd = (grads / n).clamp(1e-6, 1e6)
        current = hs / n
        if epoch % rho_step == 0 and previous is not None:
            rho = torch.where(current > previous.clamp(min=0) * tao, gamma * rho, rho).clamp(rho0, rho_max)
        previous = current
        history.append((lambd.clone(), rho.clone()))
    return history


def test_multipliers_and_penalty_growth_over_simulated_epochs():
    epochs = [_batches(seed) for seed in range(7)]
    # constraints that stall (new random logits every epoch): ρ grows at epochs 2, 4, 6, capped at rho_max
    expected = _reference_epochs(epochs, 5.0, 0.1, 0.13, 2, 1.2, 0.9)
    loss = build_loss("crac", num_classes=K, margin=5.0, rho=0.1, rho_max=0.13, rho_step=2)
    for epoch, batches in enumerate(epochs, start=1):
        for logits, labels in batches:
            loss(logits, labels)
        logged = loss.end_epoch(epoch)
        lambd, rho = expected[epoch - 1]
        assert torch.allclose(loss.lambd, lambd, rtol=1e-12), epoch
        assert torch.equal(loss.rho, rho), epoch
        assert logged["crac/lambda_b1"] == pytest.approx(float(lambd[1])) and logged["crac/rho_i0"] == float(rho[K])
    assert torch.equal(expected[0][1], torch.full((2 * K,), 0.1, dtype=torch.float64))  # no growth before epoch 2
    assert (expected[1][1] > expected[0][1]).any() and torch.allclose(expected[-1][1].max(), torch.tensor(0.13,
                                                                                                      dtype=torch.float64))
    assert (loss.lambd[:K] > 1e-3).all()  # boundary multipliers moved off λ_min


def test_a_constraint_that_falls_keeps_its_penalty():
    labels = torch.zeros(1, 6, 6, dtype=torch.long)
    loss = build_loss("crac", num_classes=2, margin=1.0, rho=0.5, rho_step=1)
    def epoch(number: int, scale: float) -> None:
        logits = torch.ones(1, 2, 6, 6)  # class 0: |m·τ − l| = |1 − 1| = 0 on every (interior) pixel
        logits[:, 1] = scale  # class 1: |0 − scale|
        loss(logits, labels)
        loss.end_epoch(number)

    for number, scale in enumerate([4.0, 2.0, 1.0], start=1):  # h halves each epoch: below 0.9 × the previous
        epoch(number, scale)
    assert torch.equal(loss.rho, torch.full((4,), 0.5, dtype=torch.float64))
    epoch(4, 3.0)  # the constraint grows: the interior class-1 column's ρ grows, no other
    assert loss.rho.tolist() == pytest.approx([0.5, 0.5, 0.5, 0.6])


def _train(epochs: int, run_dir, resume: bool = False, uri: str | None = None):
    torch.manual_seed(0)
    images = torch.randn(8, 1, 8, 8)
    labels = (images > 0.3).long() + (images > 1.0).long()
    data = [{"image": images[i], "label": labels[i]} for i in range(8)]
    loader = DataLoader(data, batch_size=4, shuffle=False)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, K, 1))
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-2)
    loss = build_loss("crac", num_classes=K, rho_step=2)
    trainer = create_trainer(net, loss, optimizer, loader, torch.device("cpu"), 4)
    tracker = None
    if uri is not None:
        tracker = RunTracker("crac", "crac", uri=uri)
        tracker.engine_handler().attach(trainer)
    checkpoint = TrainingCheckpoint(run_dir / "last.pt", net, optimizer, loss=loss)
    checkpoint.attach(trainer)
    if resume:
        checkpoint.load(trainer)
        assert torch.equal(loss.lambd, torch.load(run_dir / "last.pt", weights_only=True)["loss"]["lambd"])

    def stop(engine):
        if engine.state.epoch == epochs:
            engine.terminate()

    trainer.add_event_handler(Events.EPOCH_COMPLETED, stop)
    trainer.run()
    if tracker is not None:
        tracker.finish()
    return net, loss, tracker


def test_multipliers_continue_exactly_after_a_resume_from_last_pt(tmp_path):
    whole, interrupted = tmp_path / "whole", tmp_path / "interrupted"
    whole.mkdir(), interrupted.mkdir()
    net_a, loss_a, _ = _train(4, whole)
    _train(2, interrupted)  # stops after epoch 2, its last.pt written
    state = torch.load(interrupted / "last.pt", weights_only=True)
    assert state["epoch"] == 2 and set(state["loss"]) == {"lambd", "rho", "previous", "has_previous"}
    net_b, loss_b, _ = _train(4, interrupted, resume=True)
    for key, value in loss_a.state_dict().items():
        assert torch.equal(value, loss_b.state_dict()[key]), key
    assert (loss_a.lambd > 1e-6).any() and (loss_a.rho > 0.1).any()  # the state moved (ρ grew at epoch 4)
    for a, b in zip(net_a.state_dict().values(), net_b.state_dict().values()):
        assert torch.equal(a, b)
    fresh = build_loss("crac")  # built without num_classes (as from configs/loss/crac.yaml): sized by the state
    fresh.load_state_dict(torch.load(interrupted / "last.pt", weights_only=True)["loss"])
    assert fresh.num_classes == K and torch.equal(fresh.rho, loss_b.rho)


def test_multipliers_are_logged_per_epoch_to_mlflow(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    (tmp_path / "run").mkdir()
    _, loss, tracker = _train(4, tmp_path / "run", uri=uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    history = sorted(client.get_metric_history(tracker.run_id, "train/crac/rho_b0"), key=lambda m: m.step)
    assert len(history) == 4 and history[-1].value == pytest.approx(float(loss.rho[0]))
    keys = client.get_run(tracker.run_id).data.metrics
    assert {f"train/crac/{q}_{r}{c}" for q in ("lambda", "rho") for r in "bi" for c in range(K)} <= set(keys)
    assert {"train/ce", "train/penalty", "train/constraint"} <= set(keys)


def _two_process_worker(local_rank: int, queue):
    import ignite.distributed as idist

    rank = idist.get_rank()
    loss = build_loss("crac", num_classes=K, rho_step=1)
    for epoch in (1, 2):
        for logits, labels in _batches(10 * epoch + rank):  # each process its own batches
            loss(logits, labels)
        loss.end_epoch(epoch)
    queue.put((rank, {k: v.tolist() for k, v in loss.state_dict().items()}))


def test_two_processes_hold_the_multipliers_of_all_their_batches():
    import ignite.distributed as idist
    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").Queue()
    with idist.Parallel(backend="gloo", nproc_per_node=2) as parallel:
        parallel.run(_two_process_worker, queue)
    states = dict(queue.get(timeout=120) for _ in range(2))
    single = build_loss("crac", num_classes=K, rho_step=1)  # one process seeing both processes' batches
    for epoch in (1, 2):
        for logits, labels in _batches(10 * epoch) + _batches(10 * epoch + 1):
            single(logits, labels)
        single.end_epoch(epoch)
    for key, value in single.state_dict().items():
        assert states[0][key] == states[1][key], key  # identical in both processes
        assert torch.allclose(torch.tensor(states[0][key], dtype=value.dtype).double(), value.double(), rtol=1e-12), key
    assert (torch.tensor(states[0]["rho"]) > 0.1).any()  # ρ grew at epoch 2
