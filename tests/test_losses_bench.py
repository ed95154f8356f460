"""The loss benchmark runs end to end on a tiny input (its timings are not checked here)."""

from pipeline.benchmarks import losses as bench
from pipeline.losses import LOSSES, build_loss


def test_bench_times_every_loss_and_the_reference(capsys):
    results = bench.run(batch=1, classes=3, size=8, repeats=2, iters=1, warmup=1)
    assert list(results) == ["ce", *sorted(set(LOSSES) - {"ce"}), bench.REFERENCE]
    assert results["ce"]["ratio"] == 1.0
    assert all(r["ms"] > 0 and r["ratio"] > 0 for r in results.values())
    assert bench.main(["--batch", "1", "--classes", "3", "--size", "8", "--repeats", "1", "--iters", "1",
                       "--step-repeats", "0"]) == 0
    out = capsys.readouterr().out
    assert "| mbls |" in out and "mbls / ce = " in out


def test_plain_reference_is_the_same_loss_as_mbls():
    import torch

    torch.manual_seed(0)
    logits, labels = torch.randn(2, 4, 6, 6) * 10, torch.randint(0, 4, (2, 1, 6, 6))
    a, b = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    va, vb = bench.PlainMarginLoss()(a, labels), build_loss("mbls")(b, labels)
    va.backward()
    vb.backward()
    assert torch.allclose(va, vb) and torch.allclose(a.grad, b.grad, atol=1e-7)


def test_training_step_comparison_times_both_losses():
    st = bench.training_step_times(repeats=2, steps=1, warmup=1)
    assert st["fused_ms"] > 0 and st["plain_ms"] > 0 and st["plain_over_fused"] > 0
    assert st["input"] == "4×1×80×96"  # the default run: batch 4 of the mni dataset's 80×96 crop
