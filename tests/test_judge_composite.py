"""models.judge.RelevanceJudge: the embedded judge as relevance plus the quality rules (issue 26).

The embedder is a lookup table of unit vectors for the texts of the test (an unknown text raises
KeyError), so the cosines, and through them the relevance levels, are known exactly.
"""

import json

import numpy as np
import pytest

from finelake.models.base import OptionError
from finelake.models.judge import RelevanceJudge, check_judge_options, judge_parts

INSTRUCTION = "Why should I never start polkitd by hand?"
# polkitd(8), Debian polkitd 122-3 (LGPL-2.0+ and Expat)
PROSE = ("Users or administrators should never need to start this daemon as it will be "
         "automatically started by dbus-daemon(1) or systemd(1) whenever an application calls "
         "into the service.")
FOOT = ("polkit(8), pkaction(1), pkcheck(1), pkexec(1), pkttyagent(1), dbus-daemon(1), systemd(1)\n\n"
        "polkit                             May 2009                         POLKITD(8)")


class TableEmbedder:
    model_id = "table"

    def __init__(self, vectors):
        self.vectors = vectors

    def embed(self, texts):
        return np.stack([self.vectors[t] for t in texts])


def _unit(cos):  # a vector at cosine `cos` from e0
    return np.array([cos, np.sqrt(1 - cos * cos)])


def test_the_composite_scores_relevance_and_states_its_parts():
    emb = TableEmbedder({INSTRUCTION: np.array([1.0, 0.0]), PROSE: _unit(0.62), FOOT: _unit(0.70)})
    judge = RelevanceJudge(emb)
    assert judge.model_id == "relevance+quality:table"
    (s1, r1, p1), (s2, r2, p2) = judge.score([INSTRUCTION, INSTRUCTION], [PROSE, FOOT])
    assert s1 == 5 and "quality rules passed" in r1
    parts = json.loads(p1)
    assert parts["relevance"] == {"cosine": 0.62, "score": 5} and parts["answer"]["rule"] is None
    assert parts["answer"]["prose_share"] == 1.0
    # the running foot is as relevant by cosine, but it is not an answer
    assert s2 == 1 and json.loads(p2)["relevance"]["score"] == 5
    assert json.loads(p2)["answer"]["rule"].startswith("quality:answer_navigation")


def test_relevance_alone_when_quality_is_off():
    emb = TableEmbedder({INSTRUCTION: np.array([1.0, 0.0]), FOOT: _unit(0.70)})
    judge = RelevanceJudge(emb, quality=False)
    assert judge.model_id == "relevance:table"
    assert judge.score([INSTRUCTION], [FOOT]) == [
        (5, "relevance cosine 0.700 (embedding relevance, not an LLM judgment)")]


def test_quality_options_are_checked_and_passed_to_the_judge():
    spec = {"backend": "relevance", "model": "embedded:all-minilm-l6-v2",
            "options": {"quality": False, "quality_rules": {"answer_min_words": 5}}}
    kind, _, settings = judge_parts(spec)
    assert kind == "relevance" and settings["quality"] is False
    assert settings["quality_rules"] == {"answer_min_words": 5}
    with pytest.raises(OptionError, match="quality"):
        check_judge_options({**spec, "options": {"quality": "yes"}})
    with pytest.raises(OptionError, match="unknown quality rule"):
        check_judge_options({**spec, "options": {"quality_rules": {"skip": ["typo"]}}})


def test_instantiate_quality_switches_the_embedded_judges_quality_part():
    from finelake.jobs.judge import with_quality_rules

    spec = {"backend": "relevance", "model": "embedded:all-minilm-l6-v2", "options": {}}
    on = {"enabled": True, "answer_min_words": 10}
    off = {"enabled": False, "answer_min_words": 10}
    assert with_quality_rules(spec, on)["options"] == {"quality_rules": on}
    assert with_quality_rules(spec, off)["options"] == {"quality_rules": off, "quality": False}
    assert spec["options"] == {}  # not modified
    # what the judge's own options say wins
    own = {**spec, "options": {"quality": True, "quality_rules": {"answer_min_words": 5}}}
    assert with_quality_rules(own, off)["options"] == own["options"]
    # an LLM judge has no quality part
    llm = {"backend": "vllm", "model": "flowaicom/Flow-Judge-v0.1", "options": {}}
    assert with_quality_rules(llm, off) is llm and with_quality_rules(spec, None) is spec
    # the options it makes are ones the judge accepts
    settings = check_judge_options(with_quality_rules(spec, off))
    assert settings["quality"] is False


# A shipped sample query ("The Philippines ratified the Rome Statute on August 30, 2011. The ICC has
# jurisdiction over Rome Statute crimes committed since November 1, 2011."), the template
# SmolLM2-135M genericized it into and an instruction it instantiated, from `make sample`
# (2026-12-07): the template repeats "2011" and "Rome Statute" itself; its slot fills do not repeat.
ROME_TEMPLATE = ("The <fi>statutory law</fi> the <fi>statutory law</fi> on August 30, 2011. The ICC "
                 "has jurisdiction over Rome Statute crimes committed since November 1, 2011.")
ROME_INSTRUCTION = ("The Governor-General the issue on August 30, 2011. The ICC has jurisdiction "
                    "over Rome Statute crimes committed since November 1, 2011.")


def test_the_instruction_rules_look_at_slot_fills_when_the_judge_has_the_template():
    emb = TableEmbedder({ROME_INSTRUCTION: np.array([1.0, 0.0]), PROSE: _unit(0.62)})
    judge = RelevanceJudge(emb)
    assert judge.takes_templates
    (with_tpl, _, parts), = judge.score([ROME_INSTRUCTION], [PROSE], templates=[ROME_TEMPLATE])
    assert with_tpl == 5 and json.loads(parts)["instruction"]["rule"] is None
    # the pair alone: the template's own repeated words fail the repetition rule
    (alone, reason, parts), = judge.score([ROME_INSTRUCTION], [PROSE])
    assert alone == 1 and reason.startswith("quality:instruction_repetition: '2011' occurs twice")
    # a template per pair, None where one is not known
    both = judge.score([ROME_INSTRUCTION] * 2, [PROSE] * 2, templates=[ROME_TEMPLATE, None])
    assert [s for s, _, _ in both] == [5, 1]


def test_judge_frame_hands_the_frames_templates_to_the_embedded_judge():
    import pandas as pd

    from finelake.udfs.judge import judge_frame

    spec = {"backend": "relevance", "model": "embedded:all-minilm-l6-v2", "batch_size": 8,
            "options": {}}
    pairs = pd.DataFrame({"instruction": [ROME_INSTRUCTION], "answer": [PROSE]})
    alone = judge_frame(spec, pairs)
    with_tpl = judge_frame(spec, pairs.assign(template=[ROME_TEMPLATE]))
    assert json.loads(alone["judge_parts"][0])["instruction"]["rule"].startswith(
        "quality:instruction_repetition")
    assert json.loads(with_tpl["judge_parts"][0])["instruction"]["rule"] is None
