"""finelake train: examples, equal token budgets, and tiny real TRL runs tracked in MLflow."""

from __future__ import annotations

import json

import pytest

from finelake.method import training as tm
from finelake.method.budget import format_pair


# ----------------------------------------------------------------------------- pure logic


def test_pair_example_is_the_section_4_2_text_split_at_the_answer():
    ex = tm.pair_example("Name a prime.", "Seven.")
    assert ex["prompt"] == "Instruction: Name a prime.\n\nAnswer:"
    assert ex["prompt"] + ex["completion"] == format_pair("Name a prime.", "Seven.")


def test_layout_prefers_pairs_then_continuations_then_text():
    assert tm.layout(["pair_id", "instruction", "answer", "text"]) == ("pair", ("instruction", "answer"))
    assert tm.layout(["doc_id", "prompt", "continuation"]) == ("pair", ("prompt", "continuation"))
    assert tm.layout(["doc_id", "text"]) == ("text", ("text",))
    with pytest.raises(ValueError, match="cannot train"):
        tm.layout(["doc_id", "body"])


def test_budget_prefix_keeps_whole_examples_within_the_budget():
    counts = [5, 7, 3, 10]
    assert tm.budget_prefix(counts, None) == 4
    assert tm.budget_prefix(counts, 12) == 2          # 5 + 7 = 12 fits exactly
    assert tm.budget_prefix(counts, 14) == 2          # + 3 would be 15
    assert tm.budget_prefix(counts, 4) == 0
    with pytest.raises(ValueError):
        tm.budget_prefix(counts, -1)
    assert tm.equal_budget({"pairs": 900, "documents": 1500}) == 900
    assert tm.equal_budget({"pairs": 900, "documents": 1500}, cap=500) == 500
    with pytest.raises(ValueError, match="no training tokens"):
        tm.equal_budget({"pairs": 0, "documents": 10})


def test_count_example_tokens_adds_eos_and_caps_at_max_seq_len():
    exs = [{"text": "a b c"}, {"prompt": "x", "completion": " y z w v u"}]

    def encode(texts):
        return [t.split() for t in texts]

    assert tm.count_example_tokens(exs, encode, None) == [4, 7]   # words + one EOS
    assert tm.count_example_tokens(exs, encode, 5) == [4, 5]


# ----------------------------------------------------------------------------- tiny real runs


PAIRS_ROWS = [
    {"pair_id": f"p{i:02d}", "doc_id": f"d{i}", "template_id": "t1",
     "instruction": f"What is {i} plus {i}?", "answer": f"{i} plus {i} is {2 * i}.",
     "run_id": "pipeline-run-1"}
    for i in range(6)
]
DOC_ROWS = [
    {"doc_id": f"d{i}", "text": f"Document {i}. " + "The river bends east past the mill. " * (3 + i),
     "run_id": "pipeline-run-0"}
    for i in range(6)
]


def _tiny_cfg(lake_dir, *extra):
    from finelake.config import load_config

    return load_config("local", lake=lake_dir, overrides=[
        "train.max_steps=2", "train.batch_size=2", "train.max_seq_len=48", "train.logging_steps=1",
        "train.lora.r=4", "train.lora.alpha=8", "train.torch_threads=1", "train.warmup_ratio=0.0",
        "train.scratch.hidden_size=32", "train.scratch.intermediate_size=64",
        "train.scratch.num_layers=1", "train.scratch.num_heads=2", "train.scratch.num_kv_heads=2",
        *extra])


def _write(lake_dir, tdef, rows, run_id):
    from finelake.jobs.common import arrow_from_rows
    from finelake.lake import Lake

    res = Lake(lake_dir, None).merge(tdef, arrow_from_rows(rows, tdef), run_id=run_id)
    return res.version


def test_tiny_lora_run_logs_metrics_params_lineage_and_a_model_that_reloads(lake_dir):
    import mlflow
    from mlflow import MlflowClient

    from finelake.jobs.evaluate import generate, load_model
    from finelake.jobs.train import run_train, setup_mlflow
    from finelake.runtime import StageContext
    from finelake.tables import PAIRS

    version = _write(lake_dir, PAIRS, PAIRS_ROWS, "pipeline-run-1")
    ctx = StageContext(_tiny_cfg(lake_dir))
    st = run_train(ctx, table="pairs", method="lora")
    assert st.rows_in == 6 and st.rows_out == 6
    assert st.extra["table_version"] == version
    assert st.extra["model_uri"] == "models:/finelake_pairs_lora/1"

    setup_mlflow(ctx.cfg)
    run = mlflow.get_run(st.extra["mlflow_run_id"])
    m, p, tags = run.data.metrics, run.data.params, run.data.tags
    assert m["train_tokens"] > 0 and m["tokens_per_s"] > 0 and m["train_steps"] == 2
    loss_curve = MlflowClient().get_metric_history(run.info.run_id, "loss")
    assert len(loss_curve) >= 2 and all(h.value > 0 for h in loss_curve)
    assert p["data.table"] == "pairs" and p["data.version"] == str(version)
    assert p["train.method"] == "lora" and p["train.lora.r"] == "4"
    assert p["train.completion_only_loss"] == "True"
    assert int(p["data.tokens"]) == st.extra["data_tokens"] > 0
    assert tags["finelake.table_version"] == str(version)
    assert tags["finelake.generating_run_ids"] == "pipeline-run-1"
    (ds_input,) = run.inputs.dataset_inputs
    source = json.loads(ds_input.dataset.source)
    assert source["path"].endswith("/pairs") and source["delta_table_version"] == version
    assert ds_input.dataset.name == f"pairs@v{version}"
    artifacts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}
    assert {"config", "log_history.json"} <= artifacts
    # the model is an MLflow model of this run (MLflow 3 keeps it apart from the run's artifacts)
    assert MlflowClient().get_model_version("finelake_pairs_lora", "1").run_id == run.info.run_id
    info = mlflow.models.get_model_info(st.extra["model_uri"])
    assert info.run_id == run.info.run_id and "transformers" in info.flavors
    assert info.signature.inputs and info.signature.outputs

    # The registered model reloads from the registry, is merged (no adapters) and generates.
    mut = load_model(ctx, st.extra["model_uri"])
    assert mut.prompt_format == "instruction" and mut.meta["lora_merged"] is True
    assert not any("lora_" in k for k in mut.model.state_dict())
    (g,) = generate(mut, ["What is 2 plus 2?"], max_new_tokens=4, batch_size=1)
    assert 0 < len(g.output_ids) <= 4


def test_scratch_run_on_documents_matches_the_token_count_of_pairs(lake_dir):
    import mlflow

    from finelake.jobs.train import run_train, setup_mlflow
    from finelake.runtime import StageContext
    from finelake.tables import DOCUMENTS, PAIRS

    pv = _write(lake_dir, PAIRS, PAIRS_ROWS, "pipeline-run-1")
    _write(lake_dir, DOCUMENTS, DOC_ROWS, "pipeline-run-0")
    ctx = StageContext(_tiny_cfg(lake_dir, "train.max_steps=1", "train.mlflow.register_model=false"))
    st = run_train(ctx, table="documents", method="scratch", match_tokens_of="pairs")
    setup_mlflow(ctx.cfg)
    p = mlflow.get_run(st.extra["mlflow_run_id"]).data.params
    pairs_tokens = int(p["data.token_budget"])
    assert p["data.budget_reason"] == f"equal to pairs@v{pv}"
    assert p["data.layout"] == "text" and p["train.completion_only_loss"] == "False"
    # the documents hold more tokens than the pairs: truncated to at most the pairs' count
    assert st.extra["tokens_available"] > pairs_tokens >= st.extra["data_tokens"] > 0
    assert st.rows_out < st.rows_in
    assert st.extra["model_uri"].startswith("models:/m-")  # logged (an MLflow model id), not registered


def test_train_on_continuations_uses_ok_rows_and_logs_lineage(lake_dir):
    """Issue #6: the continuation recipe trains through the same job and lineage as pairs."""
    import mlflow

    from finelake.jobs.train import run_train, setup_mlflow
    from finelake.runtime import StageContext
    from finelake.tables import CONTINUATIONS

    rows = [{"doc_id": f"d{i}", "status": "ok" if i < 4 else "dropped",
             "reason": None if i < 4 else "echo", "prompt": f"The river {i} bends east",
             "continuation": f" past mill number {i}, where the road ends.", "run_id": "continue-run-1"}
            for i in range(6)]
    version = _write(lake_dir, CONTINUATIONS, rows, "continue-run-1")
    ctx = StageContext(_tiny_cfg(lake_dir))
    st = run_train(ctx, table="continuations", method="lora")
    assert st.rows_in == 4  # dropped continuations are not trained on
    setup_mlflow(ctx.cfg)
    run = mlflow.get_run(st.extra["mlflow_run_id"])
    assert run.data.params["data.table"] == "continuations"
    assert run.data.params["data.version"] == str(version)
    assert run.data.tags["finelake.generating_run_ids"] == "continue-run-1"
