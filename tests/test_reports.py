"""Report figures (finelake.plots) and the compare report's plots and Markdown, without training."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from finelake.config import load_config
from finelake.plots import saved_figure

PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == PNG


def test_saved_figure_writes_a_png_and_closes_the_figure(tmp_path):
    import matplotlib.pyplot as plt

    path = tmp_path / "line.png"
    with saved_figure(str(path), figsize=(3, 2), dpi=50) as (fig, ax):
        ax.plot([0, 1, 2], [2, 0, 1])
        n_open = len(plt.get_fignums())
    assert _is_png(path)
    assert len(plt.get_fignums()) == n_open - 1
    from PIL import Image

    assert Image.open(path).size == (150, 100)  # 3 x 2 inches at 50 dpi


def test_a_figure_whose_block_fails_is_closed_and_not_saved(tmp_path):
    import matplotlib.pyplot as plt

    before = len(plt.get_fignums())
    path = tmp_path / "broken.png"
    with pytest.raises(ZeroDivisionError):
        with saved_figure(str(path)) as (fig, ax):
            ax.plot([1 / 0])
    assert not path.exists()
    assert len(plt.get_fignums()) == before


def _ev(metrics, shift=None, fmt=None):
    return SimpleNamespace(metrics=metrics, shift=shift, extra={"prompt_format": fmt} if fmt else {})


def _st(loss, tokens):
    return SimpleNamespace(extra={"data_tokens": tokens, "train_steps": 4, "train_loss": loss,
                                  "tokens_per_s": 900.0})


def test_compare_plots_and_markdown_from_evaluations(tmp_path):
    from finelake.jobs import compare

    cfg = load_config("local", lake=str(tmp_path / "lake"))
    shift = {"kl_by_position": [0.3, 0.2, 0.1], "shifted_share": 0.25}
    evals = [
        ("base", "-", "-", None, _ev({"ifeval.prompt_level_strict_acc": 0.20, "ifeval.n_prompts": 50})),
        ("pairs:lora", "pairs", "lora", _st(2.5, 1000),
         _ev({"ifeval.prompt_level_strict_acc": 0.30, "ifeval.n_prompts": 50,
              "token_shift.kl_mean": 0.05, "token_shift.shifted_share": 0.10}, shift, "chat")),
        ("documents:lora", "documents", "lora", _st(3.1, 1000),
         _ev({"ifeval.prompt_level_strict_acc": 0.24, "ifeval.n_prompts": 50})),
    ]
    curves = {"pairs:lora": [(1, 3.0), (2, 2.5)], "documents:lora": [(1, 3.4), (2, 3.1)]}
    files = compare._plots(str(tmp_path), curves, evals)
    assert set(files) == {"loss", "metrics", "shift"}
    assert all(_is_png(tmp_path / f) for f in files.values())

    md = compare._markdown(cfg, {"pairs": 1000, "documents": 5000}, {"pairs": 3, "documents": 1},
                           1000, evals, files)
    assert "**equal budget = 1,000 tokens**" in md
    assert "| pairs:lora (chat prompt) | 1,000 | 4 | 2.500 | 900 | 30.0% |" in md
    assert "| base | – | – | – | – | 20.0% |" in md
    for f in files.values():
        assert f"]({f})" in md
    # the IFEval comparison states the sample size that makes it noise or not
    assert "30.0% vs 24.0% on 50 prompts, where one prompt is 2.0 points" in md


def test_compare_plots_skip_what_has_no_data(tmp_path):
    from finelake.jobs import compare

    files = compare._plots(str(tmp_path), {}, [("base", "-", "-", None, _ev({}))])
    assert files == {}
    assert os.listdir(tmp_path) == []

