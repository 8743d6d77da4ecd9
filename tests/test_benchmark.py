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


@pytest.mark.slow
def test_concept_ablation_smoke_runs_a_lora_variant_and_full_finetuning_and_counts_every_preset(tmp_path):
    spec = importlib.util.spec_from_file_location("concept_ablation", BENCH.parent / "concept_ablation.py")
    ablation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablation)
    out = tmp_path / "ablation.json"
    # one LoRA variant runs (the three share every line of the script but the preset); the counts cover all
    report = ablation.main(["--smoke", "--presets", "attn:43", "--out", str(out)])
    assert json.loads(out.read_text())["trainable_parameters"] == report["trainable_parameters"] == {
        "attn r43": 247_680, "attn-ff r20": 253_440, "full r8": 249_600, "full fine-tuning": 1_427_012}
    assert [(r["variant"], r["seed"]) for r in report["runs"]] == [("attn r43", 0), ("full fine-tuning", 0)]
    known = {"t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "ankle boot"}
    for run in report["runs"]:
        assert set(run["scores"]) == known | {"bag"} and set(run["class_ratio"]) == known
        assert 0 <= run["concept_score"] <= 1 and run["seconds"] > 0
    # the fine-tuned UNet starts from the base: with 2 steps at lr 1e-4 its images are the base's, nearly
    ft = report["runs"][-1]
    assert ft["scores"]["bag"]["base"] == report["runs"][-2]["scores"]["bag"]["base"]


def test_adapter_kinds_smoke_matches_the_parameter_counts_and_times_every_kind(bench, tmp_path):  # `bench` registers bench_lora
    spec = importlib.util.spec_from_file_location("adapter_kinds", BENCH.parent / "adapter_kinds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "kinds.json"
    report = module.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    rows = report["kinds"]
    # the tiny UNet is the embedded base's shape: LoRA r8's count, LoHa at half the rank exactly, LoKr's nearest pair
    assert {name: row["trainable_parameters"] for name, row in rows.items()} == {
        "lora r8": 249_600, "dora r8": 259_168, "loha r4": 249_600, "lokr r15 f2": 233_700}
    assert [row["kind"] for row in rows.values()] == ["lora", "dora", "loha", "lokr"] and rows["lokr r15 f2"]["factor"] == 2
    assert rows["lora r8"]["step_x_lora"] == 1.0 and rows["lora r8"]["parameters_x_lora"] == 1.0
    assert all(row["ms_median"] > 0 and row["step_x_lora"] > 0 and len(row["ms_all"]) == 1 for row in rows.values())


@pytest.mark.slow
def test_kinds_demo_smoke_runs_a_kind_and_counts_every_kind(tmp_path):
    spec = importlib.util.spec_from_file_location("kinds_demo", BENCH.parent / "kinds_demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    out = tmp_path / "kinds.json"
    # one kind runs (the four share every line of the script but their flags); the counts cover all
    report = demo.main(["--smoke", "--kinds", "lokr r15 f2", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["trainable_parameters"] == {"lora r8": 249_600, "dora r8": 259_168, "loha r4": 249_600, "lokr r15 f2": 233_700}
    (run,) = report["runs"]
    known = {"t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "ankle boot"}
    assert (run["variant"], run["seed"], run["adapter"]) == ("lokr r15 f2", 0, "lokr")
    assert set(run["scores"]) == known | {"bag"} and set(run["class_ratio"]) == known and run["seconds"] > 0
    assert report["summary"]["lokr r15 f2"]["seeds"] == [0]


def test_svd_routes_smoke_reports_every_route(bench, tmp_path):  # imports bench_lora by name: the `bench` fixture registers it
    spec = importlib.util.spec_from_file_location("svd_routes", BENCH.parent / "svd_routes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "svd.json"
    report = module.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    factored, dense = report["cases"]["factored"]["routes"], report["cases"]["dense"]["routes"]
    assert list(factored) == ["full svd (dense, float32)", "svd_lowrank q=k+10 niter=2 (dense)", "factored QR + r x r SVD"]
    assert list(dense) == ["full svd (float32)", "svd_lowrank q=k+10 niter=2", "svd_lowrank q=k+10 niter=6"]
    assert factored["factored QR + r x r SVD"]["relative_error"] < 1e-6  # the exact route convlora uses
    assert dense["full svd (float32)"]["within_1e-4"] and dense["svd_lowrank q=k+10 niter=2"]["relative_error"] > 1e-4
    assert all(row["ms_median"] > 0 for routes in (factored, dense) for row in routes.values())


def test_lowmem_smoke_measures_every_variant(bench, tmp_path):  # imports bench_lora by name: `bench` registers it
    spec = importlib.util.spec_from_file_location("lowmem", BENCH.parent / "lowmem.py")
    lowmem = importlib.util.module_from_spec(spec)
    sys.modules["lowmem"] = lowmem  # dataclasses look their module up there
    try:
        spec.loader.exec_module(lowmem)
        out = tmp_path / "lowmem.json"
        report = lowmem.main(["--smoke", "--out", str(out)])
    finally:
        sys.modules.pop("lowmem", None)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    rows = report["result"]["rows"]
    assert list(rows) == ["baseline", "+ gradient checkpointing", "+ 8-bit Adam", "+ cached text embeddings", "all three"]
    base = rows["baseline"]
    assert all(row["ms_median"] > 0 and row["grads_mib"] == base["grads_mib"] > 0 for row in rows.values())
    # each option saves what it is for, in exact bytes
    assert rows["+ gradient checkpointing"]["saved_mib"] < base["saved_mib"]
    assert rows["+ 8-bit Adam"]["held_mib"] < base["held_mib"]
    assert rows["+ cached text embeddings"]["held_mib"] < base["held_mib"]
    assert rows["all three"]["accounted_mib"] < min(r["accounted_mib"] for n, r in rows.items() if n != "all three")


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


def test_quant_base_smoke_reports_accuracy_bytes_and_training_rows(bench, tmp_path):  # `bench` registers bench_lora
    spec = importlib.util.spec_from_file_location("quant_base", BENCH.parent / "quant_base.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "quant.json"
    report = module.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    errors = report["accuracy"]["unet-tiny"]
    assert set(errors) == {"bfloat16", "float16", "nf4", "int8", "fp8", "bf16", "fp16"}
    assert errors["fp16"] < errors["int8"] < errors["fp8"] < errors["nf4"] < 0.5
    sizes = report["frozen_bytes"]["unet-tiny"]
    assert sizes["bf16"]["x_bf16"] == 1.0 and 0.25 < sizes["nf4"]["x_bf16"] < 0.27
    assert sizes["bitsandbytes Linear4bit (PEFT / diffusers)"]["convkxk"] == sizes["bf16"]["convkxk"]
    rows = report["training"]["unet-tiny"]
    assert list(rows) == ["convlora fp32", "convlora bf16 storage", "convlora fp8", "convlora int8", "convlora nf4",
                          "peft + bitsandbytes Linear4bit"]
    assert rows["convlora nf4"]["frozen_mib"] < rows["convlora int8"]["frozen_mib"] < rows["convlora fp32"]["frozen_mib"]
    assert all(row["ms_median"] > 0 and row["grads_mib"] > 0 for row in rows.values())
