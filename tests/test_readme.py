"""The README's code runs as written (on a toy two-encoder model), so the documented API stays true."""
import re
from pathlib import Path

import torch
from torch import nn

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks():
    text = README.read_text().split("## Example", 1)[1].split("## API", 1)[0]
    return re.findall(r"```python\n(.*?)```", text, re.S)


class Toy(nn.Module):
    def __init__(self, K=5):
        super().__init__()
        self.audio_enc = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.visual_enc = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, K)


def _names(K=5, B=6):
    torch.manual_seed(0)
    model = Toy(K)
    x_a, x_v, y = torch.randn(B, 1, 16, 16), torch.randn(B, 3, 16, 16), torch.randint(0, K, (B,))
    return {"model": model, "opt": torch.optim.SGD(model.parameters(), lr=0.1), "epoch": 0, "K": K,
            "loader": [(x_a, x_v, y)] * 2, "x_a": x_a, "x_v": x_v, "y": y}


def test_readme_example_trains_with_ogm_ge():
    blocks = _blocks()
    assert len(blocks) == 2, "README's Example section should hold the loop and the other methods"
    ns = _names()
    before = ns["model"].audio_enc[0].weight.detach().clone()
    exec(blocks[0], ns)
    assert not torch.equal(before, ns["model"].audio_enc[0].weight)  # the optimizer stepped
    k = torch.stack(list(ns["bal"].coefficients.values()))
    assert ((k > 0) & (k <= 1)).all() and (k < 1).any()  # OGM-GE damped the dominant modality


def test_readme_other_methods_run():
    import torch.nn.functional as F

    from mmkernels.balance import MWAM, PDMP, DecisionLevel, split_linear_head

    ns = _names()
    model = ns["model"]
    encoders = {"audio": model.audio_enc, "visual": model.visual_enc}
    h = {"audio": model.audio_enc(ns["x_a"]), "visual": model.visual_enc(ns["x_v"])}
    fused = model.head(torch.cat([h["audio"], h["visual"]], 1))
    unimodal = split_linear_head(model.head, h)
    ns.update(encoders=encoders, fused=fused, unimodal=unimodal, loss=F.cross_entropy(fused, ns["y"]),
              mask=torch.ones(6, 2, dtype=torch.bool), PDMP=PDMP, MWAM=MWAM, DecisionLevel=DecisionLevel)
    # each statement group builds its own graph: run the block with fresh losses where it calls backward
    code = _blocks()[1].replace("loss.backward()", "loss.backward(retain_graph=True)")
    exec(code, ns)
    assert ns["fused"].shape == (6, ns["K"])
