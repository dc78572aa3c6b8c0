"""finelake evaluate: IFEval checker wrapper, judge statistics, token shift, and a tiny real run."""

from __future__ import annotations

import math

import pytest

from finelake.method import ifeval as ifm
from finelake.method import token_shift as tsm
from finelake.method import winrate as wr

# ----------------------------------------------------------------------------- IFEval wrapper


def test_ifeval_follows_and_breaks_instructions():
    ids = ["punctuation:no_comma", "change_case:english_lowercase"]
    follows = ifm.check("Answer in lowercase without commas.", "the sky is blue and the sea is too",
                        ids, [{}, {}])
    breaks = ifm.check("Answer in lowercase without commas.", "the sky is blue, and the sea is too",
                       ids, "[{}, {}]")
    assert follows.strict == [True, True] and follows.prompt_strict
    assert breaks.strict == [False, True] and not breaks.prompt_strict
    agg = ifm.aggregate([follows, breaks])
    assert agg["prompt_level_strict_acc"] == 0.5          # one of two prompts fully followed
    assert agg["inst_level_strict_acc"] == 0.75           # three of four instructions
    assert agg["n_instructions"] == 4


def test_ifeval_loose_forgives_a_first_line_and_sentence_counting_needs_no_download():
    ids = ["startend:end_checker"]
    kw = [{"end_phrase": "Is there anything else I can help with?"}]
    resp = "Here you go.\nIs there anything else I can help with?\n---"
    r = ifm.check("End with the phrase.", resp, ids, kw)
    assert r.strict == [False] and r.loose == [True]      # loose drops the trailing line
    n = ifm.check("Use fewer than 3 sentences.", "One. Two. Three. Four.",
                  ["length_constraints:number_sentences"], [{"relation": "less than", "num_sentences": 3}])
    assert n.strict == [False]
    assert "Punkt" in ifm.sentence_splitter() or "punkt" in ifm.sentence_splitter()


def test_ifeval_empty_response_fails_every_instruction_and_unknown_ids_raise():
    r = ifm.check("p", "  ", ["punctuation:no_comma", "change_case:english_lowercase"], None)
    assert r.strict == [False, False] and r.loose == [False, False]
    with pytest.raises(ValueError, match="unknown IFEval"):
        ifm.check("p", "text", ["made:up"], [{}])
    with pytest.raises(ValueError, match="kwargs"):
        ifm.check("p", "text", ["punctuation:no_comma"], [{}, {}])


# ----------------------------------------------------------------------------- judge statistics


class _AlwaysFirst:
    """A judge with pure position bias: it always answers '1'."""

    def generate(self, requests):
        from finelake.models.base import GenerationResult

        return [GenerationResult(text="1") for _ in requests]


def test_both_orders_cancel_a_judge_that_always_names_position_one():
    from finelake.jobs.evaluate import Generation, score_alpacaeval

    items = [{"item_id": "0", "prompt": "q", "reference": "a long reference answer"},
             {"item_id": "1", "prompt": "q2", "reference": "ref"}]
    gens = [Generation([1], [2], "short"), Generation([1], [2], "a much longer model answer")]
    m, rows = score_alpacaeval(_AlwaysFirst(), items, gens, both_orders=True)
    assert m["win_rate"] == 0.5 and m["win_margin"] == 0.0
    assert [r["preference"] for r in rows] == [0.5, 0.5]
    one_order, _ = score_alpacaeval(_AlwaysFirst(), items, gens, both_orders=False)
    assert one_order["win_rate"] == 1.0                   # the bias shows when not swapped


def test_length_controlled_win_rate_removes_a_pure_length_preference():
    # The model wins exactly when its answer is longer: the raw win rate is 50%, the length
    # coefficient is positive, and at equal length the predicted preference stays near 50%.
    prefs = [1.0, 0.0] * 20
    model = [300, 100] * 20
    ref = [200] * 40
    lc = wr.length_controlled_win_rate(prefs, model, ref)
    assert lc["length_coef"] > 1.0
    assert abs(lc["lc_win_rate"] - 0.5) < 0.05
    # Always preferred at equal length: LC close to 1, finite despite perfect separation.
    always = wr.length_controlled_win_rate([1.0] * 20, [100] * 20, [100] * 20)
    assert 0.95 < always["lc_win_rate"] < 1.0
    with pytest.raises(ValueError):
        wr.length_controlled_win_rate([None], [1], [1])


def test_judge_reply_parsers():
    assert wr.parse_pairwise("2") == 2 and wr.parse_pairwise("Response 1.") == 1
    assert wr.parse_pairwise("neither") is None
    assert wr.preference(1, 2) == 1.0 and wr.preference(2, 2) == 0.5 and wr.preference(None, None) is None
    a = wr.parse_aspects('{"helpfulness": 4, "clarity": 5, "factuality": 3, "depth": 2, "engagement": 1}')
    assert a == {"helpfulness": 4, "clarity": 5, "factuality": 3, "depth": 2, "engagement": 1}
    assert wr.parse_aspects("helpfulness: 2 and nothing else")["clarity"] is None
    assert wr.parse_grade("Rating: 10") == 10 and wr.parse_grade("no") is None


# ----------------------------------------------------------------------------- token shift


def test_token_shift_of_identical_distributions_is_zero():
    import torch

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g)
    toks = logits.argmax(-1)
    res = tsm.position_shift(logits, logits.clone(), toks)
    assert max(res.kl) == pytest.approx(0.0, abs=1e-6)
    assert res.base_rank == [1] * 6
    s = tsm.summarize([res])
    assert s["kl_mean"] == pytest.approx(0.0, abs=1e-6) and s["shifted_share"] == 0.0


def test_token_shift_known_case():
    import torch

    # Position 0: the base model agrees (rank 1). Position 1: the chosen token (id 2) is the
    # base model's third choice. KL of [0.5, 0.5] against [0.9, 0.1] is known in closed form.
    tuned = torch.log(torch.tensor([[0.5, 0.5, 1e-9], [0.1, 0.1, 0.8]]))
    base = torch.log(torch.tensor([[0.9, 0.1, 1e-9], [0.5, 0.3, 0.2]]))
    res = tsm.position_shift(tuned, base, [0, 2])
    assert res.base_rank == [1, 3]
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert res.kl[0] == pytest.approx(expected, rel=1e-4)
    s = tsm.summarize([res], decode=lambda i: f"<{i}>")
    assert s["shifted_share"] == 0.5 and s["marginal_share"] == 0.5 and s["strong_shift_share"] == 0.0
    assert s["top_shifted"] == [["<2>", 1]]
    with pytest.raises(ValueError, match="shapes"):
        tsm.position_shift(tuned, base[:1], [0, 2])


# ----------------------------------------------------------------------------- tiny real runs


def _tiny_llama(path, seed):
    import torch
    import transformers

    from finelake.models.resolve import hf_path

    tok = transformers.AutoTokenizer.from_pretrained(hf_path("embedded:smollm2-135m-instruct"))
    conf = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=1, num_attention_heads=2,
                                    num_key_value_heads=2, max_position_embeddings=512,
                                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                    pad_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(conf).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    return _tiny_llama(d / "a", 0), _tiny_llama(d / "b", 1)


def test_model_compared_with_itself_has_zero_shift_and_another_model_does_not(tiny_models, cfg):
    from finelake.jobs.evaluate import generate, load_model, token_shift
    from finelake.runtime import StageContext

    ctx = StageContext(cfg)
    a = load_model(ctx, tiny_models[0], prompt_format="instruction")
    b = load_model(ctx, tiny_models[1], prompt_format="instruction")
    gens = generate(a, ["Name a colour.", "Count to three."], max_new_tokens=6, batch_size=2)
    same = token_shift(a, a, gens)
    assert same["n_tokens"] > 0
    assert same["kl_mean"] == pytest.approx(0.0, abs=1e-6) and same["shifted_share"] == 0.0
    other = token_shift(a, b, gens)
    assert other["kl_mean"] > 0 and other["n_tokens"] == same["n_tokens"]


def test_tiny_evaluate_writes_eval_sets_evaluations_and_mlflow(tiny_models, lake_dir):
    import mlflow

    from finelake.config import load_config
    from finelake.jobs.evaluate import run_evaluate
    from finelake.jobs.train import setup_mlflow
    from finelake.lake import Lake
    from finelake.runtime import StageContext
    from finelake.tables import EVAL_SETS, EVALUATIONS

    cfg = load_config("local", lake=lake_dir, overrides=["evaluate.max_new_tokens=4"])
    ctx = StageContext(cfg)
    st = run_evaluate(ctx, model=tiny_models[0], limit=3, benchmarks=["ifeval"], label="tiny")
    lake = Lake(lake_dir, None)
    sets = lake.read_arrow(EVAL_SETS, columns=["benchmark"]).column("benchmark").to_pylist()
    assert {b: sets.count(b) for b in set(sets)} == {"ifeval": 541, "alpacaeval": 805, "mt_bench": 80}
    rows = lake.read_arrow(EVALUATIONS).to_pylist()
    by_metric = {r["metric"]: r for r in rows}
    assert {"prompt_level_strict_acc", "prompt_level_loose_acc", "inst_level_strict_acc",
            "inst_level_loose_acc"} <= set(by_metric)
    r = by_metric["prompt_level_strict_acc"]
    assert r["model"] == "tiny" and r["benchmark"] == "ifeval" and r["n"] == 3
    assert r["eval_version"] == lake.version(EVAL_SETS) and r["mlflow_run_id"] == st.extra["mlflow_run_id"]
    assert 0.0 <= r["value"] <= 1.0
    assert by_metric["inst_level_strict_acc"]["n"] >= 3
    setup_mlflow(cfg)
    run = mlflow.get_run(st.extra["mlflow_run_id"])
    assert run.data.params["eval_sets.version"] == str(r["eval_version"])
    assert run.data.metrics["ifeval.prompt_level_strict_acc"] == r["value"]
    # rerunning the load leaves the eval set version where it was (nothing changed)
    from finelake.jobs.evaluate import load_eval_sets

    assert load_eval_sets(ctx) == r["eval_version"]
