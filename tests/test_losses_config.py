"""Every loss is one config file away, with the loss's own defaults, and its parameters can be overridden."""

import inspect
import re

import pytest
import yaml

from pipeline import cli
from pipeline.config import CONFIG_DIR, available, load_config
from pipeline.losses import LOSSES


def test_every_loss_has_a_config_and_every_config_a_loss():
    assert available("loss") == sorted(LOSSES)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_config_lists_the_parameters_with_their_defaults(name):
    path = CONFIG_DIR / "loss" / f"{name}.yaml"
    loss_cfg = yaml.safe_load(path.read_text())["loss"]
    assert loss_cfg["_target_"] == "pipeline.losses.build_loss" and loss_cfg["name"] == name
    params = {k: v for k, v in loss_cfg.items() if k not in ("_target_", "name")}
    signature = inspect.signature(LOSSES[name].__init__).parameters
    defaults = {k: p.default for k, p in signature.items() if k != "self"}
    assert params == defaults
    # each parameter line carries a trailing comment that states the same default
    for key, value in params.items():
        (line,) = [ln for ln in path.read_text().splitlines() if ln.strip().startswith(f"{key}:")]
        comment = line.partition("#")[2]
        match = re.search(r"default (\S+?)[;,)\s]", comment + " ")
        assert match, f"{path.name}: no 'default …' comment for {key}"
        assert yaml.safe_load(match.group(1)) == value, f"{path.name}: comment default for {key}"


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_config_builds_the_loss(name):
    loss = load_config("mni", name, "unet").get_parsed_content("loss")
    assert type(loss) is LOSSES[name]


def _parser(argv):
    ap = cli.argparse.ArgumentParser()
    cli._add_selection(ap)
    return cli.build_parser(ap.parse_args(argv))


def test_loss_args_override_the_parameters():
    loss = _parser(["--loss", "focal", "--loss-args", "gamma=2"]).get_parsed_content("loss")
    assert loss.gamma == 2.0
    loss = _parser(["--loss", "mbls_l2", "--loss-args", "margin=8, alpha=0.2,one_sided=false"])
    loss = loss.get_parsed_content("loss")
    assert (loss.margin, loss.alpha, loss.one_sided, loss.penalty) == (8.0, 0.2, False, "l2_two_sided")
    loss = _parser(["--loss", "svls", "--set", "loss::sigma=0.5"]).get_parsed_content("loss")
    assert loss.sigma == 0.5


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--loss", "focal", "--loss-args", "gama=2"],
         "error: loss 'focal' has no parameter 'gama'; its parameters are: gamma"),
        (["--loss", "mbls", "--loss-args", "margin=-3"], "error: margin must be a number >= 0, got -3"),
        (["--loss", "mbls", "--loss-args", "margin"], "error: expected KEY=VALUE, got 'margin'"),
        (["--loss", "focl"], "error: unknown loss 'focl'. Did you mean 'focal'?"),
    ],
)
def test_bad_loss_arguments_stop_the_command_with_a_clear_message(argv, message, capsys):
    # the loss is checked before any data is read or any run folder is made
    assert cli.main(["train", *argv, "--epochs", "1", "--set", "output_dir=/nonexistent/never-written"]) == 2
    assert message in capsys.readouterr().err
