"""Prompt templates, the prompt-length check and the base classifiers of text.py, against what the text tower of the
tiny backbone gives when called here (docs/mutation.md)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import encode_texts
from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

from taskres.errors import TaskResError
from taskres.text import build_base_classifier, check_prompts_fit, check_templates, normalized_text_classifier


def test_no_template_says_how_to_pass_one():
    with pytest.raises(TaskResError) as err:
        check_templates([])
    assert str(err.value) == (
        "no prompt template given; pass --template with a string holding '{}', e.g. --template 'a photo of a {}.'"
    )


@pytest.mark.parametrize("template", ["{} {x}", "{} {0}", "{} {", "{0:d} {}", "{0.real} {}", "{0[a]} {}"])
def test_other_braces_are_refused_with_the_escape_hint(template):
    """Every template with a field besides the one '{}' is refused with the same message (fields that look up an
    attribute or an item of the class name, such as '{0.real}', used to escape as a bare AttributeError/TypeError)."""
    with pytest.raises(TaskResError) as err:
        check_templates(["a photo of a {}.", template])
    assert str(err.value) == (
        f"template {template!r} has braces other than the one '{{}}'; write a literal brace as '{{{{' or '}}}}'."
    )


def test_escaped_braces_are_literal_text_not_the_placeholder(tiny):
    """'{{}}' is a literal '{}' in the prompt: a template with only that has no place for the class name (each class
    would get the same prompt), and it does not count as a second placeholder beside a real one."""
    for template in ("a photo of a {{}}.", "{{}}", "a {{{{}}}}"):
        with pytest.raises(TaskResError, match="must contain exactly one '{}' where the class name goes"):
            check_templates([template])
    templates = ["a {{}} photo of a {}.", "{{{}}}", "{}}}"]
    assert check_templates(templates) == tuple(templates)
    base = build_base_classifier(tiny, ["cat", "dog"], templates)
    for row, name in zip(base, ["cat", "dog"]):
        prompts = [f"a {{}} photo of a {name}.", f"{{{name}}}", f"{name}}}"]
        torch.testing.assert_close(row, encode_texts(tiny, prompts).mean(0), rtol=1e-5, atol=1e-6)


def test_underscores_count_as_encoded_in_the_length_check(tiny):
    """build_base_classifier encodes the class name as given, normalized_text_classifier with spaces for '_': each
    checks the length of the prompt it encodes. "cat_cat_..." is twice as many tokens as "cat cat ..."."""
    context = tiny.tokenizer.context_length
    name = "_".join(["cat"] * (context - 2))
    spaced = name.replace("_", " ")
    assert len(tiny.tokenizer.encode(spaced)) + 2 == context  # fits exactly
    assert len(tiny.tokenizer.encode(name)) + 2 > context
    with pytest.raises(TaskResError, match="it would be cut and lose the class name"):
        build_base_classifier(tiny, [name], ["{}"])
    with pytest.raises(TaskResError, match="it would be cut and lose the class name"):
        check_prompts_fit(tiny, [name], ["{}"])  # the default: names as given
    check_prompts_fit(tiny, [name], ["{}"], replace_underscores=True)
    rows = normalized_text_classifier(tiny, [name], ["{}"])
    torch.testing.assert_close(rows[0], F.normalize(encode_texts(tiny, [spaced])[0], dim=0), rtol=1e-5, atol=1e-6)


def test_a_long_prompt_is_refused_naming_prompt_template_class_and_param(tiny):
    context = tiny.tokenizer.context_length
    name = "_".join(["cat"] * (context - 3))  # the spaced prompt below is context - 3 + 3 + 2 = context + 2 tokens
    template = "a b {} c"
    with pytest.raises(TaskResError) as err:
        check_prompts_fit(tiny, ["dog", name], ["{}", template], replace_underscores=True)
    text = template.format(name.replace("_", " "))
    assert len(tiny.tokenizer.encode(text)) + 2 == context + 2
    assert str(err.value) == (
        f"the prompt {text!r} (template {template!r}, class {name!r}) is {context + 2} tokens, but the text encoder "
        f"reads {context}; it would be cut and lose the class name. Shorten the `templates` or the class name."
    )
    assert err.value.param == "templates"


class OwnTokenizer:
    """A tokenizer with only what the length check reads: ``encode`` (and ``context_length`` if given)."""

    def __init__(self, context_length=None):
        self._inner = SimpleTokenizer(context_length=16)
        if context_length is not None:
            self.context_length = context_length

    def encode(self, text):
        return self._inner.encode(text)


def test_which_tokenizers_are_length_checked():
    long = " ".join(["cat"] * 20)  # 22 tokens with start and end
    checked = [SimpleTokenizer(context_length=16), OwnTokenizer(16)]  # the second has no `reduction_fn` at all
    for tokenizer in checked:
        with pytest.raises(TaskResError, match="is 22 tokens, but the text encoder reads 16"):
            check_prompts_fit(SimpleNamespace(tokenizer=tokenizer), [long], ["{}"])
    hf = HFTokenizer.__new__(HFTokenizer)  # open_clip's Hugging Face wrapper: a context length, no `encode`
    hf.context_length = 16
    not_checked = [
        hf,
        OwnTokenizer(),  # no context length
        SimpleTokenizer(context_length=16, reduction_mask="simple"),  # picks the tokens to keep itself
    ]
    for tokenizer in not_checked:
        check_prompts_fit(SimpleNamespace(tokenizer=tokenizer), [long], ["{}"])
