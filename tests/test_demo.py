"""The demo (python -m mmkernels demo): data loading, split, model, CLI errors and a --quick end-to-end run."""
import json
import math

import numpy as np
import pytest
import torch

from mmkernels.demo import parse_args
from mmkernels.demo.data import VIEWS, load_views, prepare, stratified_split
from mmkernels.demo.models import ConcatFusion
from mmkernels.demo.train import subsets


def test_views_load_with_consistent_labels():
    feats, y = load_views(VIEWS)
    dims = {v: feats[v].shape for v in VIEWS}
    assert dims == {"pix": (2000, 240), "fou": (2000, 76), "fac": (2000, 216), "kar": (2000, 64),
                    "zer": (2000, 47), "mor": (2000, 6)}
    # 200 digits per class, in order 0..9
    assert np.array_equal(y, np.repeat(np.arange(10), 200))


def test_pix_is_an_upright_16x15_image_padded_to_16x16():
    ds = prepare(("pix", "fou"))
    img = ds.train.x["pix"]
    assert img.shape[1:] == (1, 16, 16)
    assert float(img.min()) >= 0 and float(img.max()) <= 1
    assert float(img[..., 15].abs().max()) == 0.0  # the padded column
    # the pixels are 16 rows x 15 columns: a zero has ink in its left and right columns, none in the middle
    feats, y = load_views(("pix",))
    zero = feats["pix"][y == 0].mean(0).reshape(16, 15)
    assert zero[6:10, 0:3].mean() > 3 * zero[6:10, 6:9].mean()


def test_split_is_stratified_disjoint_and_seeded():
    y = np.repeat(np.arange(10), 200)
    tr, va, te = stratified_split(y, seed=0)
    assert len(tr) == 1200 and len(va) == 400 and len(te) == 400
    assert len(set(tr) | set(va) | set(te)) == 2000
    for part, n in ((tr, 120), (va, 40), (te, 40)):
        assert np.all(np.bincount(y[part], minlength=10) == n)
    tr2, _, _ = stratified_split(y, seed=0)
    tr3, _, _ = stratified_split(y, seed=1)
    assert np.array_equal(tr, tr2) and not np.array_equal(tr, tr3)


def test_vector_views_standardised_with_train_statistics():
    ds = prepare(("fou", "kar"))
    for v in ("fou", "kar"):
        x = ds.train.x[v]
        assert torch.allclose(x.mean(0), torch.zeros(x.shape[1]), atol=1e-4)
        assert torch.allclose(x.std(0, unbiased=False), torch.ones(x.shape[1]), atol=1e-3)
        # the test split is NOT re-centred on its own statistics
        assert float(ds.test.x[v].mean(0).abs().max()) > 1e-3


def test_head_split_sums_to_fused_and_mask_drops_a_modality():
    ds = prepare(("pix", "fou", "mor"))
    torch.manual_seed(0)
    model = ConcatFusion(ds.info["shapes"]).eval()
    x, y = ds.test.batch(slice(0, 16))
    fused, uni = model(x)
    assert torch.allclose(fused, sum(uni.values()), atol=1e-5)
    # equals the plain concat head
    h = torch.cat([model.encoders[n](x[n]) for n in model.names], 1)
    assert torch.allclose(fused, model.head(h), atol=1e-5)
    mask = torch.tensor([[1.0, 0.0, 1.0]]).expand(16, 3)
    _, uni_m = model(x, mask)
    assert torch.allclose(uni_m["fou"], (model.head.bias / 3).expand(16, -1), atol=1e-6)
    assert torch.allclose(uni_m["pix"], uni["pix"], atol=1e-6)


def test_missing_subsets_are_all_nonempty_proper_subsets():
    s = subsets(("a", "b", "c"))
    assert len(s) == 6 and ("a", "b", "c") not in s and all(len(t) >= 1 for t in s)
    assert subsets(("a", "b")) == [("a",), ("b",)]


@pytest.mark.parametrize("argv, message", [
    (["--views", "pix", "nope"], "unknown view(s) ['nope']; valid views are"),
    (["--views", "pix"], "at least 2 views"),
    (["--methods", "baseline,magic"], "unknown method(s) ['magic']; valid methods are"),
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where there is no CUDA")
def test_cli_rejects_cuda_without_cuda(capsys, tmp_path):
    with pytest.raises(SystemExit):
        parse_args(["--device", "cuda", "--out", str(tmp_path)])
    assert "--device cuda asked for, but torch sees no CUDA device" in capsys.readouterr().err


def test_cli_parses_lists_and_always_keeps_the_baseline(tmp_path):
    a = parse_args(["--views", "pix,fou", "zer", "--methods", "mwam", "--out", str(tmp_path), "--quick"])
    assert a.views == ["pix", "fou", "zer"]
    assert a.methods == ["baseline", "mwam"]
    assert a.epochs >= 1 and a.seeds >= 1


def _check_ms(ms):
    assert set(ms) == {"mean", "std"}
    assert 0.0 <= ms["mean"] <= 1.0 and ms["std"] >= 0.0 and math.isfinite(ms["std"])


def test_quick_run_end_to_end(tmp_path, capsys):
    from mmkernels.__main__ import main as cli_main

    out = tmp_path / "demo"
    rc = cli_main(["demo", "--quick", "--out", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "fused acc" in printed and "missing-avg" in printed

    res = json.loads((out / "results.json").read_text())
    cfg = res["config"]
    views = cfg["views"]
    from mmkernels.demo.methods import METHODS

    assert list(res["methods"]) == list(METHODS)  # --quick runs every method
    assert cfg["quick"] is True and len(cfg["seeds"]) >= 2
    assert len(cfg["missing_subsets"]) == 2 ** len(views) - 2
    for name, m in res["methods"].items():
        s = m["summary"]
        _check_ms(s["test_acc"])
        _check_ms(s["missing_avg"])
        for v in views:
            _check_ms(s["unimodal_acc"][v])
        assert set(s["missing_acc"]) == set(cfg["missing_subsets"])
        for ms in s["missing_acc"].values():
            _check_ms(ms)
        assert s["step_time_ms"]["median"] > 0
        assert len(m["runs"]) == len(cfg["seeds"])
        for r in m["runs"]:
            assert 0 <= r["best_epoch"] < cfg["train"]["epochs"]
            assert len(r["val_curve"]) == cfg["train"]["epochs"]
            if m["balanced"]:
                assert r["coefficients"] and set(r["coefficients"][0]) == set(views)
                assert all(math.isfinite(c) and c > 0 for e in r["coefficients"] for c in e.values())
    base = res["methods"]["baseline"]["summary"]
    assert base["test_acc"]["mean"] > 0.6  # chance is 0.1
    # the static PDMP coefficients follow the validation ranking: the best view gets the largest
    pdmp = res["methods"]["pdmp"]["runs"][0]["coefficients"][-1]
    val = {v: res["unimodal_models"][v]["val"][0] for v in views}
    assert max(pdmp, key=pdmp.get) == max(val, key=val.get)
    assert min(pdmp, key=pdmp.get) == min(val, key=val.get)
    for png in ("accuracy_per_modality.png", "coefficients.png", "missing_modality.png"):
        p = out / png
        assert p.exists() and 5_000 < p.stat().st_size < 300_000

    from mmkernels.demo.report import readme_section

    md = readme_section(str(out / "results.json"), plot_dir="benchmarks/results/demo")
    assert md.count("\n| `") == len(res["methods"])
    assert "benchmarks/results/demo/accuracy_per_modality.png" in md


def test_balanced_methods_change_training_but_not_the_data():
    """A balancer must act: its coefficients differ from 1 at some step, and the first step is otherwise
    identical to the baseline's (same seed, same batch)."""
    from mmkernels.demo.methods import METHODS
    from mmkernels.demo.train import TrainConfig

    ds = prepare(("pix", "fou", "mor"))
    cfg = TrainConfig(epochs=1)
    ctx = {"unimodal_val": {"pix": 0.95, "fou": 0.8, "mor": 0.7}}
    x, y = ds.train.batch(torch.arange(64))
    for name in ("ogm_ge_act", "pdmp", "mwam"):
        torch.manual_seed(0)
        model = ConcatFusion(ds.info["shapes"])
        m = METHODS[name](model, ds, cfg, 0, ctx)
        loss = m.loss(x, y, 0)
        assert torch.isfinite(loss)
        k = m.coefficients()
        assert any(abs(v - 1.0) > 1e-3 for v in k.values()), (name, k)
