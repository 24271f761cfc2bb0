"""The Expert Selection Agent over a real universal graph of the mini world: the offline brain
picks the experts a prompt needs and drops near-duplicates; an expert of another base is never
selected; and the LLM path runs against a scripted OpenAI-compatible server (real client, real
tool calls), falling back to the offline brain, with a note, on garbage."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diffgraph.agents.esa import select_experts
from diffgraph.agents.llm import chat_model
from diffgraph.graph_store.records import ExpertRecord
from diffgraph.graph_store.store import GraphStore
from diffgraph.settings import Settings
from support.budget import budget
from support.openai_server import ScriptedOpenAI, running, text, tool_call

BASE = "miniworld-sd"


@pytest.fixture()
def store(graph_home):
    with GraphStore.open(graph_home) as s:
        yield s


def _names(store, picks):
    return {store.catalog.get(p["id"]).name.split("/")[-1].lower().replace(" ", "-") for p in picks}


def test_offline_brain_picks_the_needed_experts_and_says_why(store):
    result = select_experts(store, "a pink circle on a striped white background, warm light", BASE)
    names = _names(store, result["selected"])
    assert {"pink-pop", "golden-hour"} <= names
    assert names & {"stripes-pro", "stripes-lite"}, "a stripes expert"
    assert not {"stripes-pro", "stripes-lite"} <= names, "near-duplicates are pruned"
    assert all(p["reason"] for p in result["selected"])
    assert result["brain"] == "offline"


def test_plain_prompt_needs_no_expert(store):
    assert select_experts(store, "a red circle on a white background", BASE)["selected"] == []


def test_style_prompt_selects_the_style_checkpoint(store):
    result = select_experts(store, "vintage sepia photo of a red square on a beige background", BASE)
    ckpts = [p for p in result["selected"] if p["kind"] == "ckpt"]
    assert _names(store, ckpts) == {"vintage-sepia"}


def test_an_expert_of_another_base_is_never_selected(store):
    record = ExpertRecord(source="civitai", source_id="999999", version="1", name="SD15 Stripes", kind="lora",
                          base_model="SD 1.5", tags=["stripes"], trigger_words=["striped background"])
    store.upsert_expert(record)
    text_ = "SD15 Stripes (LoRA adapter for SD 1.5): striped background, stripes, striped backgrounds."
    store.register(record.id, {"summary": text_}, text_, None)
    store.set_status(record.id, "active", "test")
    try:
        for prompt in ("a striped background", "a blue square on a striped gray background"):
            ids = {p["id"] for p in select_experts(store, prompt, BASE)["candidates"]}
            assert record.id not in ids
    finally:
        store.set_status(record.id, "removed", "test over")


def _llm(url):
    return chat_model(Settings(home=".", llm_base_url=url, llm_model="scripted"))


def test_llm_path_uses_real_tool_calls(store):
    pink = next(r.id for r in store.catalog.list_experts() if r.name == "Pink Pop")
    script = [
        tool_call("Decomposition", {"summary": "a pink circle", "components": [
            {"component": "circle", "attributes": ["pink colour", "striped background"]}]}),
        tool_call("Review", {"keep": [{"id": pink, "reason": "makes the circle pink"}]}),
    ]
    server = ScriptedOpenAI(script)
    with running(server) as url:
        result = select_experts(store, "a pink circle on a striped white background", BASE, llm=_llm(url))
    assert [p["id"] for p in result["selected"]] == [pink]
    assert result["selected"][0]["reason"] == "makes the circle pink"
    assert len(server.requests) == 2 and all("tools" in r for r in server.requests)
    review_request = server.requests[1]["messages"][-1]["content"]
    assert pink in review_request, "the review sees the retrieved candidates"


@pytest.mark.parametrize("bad", [
    tool_call("Decomposition", "{not json"),
    text("Sure! Here are the experts you need."),
    {"raw": "<html>502 Bad Gateway</html>", "status": 502},
], ids=["broken-arguments", "no-tool-call", "not-json-at-all"])
def test_llm_garbage_falls_back_to_the_offline_brain(store, bad):
    server = ScriptedOpenAI(default=bad)
    with running(server) as url:
        result = select_experts(store, "a pink circle on a striped white background", BASE, llm=_llm(url))
    offline = select_experts(store, "a pink circle on a striped white background", BASE)
    assert [p["id"] for p in result["selected"]] == [p["id"] for p in offline["selected"]]
    assert any("offline brain" in n or "offline review" in n for n in result["notes"])


def test_review_naming_unknown_experts_is_not_trusted(store):
    script = [tool_call("Decomposition", {"summary": "a pink circle", "components": [
                  {"component": "circle", "attributes": ["pink colour"]}]}),
              tool_call("Review", {"keep": [{"id": "civitai:does-not-exist", "reason": "trust me"}]})]
    with running(ScriptedOpenAI(script)) as url:
        result = select_experts(store, "a pink circle", BASE, llm=_llm(url))
    assert all(store.catalog.get(p["id"]) is not None for p in result["selected"])
    assert "civitai:does-not-exist" not in {p["id"] for p in result["selected"]}


def test_dead_endpoint_falls_back(store):
    result = select_experts(store, "a pink circle", BASE, llm=_llm("http://127.0.0.1:9/v1"))
    assert result["selected"] and result["notes"]
    assert np.isfinite([p["similarity"] for p in result["selected"]]).all()


# What a prompt asks to be absent ("no outline", "without blur") is no need: retrieving for it would
# pick the very expert that adds it. Generated: a scene that needs no expert, plus the absence of a
# skill some expert adds, in the phrasings people write.
ABSENT = {"outline": {"ink-outline"}, "black outline": {"ink-outline"}, "outlines": {"ink-outline"},
          "blur": {"dreamy-blur"}, "soft focus": {"dreamy-blur"}, "stripes": {"stripes-pro", "stripes-lite"},
          "striped background": {"stripes-pro", "stripes-lite"}, "polka dots": {"polka-dots"},
          "dots": {"polka-dots"}, "checkered pattern": {"checkerboard"}, "warm light": {"golden-hour"}}
ABSENCE = ["no {}", "with no {}", "without {}", "without any {}", "not {}", "free of {}", "No {}", "(no {})"]
SCENES = ["a red circle on a white background", "a blue square on a gray background",
          "a green triangle on a black background", "yellow circle, beige background"]


@budget(default=10, slow=80)
def test_what_a_prompt_asks_to_be_absent_selects_no_expert(store, examples):
    @settings(max_examples=examples, deadline=None, database=None)
    @given(scene=st.sampled_from(SCENES), absent=st.sampled_from(sorted(ABSENT)), how=st.sampled_from(ABSENCE),
           joiner=st.sampled_from([", ", " ", " and ", ", and "]), before=st.booleans())
    def absent_is_not_selected(scene, absent, how, joiner, before):
        phrase = how.format(absent)
        prompt = f"{phrase}{joiner}{scene}" if before else f"{scene}{joiner}{phrase}"
        names = _names(store, select_experts(store, prompt, BASE)["selected"])
        assert not names & ABSENT[absent], f"{prompt!r} selected {sorted(names & ABSENT[absent])}"

    absent_is_not_selected()


def test_an_absence_next_to_a_need_keeps_the_need(store):
    names = _names(store, select_experts(store, "a pink circle on a white background with no outline", BASE)["selected"])
    assert "pink-pop" in names and "ink-outline" not in names
