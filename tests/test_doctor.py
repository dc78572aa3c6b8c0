"""`finelake doctor`: the self-check `make setup` ends with and users run first on a cluster node."""

from __future__ import annotations

import os
import textwrap

import pytest
from click.testing import CliRunner

from finelake import doctor
from finelake.cli import cli
from finelake.config import load_config


def _lines(result):
    """name -> line of each check (the name is the padded column after the status word)."""
    return {ln[6:28].strip(): ln for ln in result.output.splitlines()
            if ln[:4] in ("ok  ", "FAIL", "skip")}


def test_cluster_profile_checks_without_any_embedded_model():
    """On a cluster node the profile names hub models: nothing is fetched, nothing fails."""
    res = CliRunner().invoke(cli, ["doctor", "--conf", "databricks", "--skip", "spark"])
    assert res.exit_code == 0, res.output
    lines = _lines(res)
    assert lines["versions"].startswith("ok") and "pyspark" in lines["versions"]
    assert lines["cpu"].startswith("ok")
    assert "llama.cpp" not in lines  # the profile does not use it
    assert lines["model generator"].startswith("skip")
    assert "hub id fineinstructions/template_instantiator" in lines["model generator"]
    assert lines["generation"].startswith("skip") and lines["embedding"].startswith("skip")
    assert "all checks passed for profile databricks" in res.output


@pytest.mark.slow
def test_local_profile_generates_and_embeds_with_the_embedded_models():
    res = CliRunner().invoke(cli, ["doctor", "--conf", "local", "--skip", "spark"])
    assert res.exit_code == 0, res.output
    lines = _lines(res)
    assert lines["llama.cpp"].startswith("ok") and "portable build" in lines["llama.cpp"]
    assert lines["generation"].startswith("ok") and "llama_cpp:" in lines["generation"]
    assert lines["embedding"].startswith("ok") and "vector of 384 dims" in lines["embedding"]
    assert "SmolLM2-135M-Instruct" in res.output


def test_delta_check_writes_and_reads_a_table(spark):
    from conftest import ENGINE

    c = doctor.check_delta(load_config("local"))
    assert c.ok is True, c.detail
    assert f"engine {ENGINE}" in c.detail and "3-row Delta table" in c.detail


def test_a_crashing_native_library_is_reported_with_its_signal(tmp_path, monkeypatch):
    (tmp_path / "crashing_backend.py").write_text(textwrap.dedent("""
        import os, signal
        from finelake.models.base import GenerationBackend, register_generator

        @register_generator("crashes")
        class Crashes(GenerationBackend):
            def generate(self, requests):
                os.kill(os.getpid(), signal.SIGSEGV)
    """))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path),
                                                                  os.environ.get("PYTHONPATH")])))
    c = doctor._probe("generation", {"backend": "crashing_backend:crashes", "model": "x"})
    assert c.ok is False and "died with SIGSEGV" in c.detail


def test_a_missing_embedded_model_fails_its_check():
    ok, why = doctor.locate("embedded:no-such-model")
    assert ok is False and "unknown embedded model" in why
    ok, why = doctor.locate("/no/such/folder")
    assert ok is False and "no such path" in why
    assert doctor.locate("org/some-model")[0] is None
