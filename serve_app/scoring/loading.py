"""Loading a scorer: a model id or directory (or a model shipped in a Python package) -> its family's scorer.

The family comes from config.json; the families never import this module, so the registry here is the
only place that knows them all.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import tempfile
import zipfile
from importlib import resources
from pathlib import Path

from serve_app.scoring.family import LoadOptions
from serve_app.scoring.types import ModelLoadError, Scorer

log = logging.getLogger(__name__)

# Models whose weights ship inside a Python package: id -> (package, archive inside it).
PACKAGED_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": ("all_minilm_l6_v2", "model.zip"),
}

# config.json "architectures" (by suffix) -> family.
ARCHITECTURES = {
    "ForSequenceClassification": "cross_encoder",
    "CLIPModel": "dual_encoder",
    "SiglipModel": "dual_encoder",
    "Siglip2Model": "dual_encoder",
    "BlipForImageTextRetrieval": "blip_itm",
    # Instruction-following yes/no rerankers: Qwen3-Reranker (a Qwen3 causal LM), the Qwen-VL rerankers.
    "Qwen3ForCausalLM": "yes_no",
    "Qwen2VLForConditionalGeneration": "yes_no",
    "Qwen2_5_VLForConditionalGeneration": "yes_no",
    "Qwen3VLForConditionalGeneration": "yes_no",
}
# Bare encoders ("BertModel") are embedding models; other "...Model" classes (GPT2LMHeadModel,
# CLIPVisionModel) are not, so the embedding family also needs one of these model types.
ENCODER_TYPES = {
    "bert", "roberta", "xlm-roberta", "mpnet", "distilbert", "deberta", "deberta-v2", "electra",
    "camembert", "modernbert", "nomic_bert", "new", "gte",
}  # fmt: skip

# family -> "module:class", imported only when a model of that family loads.
FAMILIES = {
    "cross_encoder": "serve_app.scoring.cross_encoder:CrossEncoderScorer",
    "embedding": "serve_app.scoring.embedding:EmbeddingScorer",
    "dual_encoder": "serve_app.scoring.dual_encoder:DualEncoderScorer",
    "blip_itm": "serve_app.scoring.blip_itm:BlipItmScorer",
    "yes_no": "serve_app.scoring.yes_no:YesNoScorer",
}


def resolve_model_dir(model: str, cache_dir: Path) -> str:
    """A local directory, a packaged model unpacked once into cache_dir, or the id as given."""
    if os.path.isdir(model):
        return model
    if model in PACKAGED_MODELS:
        package, archive = PACKAGED_MODELS[model]
        target = cache_dir / model.replace("/", "--")
        if (target / "config.json").exists():
            return str(target)
        try:
            source = resources.files(package) / archive
        except ModuleNotFoundError as exc:
            raise ModelLoadError(f"{model} ships in the Python package for {package}, which is not installed") from exc
        cache_dir.mkdir(parents=True, exist_ok=True)
        # Unpack beside the target and rename: replicas on one node may unpack at once.
        scratch = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".unpack-"))
        with resources.as_file(source) as path, zipfile.ZipFile(path) as zf:
            zf.extractall(scratch)
        try:
            os.rename(scratch, target)
        except OSError:
            shutil.rmtree(scratch, ignore_errors=True)
            if not (target / "config.json").exists():
                raise
        return str(target)
    return model


def on_this_node(model: str) -> bool:
    """Whether `model` loads without the network: a directory, a packaged model, or a model id whose config is
    already in the Hugging Face cache (a replica that loads at request time never pulls from a hub)."""
    if os.path.isdir(model) or model in PACKAGED_MODELS:
        return True
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model, "config.json"), str)
    except Exception:  # noqa: BLE001 - not a valid id, no cache: not here
        return False


def read_config(model_dir: str) -> dict:
    if model_dir.startswith(("/", ".", "~")) and not os.path.isdir(model_dir):
        raise ModelLoadError(f"no such model directory: {model_dir}")
    if os.path.isdir(model_dir):
        path = Path(model_dir) / "config.json"
        if not path.exists():
            raise ModelLoadError(f"{model_dir} has no config.json")
        return json.loads(path.read_text())
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(model_dir).to_dict()
    except Exception as exc:  # noqa: BLE001 - any hub or parse failure means "cannot load"
        raise ModelLoadError(
            f"cannot load {model_dir!r}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        ) from exc


def family_of(config: dict) -> str:
    architectures = config.get("architectures") or []
    for arch in architectures:
        for suffix, family in ARCHITECTURES.items():
            if arch.endswith(suffix):
                return family
        if arch.endswith("Model") and config.get("model_type") in ENCODER_TYPES:
            return "embedding"
    raise ModelLoadError(
        f"no scorer family for architectures {architectures}: supported are sequence-classification "
        "cross-encoders, encoder models (embedding), CLIP/SigLIP, BLIP image-text retrieval and Qwen3 / Qwen-VL "
        "yes/no rerankers; for another model, name its family in the pool's `family` setting "
        f"(one of {sorted(FAMILIES)})"
    )


def load_scorer(model: str, options: LoadOptions | None = None) -> Scorer:
    """Load `model` (directory or id) with the family its config.json names."""
    options = options or LoadOptions()
    model_dir = resolve_model_dir(model, options.cache_dir)
    family = options.family or family_of(read_config(model_dir))
    log.info("loading %s as %s on %s", model, family, options.device)
    module, name = FAMILIES[family].split(":")
    try:
        return getattr(importlib.import_module(module), name)(model, model_dir, options)
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot load {model!r} as {family}: {type(exc).__name__}: {exc}") from exc
