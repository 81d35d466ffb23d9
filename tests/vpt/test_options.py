"""The options schema: string forms, repeated and unknown names, and what it tells the other surfaces."""
from __future__ import annotations

import pytest

from vpt.errors import TrainOptionsError
from vpt.options import (
    CLIENT_MODULE,
    DOCS_PAGE,
    TrainOptions,
    aliases,
    client_module,
    form_schema,
    from_form,
    generated,
)
from vpt.train import TrainOptions as FromTrain


def test_train_options_stays_importable_from_vpt_train() -> None:
    assert FromTrain is TrainOptions
    assert TrainOptions().replace(epochs=5).epochs == 5
    with pytest.raises(TrainOptionsError):
        TrainOptions().replace(epochs=0)


def test_every_field_is_in_the_form_schema_with_help_and_a_flag() -> None:
    schema = form_schema()
    assert list(schema) == list(TrainOptions.model_fields)
    assert len(schema) >= 15
    for name, prop in schema.items():
        assert prop["description"] and prop["x-flag"], name
        assert prop["type"] in ("integer", "number", "string", "boolean", "array"), name
        if "default" in prop:
            assert getattr(TrainOptions(), name) == prop["default"], name
        elif TrainOptions.model_fields[name].default_factory is None:
            assert getattr(TrainOptions(), name) is None, name
    # method is free text (component combinations); the usual choices are offered as examples
    assert schema["method"]["examples"][:3] == ["linear", "vpt-shallow", "vpt-deep"]
    assert schema["num_prompts"]["minimum"] == 1 and schema["base_lr"]["exclusiveMinimum"] == 0
    assert aliases() == {"prompts": "num_prompts", "lr": "base_lr", "workers": "num_workers"}


def test_form_strings_become_typed_options() -> None:
    o = from_form([("method", "vpt-shallow"), ("prompts", " 7 "), ("lr", "2.5"), ("warmup_epochs", "3"),
                   ("augmentation", "none"), ("keep", "last"), ("mixed_precision", "off"), ("workers", "2")])
    assert (o.method, o.num_prompts, o.base_lr, o.warmup_epochs, o.augmentation, o.keep, o.mixed_precision,
            o.num_workers) == ("vpt-shallow", 7, 2.5, 3, "none", "last", "off", 2)
    assert from_form([]) == TrainOptions()


@pytest.mark.parametrize("pairs,field,words", [
    ([("epochs", "5"), ("epochs", "6")], "epochs", "more than once"),
    ([("num_prompts", "5"), ("prompts", "6")], "num_prompts", "more than once"),
    ([("colour", "blue")], "colour", "unknown"),
    ([("epochs", "many")], "epochs", "integer"),
    ([("num_prompts", "2.5")], "num_prompts", "integer"),
    ([("base_lr", "nan")], "base_lr", "finite"),
    ([("epochs", "0")], "epochs", "greater than or equal to 1"),
    ([("epochs", "3"), ("warmup_epochs", "4")], "warmup_epochs", "at most epochs"),
    ([("sweep", "huge")], "sweep", "none"),
])
def test_bad_forms_name_the_field(pairs: list[tuple[str, str]], field: str, words: str) -> None:
    with pytest.raises(TrainOptionsError) as info:
        from_form(pairs)
    assert info.value.field == field and words in info.value.message, info.value.message


def test_the_client_copy_and_the_docs_table_are_generated_from_this_schema() -> None:
    files = generated()
    assert CLIENT_MODULE in files and DOCS_PAGE in files
    for path, text in files.items():
        assert path.read_text() == text, f"{path} is stale: run python -m vpt.options --write"
    assert "class TrainOptions(TypedDict" in client_module() and "`--mixed-precision`" in files[DOCS_PAGE]
