"""The bench's structure and the agreement of its variants (no timing is asserted)."""
import argparse
import json

import torch

from camgate import bench


def test_bench_reports_every_variant_per_layer_and_one_json_line(capsys):
    p = argparse.ArgumentParser()
    bench.add_args(p)
    args = p.parse_args(["--arch", "resnet18", "--batch-size", "2", "--size", "32", "--rounds", "2",
                         "--warmup", "0", "--mem-images", "", "--threads", "0"])
    threads = torch.get_num_threads()
    try:
        assert bench.main(args) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out.strip().splitlines()
    result = json.loads(printed[-1])
    # the trainable model's ratio to the floor is printed beside the frozen one's
    ratio_lines = [line.split()[0:3] for line in printed if " / floor " in line]
    assert ratio_lines[:2] == [["camgate", "/", "floor"], ["camgate(trainable)", "/", "floor"]]
    t = result["timing"]
    assert set(t["layers"]) == {"layer4", "layer3"} and t["order"] == "rotating"
    for r in t["layers"].values():
        assert set(r["ms_per_batch"]) == set(bench.VARIANTS)
        assert all(s["min"] <= s["median"] <= s["max"] for s in r["ms_per_batch"].values())
        assert {f"{a}_over_{b}" for a, b in bench.RATIOS} == set(r["ratios"])
        # the same maps: camgate (frozen and trainable model) against the floor (raw) and against
        # pytorch-grad-cam (normalised)
        assert r["max_abs_delta"]["camgate_vs_floor_raw"] <= 1e-5
        assert r["max_abs_delta"]["camgate_trainable_vs_floor_raw"] <= 1e-5
        assert r["max_abs_delta"]["camgate_vs_pytorch_grad_cam_normalised"] <= 1e-4


def test_floor_is_a_plain_gradcam():
    torch.manual_seed(0)
    import torchvision

    from camgate.cam import CamEngine

    m = torchvision.models.resnet18(num_classes=5).eval().requires_grad_(False)
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(bench.floor_gradcam(m, m.layer3, x), CamEngine(m, [m.layer3])(x).cams, atol=1e-6)
