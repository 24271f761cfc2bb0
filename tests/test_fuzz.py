"""Generated input against every parser of untrusted input (issue 18): LoRA format and base
detection, page-text extraction, prompt and chat-edit parsing, recipe JSON, and the HTTP API
through its OpenAPI schema (Schemathesis). The safetensors header parser has its own file
(tests/test_safetensors_header.py).

The property is the same everywhere: any input either parses or raises the project's one-line
error (a DiffGraphError); nothing else escapes, nothing hangs (each example has a deadline and
every test a timeout), and sizes stay bounded. Each test runs with a fixed example budget in
the default suite and again with a bigger one under the slow marker (``-m slow``).
"""

from __future__ import annotations

import json
import shutil
import string
from datetime import timedelta

import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin
from support.budget import budget
from support.serving import serving

from diffgraph.agents import brain, injection, refine
from diffgraph.errors import DiffGraphError
from diffgraph.merger.detect import detect_base
from diffgraph.merger.lora_formats import identify_lora_format, lora_family, normalize_lora
from diffgraph.merger.png import RECIPE_KEY, read_recipe
from diffgraph.merger.recipe import ExpertWeight, MergeRecipe, RecipeError
from diffgraph.settings import Settings
from diffgraph.tools import page_text

DEADLINE = timedelta(seconds=5)  # per example: generous for a loaded CI machine, short of a hang


def one_line_error(exc: BaseException) -> None:
    assert isinstance(exc, DiffGraphError), f"{type(exc).__name__} escaped: {exc}"
    message = str(exc)
    assert message.strip() and "\n" not in message and len(message) <= 2000, message


# ----------------------------------------------------------------------------- LoRA files

_PREFIXES = ["lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_transformer_", "unet.", "text_encoder.",
             "transformer.", "base_model.model.", "diffusion_model.", "", "lycoris_"]
_MODULES = ["down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", "mid_block.attentions.0.proj_in",
            "input_blocks_4_1_transformer_blocks_0_attn2_to_k", "text_model_encoder_layers_0_self_attn_q_proj",
            "double_blocks.0.img_attn.qkv", "single_blocks.3.linear1", "single_transformer_blocks.0.attn.to_q",
            "up_blocks.1.attentions.2.transformer_blocks.0.ff.net.0.proj", "time_embedding.linear_1", "x", ""]
_SUFFIXES = [".lora_down.weight", ".lora_up.weight", ".alpha", ".lora_A.weight", ".lora_B.weight", ".hada_w1_a",
             ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".lokr_w1", ".lokr_w2", ".lora_mid.weight", ".dora_scale",
             ".weight", ".diff", ".lora.down.weight", ".lora.up.weight", "", ".processor.qkv_lora1.down.weight"]
_key = st.one_of(st.builds(lambda p, m, s: p + m + s, st.sampled_from(_PREFIXES), st.sampled_from(_MODULES),
                           st.sampled_from(_SUFFIXES)),
                 st.text(alphabet=string.ascii_letters + string.digits + "._-", min_size=1, max_size=60))
_shape = st.lists(st.integers(1, 6), min_size=0, max_size=4).map(tuple)
_lora = st.dictionaries(_key, _shape, min_size=0, max_size=12)
FORMATS = {"unknown", "lycoris-loha", "lycoris-lokr", "flux-control", "flux-fal-kontext", "peft-native", "flux-xlabs",
           "flux-kohya-diffusers", "flux-kohya", "flux-comfy", "lycoris-locon", "ldm-kohya", "kohya", "diffusers"}


@budget(150, 2000)
@pytest.mark.timeout(600)
def test_any_lora_key_set_is_named_or_refused_in_one_line(examples):
    @settings(max_examples=examples, deadline=DEADLINE, suppress_health_check=[HealthCheck.too_slow])
    @given(shapes=_lora, family=st.sampled_from([None, "sd15", "sdxl", "flux"]))
    def run(shapes, family):
        assert identify_lora_format(shapes) in FORMATS
        assert lora_family(shapes) in (None, "sd", "sdxl", "flux")
        try:
            assert isinstance(detect_base(shapes), str)
        except Exception as exc:
            one_line_error(exc)
        tensors = {k: torch.ones(s) for k, s in shapes.items()}
        try:
            out = normalize_lora(tensors, family)
            assert all(isinstance(v, torch.Tensor) for v in out.values())
        except Exception as exc:
            one_line_error(exc)

    run()


# ----------------------------------------------------------------------------- page text

_words = st.text(alphabet=string.ascii_letters + "  ,.:;!?-_'\"`<>[]{}()#*=|/\\\u200b\u202e\u00e9\u0430\u2014",
                 max_size=80)
_label = st.sampled_from(["Trigger words", "Trigger", "Base model", "Tags", "Example prompts", "Keywords", "About",
                          "activation text", "Trained on"])


def _tree(children):
    return st.fixed_dictionaries({
        "t": st.sampled_from(["div", "p", "span", "h1", "h2", "h3", "li", "ul", "code", "pre", "dt", "dd", "th", "td",
                              "tr", "figure", "figcaption", "a", "br", "button", "section"]),
        "h": st.sampled_from(["", "chip", "badge", "trigger-words", "tag-list", "gallery", "heading", "/tags/x",
                              "base-model", "example-prompts"]),
        "b": st.booleans(), "p": st.booleans(), "i": st.booleans(),
        "c": st.lists(children, max_size=5)})


_trees = st.recursive(st.one_of(_words, _label), lambda children: _tree(children), max_leaves=40).filter(
    lambda t: isinstance(t, dict))


@budget(150, 2000)
@pytest.mark.timeout(600)
def test_page_text_extraction_takes_any_page_and_every_value_is_visible_text(examples):
    @settings(max_examples=examples, deadline=DEADLINE, suppress_health_check=[HealthCheck.too_slow])
    @given(tree=_trees, extra=st.lists(st.one_of(_words, st.builds(lambda a, b: f"{a}: {b}", _label, _words)),
                                        max_size=8),
           content_type=st.sampled_from(["text/html", "text/markdown", "text/plain"]))
    def run(tree, extra, content_type):
        root = page_text.Node.from_json(tree)
        text = page_text.clean_text("\n".join([root.text(), *extra]))
        fields = page_text.extract_fields(root, text, content_type)
        flat = " ".join(text.split())
        for value in [*fields.trigger_words, *fields.example_prompts, *fields.tags, *filter(None, [fields.base_model])]:
            assert value in flat, (value, flat)
        for word in fields.trigger_words:  # a token or a short phrase, never field syntax
            assert len(word) <= page_text.MAX_TRIGGER_CHARS and not set(word) & set("\"{}[]<>:=|`")
        for line in page_text.html_to_lines("".join(extra)):
            assert "\n" not in line

    run()


@budget(100, 1000)
@pytest.mark.timeout(600)
def test_a_long_hostile_page_is_read_in_bounded_time(examples):
    """Inputs built to make regular expressions backtrack (long runs of near-matches) finish
    within the deadline: the describe step's classifiers and extractors on up to 20,000
    characters."""
    runs = st.sampled_from(["a" * 50 + ":", "ignore " * 30, "Trigger words: " + "x, " * 200, "\"" * 300,
                            "you " * 200, "dear " * 100 + "AI", "<" * 500, "=" * 400, "aGVsbG8" * 200, " -" * 300])

    @settings(max_examples=examples, deadline=DEADLINE, suppress_health_check=[HealthCheck.too_slow])
    @given(parts=st.lists(st.one_of(runs, _words), min_size=1, max_size=60))
    def run(parts):
        text = page_text.truncate(page_text.clean_text("\n".join(parts)), 20_000)
        page_text.extract_fields(None, text, "text/plain")
        for paragraph in text.split("\n")[:40]:
            injection.split_paragraph(paragraph)
        injection.claim(text.split("\n"))
        injection.suspicious(text[:4000])

    run()


# ----------------------------------------------------------------------------- prompts

_prompts = st.one_of(st.text(max_size=300), st.lists(st.sampled_from(
    ["a", "pink", "circle", "on", "striped", "white", "background", ",", "and", "with", "masterpiece", "best quality",
     "<lora:x:0.8>", "(red:1.2)", "[", "]", "without", "more", "less", "of", "the", "stripes", "instead", "of", "no",
     "2", "second", "expert", "base", "/base", "sd15", "\u200b", "\u202e"]), max_size=40).map(" ".join))
_experts = st.lists(st.fixed_dictionaries({
    "id": st.sampled_from(["civitai:1", "hf:a/b", "local:x.safetensors"]), "name": st.text(max_size=30),
    "kind": st.sampled_from(["lora", "checkpoint"]), "coefficient": st.floats(0, 1), "weight": st.floats(0, 2)}),
    max_size=4)


@budget(200, 3000)
@pytest.mark.timeout(600)
def test_any_prompt_or_chat_edit_parses_or_is_refused_in_one_line(examples):
    @settings(max_examples=examples, deadline=DEADLINE, suppress_health_check=[HealthCheck.too_slow])
    @given(prompt=_prompts, edit=_prompts, experts=_experts)
    def run(prompt, edit, experts):
        parts = brain.decompose(prompt)
        assert all(isinstance(p["component"], str) and p["component"] for p in parts)
        assert isinstance(brain.summarise(prompt), str)
        image = {"prompt": prompt or "a circle", "experts": experts,
                 "recipe": MergeRecipe(base_model="miniworld-sd", prompt=prompt or "a circle",
                                       loras=[ExpertWeight(e["id"], e["coefficient"]) for e in experts
                                              if e["kind"] == "lora"]).to_dict()}
        try:
            parsed = refine.parse(edit, image)
        except Exception as exc:
            one_line_error(exc)
            return
        recipe = MergeRecipe.from_dict(image["recipe"])
        try:
            refine.apply(recipe, parsed)
        except Exception as exc:
            one_line_error(exc)

    run()


# ----------------------------------------------------------------------------- recipe JSON

_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
                     lambda children: st.lists(children, max_size=4)
                     | st.dictionaries(st.text(max_size=12), children, max_size=5), max_leaves=20)
_field_names = st.sampled_from(["base_model", "prompt", "checkpoints", "loras", "seed", "steps", "guidance",
                                "scheduler", "negative_prompt", "width", "height", "temperature", "lora_strength",
                                "effective", "recipe", "name", "coefficient", "path"])


def _mutated(data: dict, draw) -> dict:
    out = dict(data)
    for _ in range(draw(st.integers(1, 3))):
        out[draw(_field_names)] = draw(_json)
    return out


@budget(200, 3000)
@pytest.mark.timeout(600)
def test_any_recipe_json_is_a_recipe_or_a_one_line_refusal(examples, tmp_path):
    real = MergeRecipe(base_model="miniworld-sd", prompt="a pink circle", seed=3,
                       loras=[ExpertWeight("civitai:1", 0.4, "/x.safetensors", "ab" * 32)]).to_dict()

    @settings(max_examples=examples, deadline=DEADLINE, suppress_health_check=[HealthCheck.too_slow])
    @given(data=st.data(), how=st.sampled_from(["mutated", "any json", "raw text", "deep"]))
    def run(data, how):
        if how == "mutated":
            text = json.dumps({"recipe": _mutated(real, data.draw)})
        elif how == "any json":
            text = json.dumps(data.draw(_json))
        elif how == "deep":
            text = "[" * data.draw(st.integers(1, 200_000))
        else:
            text = data.draw(st.text(max_size=200))
        try:
            recipe = MergeRecipe.from_json(text)
        except Exception as exc:
            one_line_error(exc)
            assert isinstance(exc, RecipeError)
            return
        assert isinstance(recipe.prompt, str) and isinstance(recipe.base_model, str)
        assert all(isinstance(e.coefficient, (int, float)) for e in recipe.loras + recipe.checkpoints)
        assert MergeRecipe.from_json(recipe.to_json()) == recipe  # what it accepts, it writes back the same

    run()
    # and through a PNG's text chunk, as `diffgraph export` and the chat's recipe edits read it
    info = PngImagePlugin.PngInfo()
    info.add_text(RECIPE_KEY, "[" * 100_000)
    Image.new("RGB", (4, 4)).save(tmp_path / "deep.png", pnginfo=info)
    with pytest.raises(RecipeError):
        read_recipe(tmp_path / "deep.png")


# ----------------------------------------------------------------------------- the HTTP API

GENERATE_KEY = "fuzz-generate-key-0123456789"


@pytest.fixture(scope="module")
def api_schema(graph_home, tmp_path_factory):
    """The served API (keys on, so its guard is in the path), its OpenAPI schema loaded by
    Schemathesis over real HTTP on loopback."""
    from diffgraph.agents.chat import ChatAgent
    from diffgraph.agents.server import create_app

    home = tmp_path_factory.mktemp("fuzz_home")
    shutil.copytree(graph_home, home, dirs_exist_ok=True)
    settings_ = Settings(home=home, api_keys=GENERATE_KEY, rate_limit=1_000_000)
    with ChatAgent(settings_, llm=None) as agent, serving(create_app(settings_, agent=agent, ui=False)) as url:
        yield schemathesis.openapi.from_url(f"{url}/v1/openapi.json"), url


def _one_line_4xx(response) -> None:
    if 400 <= response.status_code < 500:
        body = response.json()
        message = body["error"]["message"]
        assert isinstance(message, str) and message.strip() and "\n" not in message and len(message) <= 400, body


def _call_both_ways(case, url: str) -> None:
    """With the generate key, and without one (then every /v1 route answers 401)."""
    for headers in ({"Authorization": f"Bearer {GENERATE_KEY}"}, {}):
        response = case.call(base_url=url, headers=headers, timeout=120)
        assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
        _one_line_4xx(response)
        if not headers and case.path.startswith("/v1/"):
            assert response.status_code == 401, (case.path, response.status_code)


@budget(12, 200)
@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE],
                         ids=["valid", "invalid"])
@pytest.mark.timeout(5400)
def test_the_api_never_answers_5xx_and_every_4xx_is_one_line(api_schema, mode, examples):
    """Schemathesis's requests for every operation of /v1/openapi.json, valid ones (renders
    included) and ones that break the schema, sent over HTTP with the generate key and without
    a key. (Its pytest plugin is not used: it needs pytest internals that pytest 9 dropped.)"""
    schema, url = api_schema
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/images/generations", "/v1/images/{image_id}", "/v1/models",
                                             "/v1/graph/status"}
    for operation in operations:
        if mode is schemathesis.GenerationMode.NEGATIVE and not list(operation.iter_parameters()) \
                and not operation.get_request_payload_content_types():
            continue  # nothing in the request to break (GET /v1/models)
        @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case):
            _call_both_ways(case, url)

        run()
