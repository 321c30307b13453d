"""Prompt templates, the prompt-length check and the base classifiers of text.py, against what the text tower of the
tiny backbone gives when called here: rows averaged by hand, the exact message of each refusal (docs/mutation.md)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import encode_texts
from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

from taskres.errors import TaskResError
from taskres.text import build_base_classifier, check_prompts_fit, check_templates, normalized_text_classifier

# ---- base classifiers ----------------------------------------------------------------------------------------------


def test_base_classifier_rows_are_mean_unnormalised_embeddings(tiny):
    templates = ["a photo of a {}.", "{} art."]
    names = ["sea_lion", "cat", "red fox"]
    base = build_base_classifier(tiny, names, templates)
    assert base.shape == (3, 32) and base.dtype == torch.float32
    for row, name in zip(base, names):
        torch.testing.assert_close(
            row, encode_texts(tiny, [t.format(name) for t in templates]).mean(0), rtol=1e-5, atol=1e-6
        )
    spaced = build_base_classifier(tiny, ["sea lion"], templates)
    assert not torch.allclose(spaced[0], base[0])  # underscores are kept, so the base differs


def test_base_classifier_in_half_precision(tiny):
    templates = ["a photo of a {}.", "{} art."]
    half = build_base_classifier(tiny, ["cat", "dog"], templates, text_precision="fp16")
    full = build_base_classifier(tiny, ["cat", "dog"], templates)
    assert half.dtype == torch.float32 and not torch.equal(half, full)
    torch.testing.assert_close(half, full, rtol=0.05, atol=0.05)
    assert next(tiny.model.parameters()).dtype == torch.float32  # the backbone itself stays fp32
    with pytest.raises(TaskResError):
        build_base_classifier(tiny, ["cat"], templates, text_precision="bf16")


def test_normalized_classifier_is_coops_zero_shot_rows(tiny):
    templates = ["a photo of a {}.", "{} art.", "a {} in the wild."]
    rows = normalized_text_classifier(tiny, ["sea_lion", "cat"], templates)
    for row, name in zip(rows, ["sea lion", "cat"]):  # underscores become spaces
        expected = F.normalize(
            F.normalize(encode_texts(tiny, [t.format(name) for t in templates]), dim=-1).mean(0), dim=0
        )
        torch.testing.assert_close(row, expected, rtol=1e-5, atol=1e-6)
    one = normalized_text_classifier(tiny, ["cat"], ["a photo of a {}."])
    torch.testing.assert_close(
        one[0], F.normalize(encode_texts(tiny, ["a photo of a cat."])[0], dim=0), rtol=1e-5, atol=1e-6
    )


# ---- templates -----------------------------------------------------------------------------------------------------


def test_templates_need_exactly_one_placeholder():
    assert check_templates(["a {}.", "b {} {{x}}"]) == ("a {}.", "b {} {{x}}")
    for bad in ([], ["no slot"], ["{} and {}"], ["{} {0}"], ["{} {x}"], ["{} {"]):
        with pytest.raises(TaskResError):
            check_templates(bad)


def test_template_without_placeholder(tiny):
    with pytest.raises(TaskResError, match=r"template 'a photo' must contain exactly one '\{\}'"):
        build_base_classifier(tiny, ["cat"], ["a photo"])


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


# ---- the prompt-length check ---------------------------------------------------------------------------------------


def test_prompt_length_limit_counts_start_and_end_tokens(tiny):
    context = tiny.tokenizer.context_length
    word = "cat"
    n_word = len(tiny.tokenizer.encode(word + " "))  # tokens one repetition adds
    fits = " ".join([word] * (context - 2))
    assert len(tiny.tokenizer.encode(fits)) + 2 == context and n_word == 1
    check_prompts_fit(tiny, [fits], ["{}"])  # exactly the context: fits
    with pytest.raises(TaskResError, match=f"is {context + 1} tokens, but the text encoder reads {context}"):
        check_prompts_fit(tiny, [fits + " cat"], ["{}"])
    # with underscores replaced, "a_b" is two words: counted as the text that is encoded
    under = "_".join(["cat"] * (context - 2))
    with pytest.raises(TaskResError):
        check_prompts_fit(tiny, [under + "_cat"], ["{}"], replace_underscores=True)


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
