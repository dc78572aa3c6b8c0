"""IFEval (Zhou et al., 2023) rule-based instruction checks, strict and loose.

The checkers are Google's IFEval instruction classes as packaged by ``if-verifiable`` (PyPI,
Apache-2.0; ``pip install 'finelake[train]'``); nothing here re-implements a checker. This module
only adapts them:

* **Sentence splitting without downloads.** Two checkers count sentences or words with NLTK's Punkt
  models (``length_constraints:number_sentences``, ``change_case:capital_word_frequency``), which
  NLTK downloads at run time and this machine cannot. When the ``punkt_tab`` data is installed it is
  used; otherwise an *untrained* :class:`nltk.tokenize.PunktSentenceTokenizer` is (same algorithm,
  no learned abbreviation list, so "e.g." may end a sentence). :func:`sentence_splitter` says which.
  The patch touches only ``if_verifiable.ifeval.instructions_util``, not NLTK itself.
* **Empty responses and unknown ids.** ``if-verifiable`` returns no per-instruction results for an
  empty response and silently skips unknown instruction ids; here an empty response fails every
  instruction and an unknown id raises.

Metrics (:func:`aggregate`) are the four of the IFEval paper: prompt-level and instruction-level
accuracy, strict and loose (loose also accepts the response with its first and/or last line removed
or with ``*`` removed).
"""

from __future__ import annotations

import json
import types
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

PIP_HINT = "pip install 'if-verifiable==0.1.2' (or 'finelake[train]')"

_STATE: dict[str, Any] = {}


def _modules():
    """(instructions_util, INSTRUCTION_DICT, evaluate_instructions), patched once per process.

    Raises:
        ImportError: if-verifiable is not installed (the message says how to install it).
    """
    if "mods" in _STATE:
        return _STATE["mods"]
    try:
        import nltk
        from if_verifiable.common import evaluate_instructions
        from if_verifiable.ifeval import instructions_util
        from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"IFEval checks need if-verifiable: {PIP_HINT} ({exc})") from None

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        splitter = nltk.tokenize.PunktTokenizer("english")
        _STATE["splitter"] = "punkt_tab (nltk data, trained)"
    except LookupError:
        splitter = nltk.tokenize.PunktSentenceTokenizer()
        _STATE["splitter"] = "PunktSentenceTokenizer (untrained: punkt data not installed)"
    word_tok = nltk.tokenize.NLTKWordTokenizer()

    def word_tokenize(text: str, language: str = "english", preserve_line: bool = False):
        # nltk.word_tokenize = sentence split (Punkt) + Treebank words per sentence.
        sents = [text] if preserve_line else splitter.tokenize(text)
        return [t for s in sents for t in word_tok.tokenize(s)]

    shim = types.ModuleType("nltk_for_ifeval")
    shim.__dict__.update({k: getattr(nltk, k) for k in ("tokenize", "data")})
    shim.word_tokenize = word_tokenize
    instructions_util.nltk = shim
    instructions_util._get_sentence_tokenizer = lambda: splitter  # noqa: SLF001 (library hook)
    _STATE["mods"] = (instructions_util, INSTRUCTION_DICT, evaluate_instructions)
    return _STATE["mods"]


def sentence_splitter() -> str:
    """Which Punkt model the sentence-counting checkers use on this machine."""
    _modules()
    return _STATE["splitter"]


def known_instructions() -> list[str]:
    """Instruction ids the installed checkers support (``punctuation:no_comma``, ...)."""
    return sorted(_modules()[1])


@dataclass
class IFEvalResult:
    """Outcome of one prompt.

    Attributes:
        instruction_ids: the prompt's instructions, in order.
        strict / loose: one pass flag per instruction.
    """

    instruction_ids: list[str]
    strict: list[bool] = field(default_factory=list)
    loose: list[bool] = field(default_factory=list)

    @property
    def prompt_strict(self) -> bool:
        return bool(self.strict) and all(self.strict)

    @property
    def prompt_loose(self) -> bool:
        return bool(self.loose) and all(self.loose)


def _kwargs_list(kwargs: Union[str, Sequence[dict], None], n: int) -> list[dict]:
    if kwargs is None:
        return [{}] * n
    if isinstance(kwargs, str):
        kwargs = json.loads(kwargs)
    out = [dict(k or {}) for k in kwargs]
    if len(out) != n:
        raise ValueError(f"{n} instruction ids but {len(out)} kwargs entries")
    return out


def check(prompt: str, response: Optional[str], instruction_ids: Sequence[str],
          kwargs: Union[str, Sequence[dict], None]) -> IFEvalResult:
    """Check one response against its prompt's instructions.

    Args:
        prompt: the IFEval prompt (some checkers, e.g. ``combination:repeat_prompt``, need it).
        response: the model's text (None or blank fails every instruction).
        instruction_ids: e.g. ``["punctuation:no_comma", "length_constraints:number_words"]``.
        kwargs: one dict per instruction (or its JSON), e.g. ``[{}, {"relation": "at least",
            "num_words": 300}]``; null values are ignored, as in IFEval.

    Returns:
        :class:`IFEvalResult` with one strict and one loose flag per instruction.

    Raises:
        ValueError: an instruction id the checkers do not know, or kwargs of the wrong length.
    """
    _, registry, evaluate_instructions = _modules()
    ids = list(instruction_ids)
    unknown = [i for i in ids if i not in registry]
    if unknown:
        raise ValueError(f"unknown IFEval instruction ids {unknown}")
    kw = _kwargs_list(kwargs, len(ids))
    res = IFEvalResult(ids)
    if not response or not response.strip():
        res.strict = [False] * len(ids)
        res.loose = [False] * len(ids)
        return res
    results, _ = evaluate_instructions(response=response, instruction_id_list=ids, kwargs_list=kw,
                                       prompt=prompt, instruction_registry=registry)
    if len(results) != len(ids):  # pragma: no cover - guarded by the checks above
        raise RuntimeError(f"if-verifiable returned {len(results)} results for {len(ids)} instructions")
    res.strict = [bool(r.strict_pass) for r in results]
    res.loose = [bool(r.loose_pass) for r in results]
    return res


def aggregate(results: Sequence[IFEvalResult]) -> dict[str, float]:
    """The four IFEval accuracies (0-1) and counts.

    Returns:
        ``prompt_level_strict_acc``, ``prompt_level_loose_acc``, ``inst_level_strict_acc``,
        ``inst_level_loose_acc``, ``n_prompts``, ``n_instructions``.

    Raises:
        ValueError: no results.
    """
    if not results:
        raise ValueError("no IFEval results to aggregate")
    n_inst = sum(len(r.strict) for r in results)
    return {
        "prompt_level_strict_acc": sum(r.prompt_strict for r in results) / len(results),
        "prompt_level_loose_acc": sum(r.prompt_loose for r in results) / len(results),
        "inst_level_strict_acc": sum(sum(r.strict) for r in results) / max(n_inst, 1),
        "inst_level_loose_acc": sum(sum(r.loose) for r in results) / max(n_inst, 1),
        "n_prompts": float(len(results)),
        "n_instructions": float(n_inst),
    }
