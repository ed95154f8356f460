import subprocess
import sys

import pytest

from pipeline.config import REPO_ROOT, available, config_files, load_config, parse_assignments
from pipeline.registry import UnknownNameError


def test_available_names_come_from_config_files():
    assert "mni" in available("dataset")
    assert {"ce", "mbls"} <= set(available("loss"))
    assert "unet" in available("backbone")


@pytest.mark.parametrize(
    "kwargs, kind, hint",
    [
        ({"dataset": "mnii"}, "dataset", "mni"),
        ({"loss": "mlbs"}, "loss", "mbls"),
        ({"backbone": "unett"}, "backbone", "unet"),
    ],
)
def test_unknown_names_fail_at_once_with_the_list(kwargs, kind, hint):
    args = {"dataset": "mni", "loss": "mbls", "backbone": "unet", **kwargs}
    with pytest.raises(UnknownNameError) as err:
        config_files(**args)
    msg = str(err.value)
    assert f"unknown {kind}" in msg and f"Did you mean '{hint}'" in msg
    assert ", ".join(available(kind)) in msg


def test_layering_and_overrides():
    parser = load_config("mni", "mbls", "unet", overrides={"loss::margin": 8, "epochs": 3})
    assert parser["loss"]["margin"] == 8 and parser["loss"]["alpha"] == 0.1
    assert parser["epochs"] == 3
    assert parser["dataset_name"] == "mni" and parser["backbone"]["_target_"].endswith("UNet")
    loss = parser.get_parsed_content("loss")
    assert type(loss).__name__ == "MarginLoss" and loss.margin == 8


def test_override_of_a_missing_key_is_refused():
    with pytest.raises(KeyError, match="no top-level key 'epoch'"):
        load_config("mni", "ce", "unet", overrides={"epoch": 3})
    with pytest.raises(KeyError, match="no 'los'"):
        load_config("mni", "ce", "unet", overrides={"los::margin": 3})


def test_parse_assignments():
    assert parse_assignments("margin=8, alpha=0.2", prefix="loss::") == {"loss::margin": 8, "loss::alpha": 0.2}
    assert parse_assignments(["a::b=[1, 2]", "c=x"]) == {"a::b": [1, 2], "c": "x"}
    assert parse_assignments("crop=[64, 64],slab=3") == {"crop": [64, 64], "slab": 3}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_assignments(["margin"])


def test_cli_misspelt_loss_exits_with_message():
    proc = subprocess.run([sys.executable, "-m", "pipeline", "train", "--loss", "mbsl"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown loss 'mbsl'. Did you mean 'mbls'? Valid loss names: ace_hard, ace_soft, acls, ce," in proc.stderr
