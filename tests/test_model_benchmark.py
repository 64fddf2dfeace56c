"""The whole-model benchmark's pieces (uresnet_models/benchmark.py): the plain and the fused
model are different models with the same weights, the peak memory of a training step is a real
measure, the profile's shares add up, the Amdahl limit. Small models and images: fast."""
import json

import pytest
import torch

import uresnet_ops
from uresnet_models import benchmark as mb

pytestmark = pytest.mark.usefixtures("one_thread")

# the demo's narrow U-ResNet: EUCB (shuffle_upsample) in its decoder
SMALL = dict(name="uresnet", encoder=None, base_channels=8, residual_widths=(16, 32, 16, 16), residual_out_channels=8)


def _pair():
    kwargs = dict(SMALL)
    return mb.plain_and_fused(kwargs.pop("name"), kwargs.pop("encoder"), "cpu", **kwargs)


def _fused_modules(model):
    return [m for m in model.modules() if type(m).__module__ == uresnet_ops.nn.__name__]


def test_plain_and_fused_are_different_models_with_the_same_weights_and_outputs():
    pair = _pair()
    assert _fused_modules(pair["fused"]) and not _fused_modules(pair["plain"])
    assert pair["plain"].state_dict().keys() == pair["fused"].state_dict().keys()
    x, _ = mb.model_inputs(pair["plain"], 2, 32, "cpu")
    with torch.no_grad():
        plain, fused = (pair[k].eval()(x) for k in ("plain", "fused"))
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-5)


def test_the_plain_model_runs_none_of_our_ops_and_the_fused_one_does():
    pair = _pair()
    shares = {}
    for impl, model in pair.items():
        x, target = mb.model_inputs(model, 2, 32, "cpu")
        step = mb.make_step(model, "train", x, target)
        step()  # warm-up, as measure_case does
        shares[impl] = mb.time_shares(step, "cpu")
    for share in shares.values():
        assert 0 <= share["fused"] and 0 < share["conv"] and share["fused"] + share["conv"] <= 1
        assert share["other"] == pytest.approx(1 - share["fused"] - share["conv"]) and share["profiled_s"] > 0
    assert shares["plain"]["fused"] == 0 < shares["fused"]["fused"]


def test_event_names_are_classified_outermost_first():
    assert mb._kind("uresnet_ops::pixel_shuffle_bn") == "fused"
    assert mb._kind("autograd::engine::evaluate_function: shuffle_upsample_functionBackward") == "fused"
    assert mb._kind("torch::autograd::CppNode<uresnet::(anonymous namespace)::MultiDilationConv2dFunction>") == "fused"
    for conv in ("aten::conv2d", "aten::mkldnn_convolution", "aten::conv_transpose2d",
                 "autograd::engine::evaluate_function: ConvolutionBackward0"):
        assert mb._kind(conv) == "conv"
    for other in ("aten::batch_norm", "aten::_convert_indices_from_coo_to_csr", "aten::relu", "Optimizer.step"):
        assert mb._kind(other) is None


def test_training_memory_is_positive_grows_with_the_batch_and_the_fused_decoder_saves_less():
    pair = _pair()
    memory = {}
    for impl, model in pair.items():
        for batch in (2, 8):
            x, target = mb.model_inputs(model, batch, 32, "cpu")
            step = mb.make_step(model, "train", x, target)
            step()
            memory[impl, batch] = mb.step_memory(model, step, "cpu")
    activations = 8 * 32 * 32 * 4 * 8  # at least the first feature map of 8 channels, float32
    for impl in pair:
        small, large = memory[impl, 2], memory[impl, 8]
        assert small["peak_bytes"] > activations / 4 and large["peak_bytes"] > 2.5 * small["peak_bytes"]
        assert activations / 4 < small["saved_bytes"] <= small["peak_bytes"]
        assert large["saved_bytes"] > 3 * small["saved_bytes"]  # activations: in proportion to the batch
    assert mb.step_memory(pair["fused"], step, "cpu") == pytest.approx(memory["fused", 8], rel=0.05)  # repeatable
    # the fused EUCBs save their input only, the plain ones the upsampled map and the conv's output too
    assert memory["fused", 8]["saved_bytes"] < 0.9 * memory["plain", 8]["saved_bytes"]
    assert mb.step_memory(pair["plain"], lambda: None, "cpu") == dict(peak_bytes=0, saved_bytes=None)  # no forward


def test_measure_case_interleaves_and_gives_ratios_memory_and_the_profile():
    rows = mb.measure_case(_pair(), "train", 2, 32, "cpu", rounds=2)
    by_impl = {r["implementation"]: r for r in rows}
    assert set(by_impl) == {"plain", "fused"}
    plain, fused = by_impl["plain"], by_impl["fused"]
    assert len(fused["medians_s"]) == 2 and plain["vs_plain"] == 1.0
    assert fused["vs_plain"] == pytest.approx(plain["median_s"] / fused["median_s"])
    assert fused["peak_vs_plain"] == pytest.approx(fused["peak_bytes"] / plain["peak_bytes"])
    assert fused["saved_vs_plain"] == pytest.approx(fused["saved_bytes"] / plain["saved_bytes"])
    assert fused["saved_vs_plain"] < 1
    assert fused["amdahl_limit"] == pytest.approx(mb.amdahl_limit(plain["median_s"], fused["median_s"],
                                                                  fused["profile"]["fused"]))
    (infer, folded) = mb.measure_case(_pair(), "infer", 1, 32, "cpu", impls=("fused", "fused+fold"), rounds=1)
    assert infer["peak_bytes"] is None and infer["vs_plain"] is None and "profile" not in infer
    assert folded["implementation"] == "fused+fold" and folded["median_s"] > 0


def test_amdahl_limit_and_shapes():
    assert mb.amdahl_limit(plain_s=1.0, fused_s=1.0, fused_share=0.2) == pytest.approx(1.25)
    assert mb.amdahl_limit(plain_s=1.2, fused_s=1.0, fused_share=0.0) == pytest.approx(1.2)
    assert mb.model_shapes("small", "cpu") == [(1, 128), (8, 128)]
    assert mb.model_shapes("all", "cpu") == [(1, 128), (8, 128), (1, 256), (8, 256)]
    assert mb.model_shapes("full", "cuda") == [(1, 512), (8, 512)]
    assert mb.model_impls(False, "train") == ("plain", "fused") and len(mb.model_impls(True, "train")) == 4
    assert mb.model_impls(False, "infer") == ("plain", "fused", "fused+fold") and len(mb.model_impls(True)) == 5
    with pytest.raises(ValueError, match="models: unknown nope"):
        mb.measure_models("cpu", models=["nope"])
    with pytest.raises(ValueError, match="mode: expected one of"):
        mb.make_step(torch.nn.Identity(), "eval", None, None)


def test_the_committed_table_is_written_from_the_runs_json(tmp_path):
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_models.py"
    spec = importlib.util.spec_from_file_location("bench_models", path)
    bench_models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_models)
    meta = dict(device="cpu", device_name="a CPU", threads=1, rounds=3, torch="2", backends=["cpu"], load=4.0,
                date="today", command="python benchmarks/bench_models.py --models uresnet", note="Busy.")
    common = dict(model="uresnet(resnet34)", mode="train", batch=1, side=64, spread=0.05)
    rows = [dict(common, implementation="plain", median_s=0.1, vs_plain=1.0, peak_bytes=2**21, peak_vs_plain=1.0,
                 saved_bytes=2**22, saved_vs_plain=1.0),
            dict(common, implementation="fused", median_s=0.08, vs_plain=1.25, peak_bytes=2**20, peak_vs_plain=0.5,
                 saved_bytes=3 * 2**20, saved_vs_plain=0.75, profile=dict(fused=0.1, conv=0.7, other=0.2),
                 amdahl_limit=1.39)]
    (tmp_path / "run.json").write_text(json.dumps(dict(meta=meta, rows=rows)))
    out = tmp_path / "models.md"
    assert bench_models.main(["--report", str(tmp_path / "run.json"), "--markdown", str(out)]) == 0
    text = out.read_text()
    assert "`python benchmarks/bench_models.py --models uresnet`" in text and "1 thread(s)" in text
    row = ("| uresnet(resnet34) | train | 1x64x64 | 100 ms | 80 ms (1.25x) | - | - | - | 5% | 2 MiB | 1 MiB | 0.50 | "
           "4 MiB | 3 MiB | 0.75 |")
    assert row in text
    assert "| uresnet(resnet34) | 1x64x64 | 10.0% | 70.0% | 20.0% | 1.25x | 1.39x |" in text
    rows[1] = dict(rows[1], median_s=0.05, vs_plain=2.0)  # measured again in a later run: that one is shown
    (tmp_path / "again.json").write_text(json.dumps(dict(meta=dict(meta, command="again"), rows=rows[1:])))
    assert bench_models.main(["--report", str(tmp_path / "run.json"), str(tmp_path / "again.json"),
                              "--markdown", str(out)]) == 0
    text = out.read_text()
    assert "| 50 ms (2.00x) |" in text and "80 ms" not in text and "`again`" in text
