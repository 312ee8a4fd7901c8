import statistics

import pytest
import torch

from minissl import cli, losses, ops, stepbench
from minissl.nets.unet import UNet

SMALL = ["--width", "4", "--depth", "2", "--batch_size", "4", "--labeled_bs", "2"]


def test_time_steps_counts_every_part_once_and_restores_the_code(tiny_stores):
    originals = (UNet.encode, UNet.decode, torch.autograd.backward, ops.mix, ops.largest_component,
                 losses.copy_paste_loss)
    got = stepbench.time_steps("bcp", "cardiac", iters=2, warmup=1, at=0.5, data_root=str(tiny_stores["cardiac"]),
                               overrides=SMALL)  # step 20 of 40: BCP's self-training stage
    parts = got["parts"]
    assert set(parts) == set(stepbench.PARTS) and len(got["wall"]) == len(got["cpu"]) == 2
    for part in ("forward", "backward", "optimiser", "loss", "mixing", "post", "after_step", "data"):
        assert parts[part] > 0, part
    step = statistics.mean(got["wall"])
    assert abs(sum(parts.values()) - step) < 0.2 * step  # exclusive times add up to the step
    assert originals == (UNet.encode, UNet.decode, torch.autograd.backward, ops.mix, ops.largest_component,
                         losses.copy_paste_loss)


def test_clock_counts_nested_parts_in_the_innermost():
    clock = stepbench.Clock()
    inner = clock.wrap(lambda: sum(range(20000)), "loss")
    outer = clock.wrap(lambda: [inner() for _ in range(3)], "forward")
    clock.enter("other")
    outer()
    clock.leave()
    assert clock.seconds["loss"] > 0 and clock.seconds["forward"] > 0 and clock.seconds["other"] > 0
    assert clock._stack == []


def test_bench_step_command_prints_both_tables(tiny_stores, capsys):
    argv = ["bench", "step", "--data_root", str(tiny_stores["cardiac"]), "--methods", "supervised", "--iters", "1",
            "--warmup", "0", "--repeats", "1", "--kernels", "reference"] + SMALL
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "| supervised | reference | CPU | " in out and "| supervised | reference | wall | " in out
    for variant in stepbench.VARIANTS:
        assert f"| supervised | reference | {variant} | " in out


@pytest.mark.parametrize("kwargs, message", [
    ({"kernels": ["gpu"]}, r"--kernels: expected some of \('kernels', 'reference'\), got \['gpu'\]"),
    ({"iters": 0}, "--iters: expected at least 1, got 0"),
    ({"at": 1.0}, r"--at: expected a fraction of max_iters in \[0, 1\), got 1.0"),
    ({"methods": ["nope"]}, "unknown method 'nope'"),
])
def test_bench_step_rejects_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        stepbench.bench_step(**kwargs)


def _peak_gib(table: str, method: str) -> float:
    row = next(line for line in table.splitlines() if line.startswith(f"| {method} |"))
    return float(row.split("|")[2])


def test_bench_memory_measures_each_method_at_the_patch_size_and_names_the_others(tiny_stores, capsys):
    """A patch with 8x the voxels needs more memory; ERSR (2D binary) is named, not run."""
    root = str(tiny_stores["atrium"])
    small = stepbench.bench_memory("atrium", ["supervised", "ersr"], [8, 16, 16], steps=1, data_root=root,
                                   overrides=SMALL, kernels="reference")
    assert "| method | peak GiB | <= 8 GiB |" in small and "Not applicable: ersr (" in small
    argv = ["bench", "step", "--data_root", root, "--memory", "16,64,64", "--methods", "supervised", "--steps", "1",
            "--kernels", "reference", "--limit_gib", "0.001"] + SMALL
    assert cli.main(argv) == 0
    large = capsys.readouterr().out
    assert "| supervised |" in large and large.count("| NO |") == 1  # above the (tiny) limit
    assert _peak_gib(large, "supervised") > _peak_gib(small, "supervised") + 0.01  # 32x the voxels


@pytest.mark.parametrize("kwargs, message", [
    ({"shape": [16, 16]}, r"--memory: expected 3 sizes for suite 'atrium', got \[16, 16\]"),
    ({"shape": [0, 16, 16]}, r"--memory: expected positive patch sizes, got \[0, 16, 16\]"),
    ({"steps": 0}, "--steps: expected at least 1, got 0"),
])
def test_bench_memory_rejects_bad_options(tiny_stores, kwargs, message):
    args = {"shape": [8, 16, 16], **kwargs}
    with pytest.raises(ValueError, match=message):
        stepbench.bench_memory("atrium", ["supervised"], data_root=str(tiny_stores["atrium"]), overrides=SMALL,
                               kernels="reference", **args)
