"""The parts of every composite loss reach MLflow once per epoch as ``train/<part>``, through the trainer's events."""

import mlflow
import pytest
import torch
from torch.utils.data import DataLoader

from pipeline.engines import create_trainer
from pipeline.losses import LOSSES, build_loss
from pipeline.tracking import RunTracker

#: loss name -> (parts, how the loss is made of them with the default alpha = 0.1)
COMPOSITES = {
    "ce_dice": ({"ce", "dice"}, lambda p: p["ce"] + p["dice"]),
    "ecp": ({"ce", "entropy"}, lambda p: p["ce"] - 0.1 * p["entropy"]),
    "mbls": ({"ce", "penalty"}, lambda p: p["ce"] + 0.1 * p["penalty"]),
    "mbls_l2": ({"ce", "penalty"}, lambda p: p["ce"] + 0.1 * p["penalty"]),
    "mbls_dice": ({"ce", "dice", "penalty"}, lambda p: p["ce"] + p["dice"] + 0.1 * p["penalty"]),
    "nacl": ({"ce", "penalty"}, lambda p: p["ce"] + 0.1 * p["penalty"]),
    "crac": ({"ce", "penalty", "constraint"}, lambda p: p["ce"] + p["penalty"]),
    "ace_hard": ({"ace", "dice", "ce"}, lambda p: 0.33 * (p["ace"] + p["dice"] + p["ce"])),
    "ace_soft": ({"ace", "dice", "ce"}, lambda p: 0.33 * (p["ace"] + p["dice"] + p["ce"])),
    "acls": ({"ce", "penalty"}, lambda p: p["ce"] + 0.1 * p["penalty"]),
}
EPOCHS = 2


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlruns.db"


def _train(loss_name: str, uri: str) -> tuple[str, dict]:
    torch.manual_seed(0)
    images = torch.randn(6, 1, 8, 8)
    labels = (images > 0.5).long() + (images > 1.2).long()  # 3 classes
    data = [{"image": images[i], "label": labels[i]} for i in range(6)]
    loader = DataLoader(data, batch_size=2, shuffle=False)  # 3 iterations per epoch
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 3, 1))
    with torch.no_grad():
        net[-1].weight.mul_(30)  # large logits: the margin penalties are non-zero from the start
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3)
    trainer = create_trainer(net, build_loss(loss_name, **({"margin": 1.0} if "mbls" in loss_name else {})),
                             optimizer, loader, torch.device("cpu"), EPOCHS)
    tracker = RunTracker("losses", loss_name, uri=uri)
    tracker.engine_handler().attach(trainer)
    trainer.run()
    tracker.finish()
    client = mlflow.MlflowClient(tracking_uri=uri)
    keys = client.get_run(tracker.run_id).data.metrics.keys()
    history = {k: [m.value for m in sorted(client.get_metric_history(tracker.run_id, k), key=lambda m: m.step)]
               for k in keys if k.startswith("train/")}
    return tracker.run_id, history


@pytest.mark.parametrize("name", sorted(COMPOSITES))
def test_composite_parts_logged_per_epoch(name, uri):
    parts, combine = COMPOSITES[name]
    _, history = _train(name, uri)
    # (CRaC's multipliers, logged under train/crac/, are tested in tests/test_losses_crac.py)
    assert {k[len("train/"):] for k in history if not k.startswith("train/crac/")} == {"loss", "lr"} | parts
    for key in history:
        assert len(history[key]) == EPOCHS, key
    if "penalty" in parts and name != "acls":  # ACLS's penalty needs logits beyond its margin of 10
        assert min(history["train/penalty"]) > 0
    for epoch in range(EPOCHS):
        values = {p: history[f"train/{p}"][epoch] for p in parts}
        # the epoch means of the parts add up to the epoch mean of the loss the trainer optimised
        assert history["train/loss"][epoch] == pytest.approx(combine(values), rel=1e-5)


def test_single_term_losses_log_only_the_loss(uri):
    _, history = _train("focal", uri)
    assert set(history) == {"train/loss", "train/lr"}


def test_every_composite_loss_is_covered():
    torch.manual_seed(0)
    found = set()
    for name in LOSSES:
        loss = build_loss(name)
        loss(torch.randn(1, 3, 4, 4), torch.zeros(1, 1, 4, 4))
        if loss.parts:
            found.add(name)
    assert found == set(COMPOSITES)
