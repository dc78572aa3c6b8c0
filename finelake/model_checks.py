"""Where each model of a profile is configured and a check of its backend and options that loads
nothing: shared by ``finelake validate`` (:mod:`finelake.validate`) and the released models'
file contracts (:mod:`finelake.model_contracts`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from finelake.config import FinelakeConfig, ModelConfig


#: Where each model of a profile is configured, and what kind of backend it names.
MODEL_KEYS: tuple[tuple[str, str], ...] = (
    ("models.generator", "generator"),
    ("models.embedder", "embedder"),
    ("models.judge", "judge"),
    ("genericize.model", "generator"),
    ("instantiate.model", "generator"),
    ("continue.model", "generator"),
    ("evaluate.judge", "generator"),
)


def model_configs(cfg: "FinelakeConfig") -> list[tuple[str, "ModelConfig", str]]:
    """``(dotted key, model config, kind)`` for every model the profile sets (stage models that are
    null fall back to ``models.generator`` and are left out)."""
    out = []
    for key, kind in MODEL_KEYS:
        node: Any = cfg
        for part in key.split("."):
            node = getattr(node, "continue_" if part == "continue" else part)
        if node is not None:
            out.append((key, node, kind))
    return out


def check_model(key: str, mc: "ModelConfig", kind: str) -> dict[str, Any]:
    """Check one model's backend and options without loading it.

    Args:
        key: where it is configured (``models.generator``), for messages.
        mc: its configuration.
        kind: ``generator``, ``embedder`` or ``judge``.

    Returns:
        ``{"backend", "model", "options"}`` with the checked options (judges add their own
        settings: ``judge``, ``format``, ...).

    Raises:
        ValueError: ``"<key>.backend: ..."`` for an unknown backend, ``"<key>.options.<name>:
            ..."`` for a bad option (the message names it and suggests close names).
    """
    from finelake.models.base import OptionError

    try:
        if kind == "judge":
            from finelake.models.judge import check_judge_options

            settings = check_judge_options(mc.model_dump())
            return {"model": mc.model, **settings}
        if kind == "embedder":
            from finelake.models.base import get_embedder_class
            from finelake.models.embedding import SentenceTransformersEmbedder  # noqa: F401

            cls = get_embedder_class(mc.backend)
        else:
            from finelake.models.generation import backend_class

            cls = backend_class(mc.backend)
        return {"backend": mc.backend, "model": mc.model, "options": cls.check_options(mc.options)}
    except OptionError as exc:
        raise ValueError(f"{key}.options.{exc.key}: {exc.detail} ({exc.backend} backend)") from None
    except (ValueError, ImportError) as exc:
        raise ValueError(f"{key}.backend: {exc}") from None
