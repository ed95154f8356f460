"""The loss benchmark runs end to end on a tiny input (its timings are not checked here)."""

from pipeline.benchmarks import losses as bench
from pipeline.losses import LOSSES


def test_bench_times_every_loss_and_the_reference(capsys):
    results = bench.run(batch=1, classes=3, size=8, repeats=2, iters=1, warmup=1)
    assert list(results) == ["ce", *sorted(set(LOSSES) - {"ce"})]
    assert results["ce"]["ratio"] == 1.0
    assert all(r["ms"] > 0 and r["ratio"] > 0 for r in results.values())
    assert bench.main(["--batch", "1", "--classes", "3", "--size", "8", "--repeats", "1", "--iters", "1",
                       "--step-repeats", "0"]) == 0
    out = capsys.readouterr().out
    assert "| mbls |" in out and "mbls / ce = " in out


def test_training_step_comparison_times_both_losses():
    st = bench.training_step_times(repeats=2, steps=1, warmup=1)
    assert st["ce_ms"] > 0 and st["mbls_ms"] > 0 and st["mbls_over_ce"] > 0
    assert st["input"] == "4×1×80×96"  # the default run: batch 4 of the mni dataset's 80×96 crop


def test_training_step_comparison_times_the_methods_since_the_paper(capsys):
    st = bench.training_step_times(repeats=1, steps=1, warmup=1, losses=["nacl", "crac"])
    assert st["nacl_ms"] > 0 and st["crac_over_ce"] > 0 and "mbls_ms" not in st
    assert bench.main(["--batch", "1", "--classes", "3", "--size", "8", "--repeats", "1", "--iters", "1",
                       "--step-repeats", "1", "--step-iters", "1", "--step-losses", "acls,ace_soft"]) == 0
    out = capsys.readouterr().out
    assert "| acls |" in out and "| ace_soft |" in out and "ms per step" in out
