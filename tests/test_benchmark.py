"""The benchmarks' smoke runs (what CI runs instead of the timing): every workload and variant builds,
convlora and PEFT agree on each model, the JSON report has every row the README table needs, and the
per-layer breakdown accounts for every adapted layer with each LoRA-only kernel."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_lora.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_lora", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_lora"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_lora", None)


def test_smoke_run_writes_the_full_report(bench, tmp_path):
    out = tmp_path / "smoke.json"
    report = bench.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["settings"]["smoke"] and report["settings"]["repeats"] == 1
    assert {"cpu", "torch", "peft", "diffusers", "torch_threads"} <= report["machine"].keys()
    assert set(report["results"]) == {"unet-tiny", "cnn2d", "cnn1d", "cnn3d"}
    unet = report["results"]["unet-tiny"]
    assert list(unet["train"]) == ["frozen floor", "convlora attn", "peft attn", "convlora full", "peft full",
                                   "full fine-tuning"]
    assert list(unet["infer"]) == ["base", "convlora merged (eval)", "convlora unmerged", "peft unmerged"]
    for result in report["results"].values():
        for row in result["train"].values():
            assert row["ms_median"] > 0 and row["x_floor"] > 0
            assert row["memory"]["saved_plus_grads_mib"] > 0
        assert result["train"]["frozen floor"]["memory"]["grads_mib"] == 0
    assert unet["train"]["convlora full"]["x_peft"] > 0
    assert {g["model"] for g in report["goals"].values()} == {"unet-tiny"}


def test_unknown_workload_is_refused(bench):
    with pytest.raises(SystemExit, match="unknown workload"):
        bench.main(["--smoke", "--models", "unet-huge"])


@pytest.fixture(scope="module")
def breakdown(bench):  # imports bench_lora by name: the `bench` fixture registers it
    spec = importlib.util.spec_from_file_location("layer_breakdown", BENCH.parent / "layer_breakdown.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_layer_breakdown_smoke_accounts_for_every_adapted_layer(bench, breakdown, tmp_path):
    out = tmp_path / "breakdown.json"
    report = breakdown.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    rows, totals = report["layers"], report["totals"]

    import convlora

    workload = bench.workloads(True)["unet-tiny"]()
    model = bench._convlora(bench._freeze(workload.build()), workload.presets["full"])
    assert sum(r["count"] for r in rows) == len(convlora.lora_layers(model))  # every adapted layer, once
    assert {r["kind"] for r in rows} == {"Linear", "Conv2d"}
    for row in rows:
        assert set(row["kernels"]) == {"dA", "dB", "h", "g_h", "dx"}
        assert row["kernels_ms"] == sum(k["ms"] for k in row["kernels"].values())
        assert all(k["ms"] >= 0 and k["form"] in ("thin", "ride", "fold") for k in row["kernels"].values())
        assert row["base_ms"] > 0 and row["x_base"] > 0
    assert totals["kernels_ms"] == pytest.approx(sum(totals["kernels_by_name_ms"].values()))
    assert totals["bound_x_floor"] == pytest.approx(1 + totals["kernels_ms"] / totals["floor_ms"])
    assert totals["floor_ms"] > totals["adapted_layers_base_ms"] * 0.5  # the layers are part of the floor


def test_layer_breakdown_refuses_an_unknown_preset(breakdown):
    with pytest.raises(SystemExit, match="unknown preset"):
        breakdown.main(["--smoke", "--preset", "everything"])


def test_adapter_dispatch_smoke_run_reports_every_variant(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_adapters", BENCH.with_name("bench_adapters.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "adapters.json"
    report = module.main(["--smoke", "--repeats", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    for name in ("linear 64", "conv3x3 16"):
        assert list(report[name]) == ["kernel", "layer, 1 adapter", "layer, 2 adapters"]
        assert report[name]["kernel"]["ratio_to_kernel"] == 1.0
        assert all(row["median_us"] > 0 and row["ratio_to_kernel"] > 0 for row in report[name].values())
