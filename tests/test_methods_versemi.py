"""VerSemi's parts: the task-prompted dynamic head, the aggregated target, the suites-to-tasks mapping of the
data layer, and a multi-suite run evaluated per suite."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minissl import engine
from minissl.config import load_config
from minissl.data import datasets
from minissl.data.sources import check_store, open_data
from minissl.methods.versemi import PromptedUNet, VerSemi, aggregate_foreground, foreground_dice
from minissl.nets import UNet
from minissl.run import Run


def test_dynamic_head_uses_per_sample_weights_generated_from_the_prompt():
    torch.manual_seed(0)
    net = PromptedUNet(UNet(1, 8, spatial_dims=2, width=4, depth=2), num_prompts=3, num_classes=4).eval()
    x = torch.rand(1, 1, 16, 16).expand(3, 1, 16, 16)  # one image, three prompts
    task = torch.tensor([0, 1, 2])
    with torch.no_grad():
        logits = net(x, task)  # (3, 4, 16, 16)
        h, g = net.features(x)
        for b in range(3):  # the head of sample b, built by hand as 1x1 convolutions from the controller's output
            theta = net.controller.weight @ torch.cat([g[b], F.one_hot(task[b], 3).float()]) + net.controller.bias
            w1, c1, w2, c2, w3, c3 = theta.split([64, 8, 64, 8, 32, 4])
            z = F.relu(F.conv2d(h[b:b + 1], w1.view(8, 8, 1, 1), c1))
            z = F.relu(F.conv2d(z, w2.view(8, 8, 1, 1), c2))
            assert torch.allclose(logits[b:b + 1], F.conv2d(z, w3.view(4, 8, 1, 1), c3), atol=1e-5)
        assert not torch.allclose(logits[0], logits[1])  # the prompt changes the head
        swapped = net(x, torch.tensor([0, 2, 2]))
        assert torch.equal(swapped[0], logits[0]) and torch.equal(swapped[2], logits[2])  # per sample
    with pytest.raises(ValueError, match=r"PromptedUNet: expected one task in \[0, 3\) per sample \(3\), "
                                         r"got \[0, 1, 3\]"):
        net(x, torch.tensor([0, 1, 3]))


def test_dynamic_head_in_3d():
    net = PromptedUNet(UNet(1, 8, spatial_dims=3, width=4, depth=1), num_prompts=2, num_classes=2)
    assert net(torch.rand(2, 1, 4, 8, 8), torch.tensor([0, 1])).shape == (2, 2, 4, 8, 8)


def test_aggregated_target_is_the_largest_task_foreground_by_hand():
    # task A: background 0.9 (fg 0.1) at voxel 0, 0.2 (fg 0.8) at voxel 1; task B: background 0.3, 0.6
    a = torch.log(torch.tensor([[[0.9, 0.2], [0.05, 0.5], [0.05, 0.3]]]))  # (1, C=3, 2): two foreground classes
    b = torch.log(torch.tensor([[[0.3, 0.6], [0.7, 0.4]]]))  # (1, C=2, 2)
    b = torch.cat([b, torch.full((1, 1, 2), -math.inf)], 1)  # same channel count, the extra class never chosen
    agg = aggregate_foreground([a, b])
    assert torch.allclose(agg, torch.tensor([[0.7, 0.8]]))


def test_foreground_dice_by_hand():
    # p_fg = (1, 0.5), target (1, 0): squared Dice 1 - (2*1 + s) / (1 + 0.25 + 1 + s)
    logits = torch.tensor([[[[-50.0, 0.0]], [[50.0, 0.0]]]])  # (1, 2, 1, 2)
    target = torch.tensor([[[1.0, 0.0]]])  # (1, 1, 2)
    loss = foreground_dice(logits, target)
    assert loss.item() == pytest.approx(1 - (2 + 1e-5) / (2.25 + 1e-5), rel=1e-5)
    inside = foreground_dice(logits, target, target)  # voxel 1 ignored
    assert inside.item() == pytest.approx(0.0, abs=1e-5)


def test_suites_map_to_tasks_in_the_data_layer(tiny_stores):
    both = open_data(f"{tiny_stores['cardiac']},{tiny_stores['fetal_head']}")
    assert isinstance(both, datasets.TaskStore) and both.names == ["cardiac", "fetal_head"]
    assert both.spec.num_classes == 4 and both.spec.name == "cardiac+fetal_head"
    val = both.split("val")
    assert [c.split("/")[0] for c in val] == ["cardiac"] * 2 + ["fetal_head"] * 2
    case = both.read(val[-1])
    assert case.id == val[-1] and case.meta["task"] == 1 and case.label.max() <= 1
    labeled = both.labeled(2, 0)  # the budget counts patients per suite
    assert sorted({c.split("/")[0] for c in labeled}) == ["cardiac", "fetal_head"]
    assert len(set(both.patients([c for c in labeled if c.startswith("cardiac/")]))) == 2
    loader = datasets.make_train_loader(both, labeled, seed=0, batch_size=8, labeled_bs=4)
    for b in range(3):
        batch = loader.batch(b)
        for x, y, t in ((batch["x_l"], batch["y_l"], batch["task_l"]), (batch["x_u"], None, batch["task_u"])):
            assert t.shape == (x.shape[0],) and set(t.tolist()) <= {0, 1}
        assert all(batch["y_l"][i].max() <= 1 for i in range(4) if batch["task_l"][i] == 1)
    assert [t for t, _ in datasets.tasks(both)] == [0, 1]
    assert [t for t, _ in datasets.tasks(open_data(tiny_stores["atrium"]))] == [0]
    with pytest.raises(ValueError, match="TaskStore: suites 'cardiac' and 'atrium' differ in spatial_dims"):
        open_data(f"{tiny_stores['cardiac']},{tiny_stores['atrium']}")
    with pytest.raises(ValueError, match=r"TaskStore: expected a case id '<suite>/<id>' with a suite of"):
        both.read("atrium/x")
    check_store(both, labeled)  # each suite checked on its own
    with pytest.raises(ValueError, match=r"labeled cases: expected cases of the train split, got \['nope'\]"):
        check_store(both, labeled + ["fetal_head/nope"], remember=False)


def test_multi_suite_run_is_evaluated_per_suite_with_its_prompt(tiny_stores, tmp_path):
    suites = f"{tiny_stores['cardiac']},{tiny_stores['fetal_head']}"
    base = dict(suites=suites, out_dir=str(tmp_path), width=4, depth=2, batch_size=4, labeled_bs=2, max_iters=4,
                val_every=2, progress=False)
    with pytest.raises(ValueError, match="--suites: method 'mean_teacher' trains one task; several suites need "
                                         "a task-prompted method \\(versemi"):
        engine.train(load_config(method="mean_teacher", **base))
    res = engine.train(load_config(method="versemi", **base))
    rows = Run(res.run_dir).test_rows
    by_suite = {s: [r for r in rows if r["case"].startswith(s + "/")] for s in ("cardiac", "fetal_head")}
    assert len(by_suite["cardiac"]) == 2 * 3 and len(by_suite["fetal_head"]) == 2 * 1  # each suite's own classes
    assert {r["class"] for r in by_suite["fetal_head"]} == {open_data(tiny_stores["fetal_head"]).spec.class_names[1]}
    method = Run(res.run_dir).load_method()
    x = torch.rand(2, 1, 32, 32)
    assert method.num_tasks == 2 and not torch.allclose(method.predict(x, task=0), method.predict(x, task=1))


def test_versemi_checks_its_options(tiny_stores):
    cfg = load_config(method="versemi", data_root=str(tiny_stores["cardiac"]), max_iters=4, progress=False,
                      method_args={"mix_ratio_min": 0.7, "mix_ratio_max": 0.6})
    with pytest.raises(ValueError, match="versemi: expected 0 < mix_ratio_min <= mix_ratio_max < 1"):
        VerSemi(cfg, open_data(tiny_stores["cardiac"]).spec)
    single = VerSemi(load_config(method="versemi", data_root=str(tiny_stores["cardiac"]), max_iters=4,
                                 progress=False), open_data(tiny_stores["cardiac"]).spec)
    assert single.num_tasks == 1 and single.student.num_prompts == 2
    assert np.isfinite(float(single.training_step(
        {"x_l": torch.rand(2, 1, 32, 32), "y_l": torch.zeros(2, 32, 32, dtype=torch.int64),
         "x_u": torch.zeros(0, 1, 32, 32)}, 0)["loss"].detach()))  # full supervision: no composite
