"""Prompt-file loaders and the shared evaluation tables."""
import json

import pytest
import torch

from common.evaluate import Sampler, evaluate_models, held_out, markdown_table, write_table
from common.flow import make_sigmas
from common.prompts import PromptError, load_prompts


def test_loaders_for_each_layout(tmp_path):
    (tmp_path / "a.txt").write_text("a cat\n\na dog\n")
    (tmp_path / "hpd.json").write_text(json.dumps(["p1", "p2"]))
    (tmp_path / "vbench.json").write_text(json.dumps([{"prompt_en": "a drone shot", "dimension": ["x"]}]))
    (tmp_path / "geneval.jsonl").write_text('{"prompt": "two cups", "tag": "counting"}\n{"prompt": "a red bus"}\n')
    (tmp_path / "drawbench.csv").write_text('Prompts,Category\n"A storefront, with text",Text\nA cube,Colors\n')
    assert load_prompts(str(tmp_path / "a.txt")) == ["a cat", "a dog"]
    assert load_prompts(str(tmp_path / "hpd.json")) == ["p1", "p2"]
    assert load_prompts(str(tmp_path / "vbench.json")) == ["a drone shot"]
    assert load_prompts(str(tmp_path / "geneval.jsonl")) == ["two cups", "a red bus"]
    assert load_prompts(str(tmp_path / "drawbench.csv"), limit=1) == ["A storefront, with text"]


def test_missing_and_malformed_files_give_one_line(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "nocol.csv").write_text("a,b\n1,2\n")
    (tmp_path / "x.yaml").write_text("- a")
    for name in ["missing.txt", "bad.json", "nocol.csv", "x.yaml"]:
        with pytest.raises(PromptError) as e:
            load_prompts(str(tmp_path / name))
        assert "\n" not in str(e.value) and name in str(e.value)


class _Lin(torch.nn.Module):
    def __init__(self, a):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a))


class _Backend:
    """A 1-parameter stand-in: v = a * x, decode identity; enough to exercise the evaluation plumbing."""
    latent_shape, device = (2,), torch.device("cpu")

    def prompts(self, split):
        return ["p0", "p1"]

    def encode(self, prompts):
        from common.backend import Cond
        return Cond({"i": torch.arange(len(prompts))}, prompts)

    def velocity_fn(self, net, cond, guidance=None):
        return lambda x, s: net.a * x

    def decode(self, x):
        return x


def test_evaluate_models_same_noise_rows_and_tables(tmp_path):
    from common.rewards import FnReward, MultiReward
    be = _Backend()
    prompts, cond, noise = held_out(be, n_per_prompt=3, seed=0)
    assert prompts == ["p0"] * 3 + ["p1"] * 3 and noise.shape == (6, 2)
    assert torch.equal(held_out(be, 3, seed=0)[2], noise)                 # fixed across calls
    reward = MultiReward([FnReward(lambda x: -x.pow(2).sum(1), "neg_norm"), FnReward(lambda x: x[:, 0], "first")],
                         [1.0, 0.5])
    rows = evaluate_models(be, {"a": Sampler(_Lin(0.0), make_sigmas(4)), "b": Sampler(_Lin(1.0), make_sigmas(2))},
                           reward, cond, noise, extra=lambda n, lat, media: {"norm": float(lat.norm())})
    assert [r["model"] for r in rows] == ["a", "b"] and [r["nfe"] for r in rows] == [4, 2]
    # v = 0 keeps the noise; v = x on the grid [1, .5, 0] multiplies it by (1 - .5) twice
    assert rows[0]["neg_norm"] == pytest.approx(float(-noise.pow(2).sum(1).mean()), rel=1e-5)
    assert rows[1]["neg_norm"] == pytest.approx(float(-(0.25 * noise).pow(2).sum(1).mean()), rel=1e-5)
    assert rows[0]["combined"] == pytest.approx(rows[0]["neg_norm"] + 0.5 * rows[0]["first"], rel=1e-5)
    md, js = write_table(rows, str(tmp_path), "eval", header="command: test")
    text = open(md).read()
    assert text.startswith("command: test") and "| model | nfe | neg_norm |" in text
    assert json.load(open(js))[1]["model"] == "b"
    assert markdown_table([{"x": 1.23456}]).splitlines()[2] == "| 1.235 |"
