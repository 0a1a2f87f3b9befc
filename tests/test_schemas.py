"""Request models: strategies and thresholds, instruction templates, document objects, TEI truncation."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from serve_app.errors import InvalidInput
from serve_app.ranking import STRATEGIES, Threshold
from serve_app.schemas import ContentIn, ContentSpec, RerankRequest, TeiRerankRequest
from serve_app.settings import DEPLOY_DIR, Settings

TEMPLATES = {"answers_question": "Judge whether the document answers the question.", "same_topic": "Same topic?"}


def request(**extra) -> RerankRequest:
    return RerankRequest(query="what is the capital of france", documents=["paris", "cat"], **extra)


def threshold_of(**extra) -> Threshold | None:
    return request(**extra).to_job(TEMPLATES).threshold


def test_strict_keeps_above_075_exclusive():
    threshold = threshold_of(strategy="strict")
    assert threshold == STRATEGIES["strict"]
    assert threshold.keeps(0.76)
    assert not threshold.keeps(0.75)
    assert not threshold.keeps(0.5)


def test_balanced_keeps_055_inclusive():
    threshold = threshold_of(strategy="balanced")
    assert threshold.keeps(0.55)
    assert threshold.keeps(0.9)
    assert not threshold.keeps(0.5499)


def test_explore_keeps_above_04_exclusive():
    threshold = threshold_of(strategy="explore")
    assert threshold.keeps(0.41)
    assert not threshold.keeps(0.4)
    assert not threshold.keeps(0.1)


def test_no_strategy_or_threshold_keeps_everything():
    assert threshold_of() is None


def test_explicit_threshold_is_inclusive():
    threshold = threshold_of(threshold=0.3)
    assert threshold == Threshold(0.3, inclusive=True)
    assert threshold.keeps(0.3)
    assert not threshold.keeps(0.2999)


@pytest.mark.parametrize("value", [0.0, 1.0])
def test_threshold_bounds_are_accepted(value):
    assert threshold_of(threshold=value).keeps(value)


@pytest.mark.parametrize("value", [-0.1, 1.1])
def test_threshold_outside_unit_interval_is_a_validation_error(value):
    with pytest.raises(ValidationError):
        request(threshold=value)


def test_strategy_and_threshold_together_is_a_validation_error():
    with pytest.raises(ValidationError, match="strategy"):
        request(strategy="strict", threshold=0.5)


def test_unknown_strategy_is_a_validation_error():
    with pytest.raises(ValidationError):
        request(strategy="lenient")


def test_instruction_and_template_together_is_a_validation_error():
    with pytest.raises(ValidationError, match="instruction"):
        request(instruction="judge", instruction_template="same_topic")


def test_instruction_template_resolves_to_its_text():
    assert (
        request(instruction_template="answers_question").to_job(TEMPLATES).instruction
        == (TEMPLATES["answers_question"])
    )


def test_free_text_instruction_passes_through():
    assert request(instruction="judge this").to_job(TEMPLATES).instruction == "judge this"


def test_unknown_instruction_template_lists_known_names():
    with pytest.raises(InvalidInput, match="no_such_template") as info:
        request(instruction_template="no_such_template").to_job(TEMPLATES)
    assert info.value.field == "instruction_template"
    for name in TEMPLATES:
        assert name in info.value.message


def test_deploy_templates_file_loads_through_settings():
    templates = Settings().instruction_templates()
    assert Settings().instruction_templates_path == DEPLOY_DIR / "instruction_templates.json"
    assert templates == json.loads((DEPLOY_DIR / "instruction_templates.json").read_text())
    assert "answers_question" in templates
    assert all(isinstance(k, str) and isinstance(v, str) and v for k, v in templates.items())
    job = request(instruction_template="answers_question").to_job(templates)
    assert job.instruction == templates["answers_question"]


def test_templates_file_that_is_not_an_object_of_strings_is_refused(tmp_path):
    path = tmp_path / "templates.json"
    path.write_text(json.dumps({"a": 1}))
    with pytest.raises(ValueError, match="name -> instruction"):
        Settings(instruction_templates_path=path).instruction_templates()


def test_document_object_with_neither_text_nor_image_is_a_validation_error():
    with pytest.raises(ValidationError, match="text"):
        RerankRequest(query="q", documents=[{}])
    with pytest.raises(ValidationError):
        ContentIn()


def test_document_object_with_other_fields_is_a_record_scored_by_its_text_or_rank_fields():
    request = RerankRequest(query="q", documents=[{"text": "a", "url": "b"}, {"id": 7, "title": "t", "body": "b"}])
    with pytest.raises(InvalidInput, match="rank_fields"):
        request.to_job({})
    job = RerankRequest(query="q", documents=[{"text": "a", "url": "b"}, {"id": 7, "body": "b"}]).to_job({})
    assert job.documents == [ContentSpec(text="a"), ContentSpec(text="b")]
    job = RerankRequest(
        query="q", documents=[{"id": 7, "title": "t", "body": "b"}], rank_fields=["title", "body"]
    ).to_job({})
    assert job.documents == [ContentSpec(text="title: t\nbody: b")]


def test_documents_as_strings_and_objects_become_content_specs():
    job = RerankRequest(
        query={"text": "red car", "image": "aGVsbG8="},
        documents=["paris", {"text": "cat"}, {"image": "aGVsbG8="}],
        top_n=2,
        max_tokens_per_doc=16,
    ).to_job({})
    assert job.query == ContentSpec(text="red car", image="aGVsbG8=")
    assert job.documents == [ContentSpec(text="paris"), ContentSpec(text="cat"), ContentSpec(image="aGVsbG8=")]
    assert job.top_n == 2
    assert job.max_tokens_per_doc == 16


def test_empty_documents_is_a_validation_error():
    with pytest.raises(ValidationError):
        RerankRequest(query="q", documents=[])


@pytest.mark.parametrize("auto_truncate", [True, False])
def test_tei_unset_truncate_takes_auto_truncate(auto_truncate):
    job = TeiRerankRequest(query="q", texts=["a", "b"]).to_job(auto_truncate=auto_truncate)
    assert job.truncate is auto_truncate
    assert job.query == ContentSpec(text="q")
    assert job.documents == [ContentSpec(text="a"), ContentSpec(text="b")]


@pytest.mark.parametrize("truncate", [True, False])
@pytest.mark.parametrize("auto_truncate", [True, False])
def test_tei_explicit_truncate_wins_over_auto_truncate(truncate, auto_truncate):
    job = TeiRerankRequest(query="q", texts=["a"], truncate=truncate).to_job(auto_truncate=auto_truncate)
    assert job.truncate is truncate
