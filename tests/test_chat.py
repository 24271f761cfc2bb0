"""The chat agent over a real universal graph of the mini world.

The LLM path talks HTTP to a scripted OpenAI-compatible server (real langchain-openai client,
real tool calls): the chat agent's requests get the scripted answers, and the Expert Selection
Agent's structured calls (Decomposition, Review) are answered the way the offline brain would.
The same conversation runs with the offline brain; conversations resume from the SQLite
checkpointer after the agent is re-created; and every kind of bad input gets a clear answer
while the conversation goes on.
"""

from __future__ import annotations

import json
import re
import shutil
import time

import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

from diffgraph.agents import brain as offline_brain
from diffgraph.agents.chat import MAX_PROMPT_CHARS, ChatAgent
from diffgraph.merger.png import read_recipe
from diffgraph.settings import Settings
from support.openai_server import ScriptedOpenAI, running, text, tool_call

PROMPT = "a pink circle on a striped white background"


@pytest.fixture(scope="module")
def home(graph_home, tmp_path_factory):
    """A copy of the session's graph (the chat keeps its checkpoints and images in its home)."""
    target = tmp_path_factory.mktemp("chat_home")
    shutil.copytree(graph_home, target, dirs_exist_ok=True)
    return target


class ScriptedLLM:
    """The scripted model: ESA calls answered like the offline brain; chat calls pop ``script``
    (dicts, or callables of the request body)."""

    def __init__(self, script=()):
        self.script = list(script)
        self.chat_requests: list[dict] = []
        self.esa_requests: list[dict] = []

    def __call__(self, body: dict) -> dict:
        tools = {t["function"]["name"] for t in body.get("tools", [])}
        content = body["messages"][-1].get("content") or ""
        if "Decomposition" in tools:
            self.esa_requests.append(body)
            prompt = re.search(r"<prompt>(.*)</prompt>", content, re.S).group(1)
            return tool_call("Decomposition", {"summary": offline_brain.summarise(prompt),
                                               "components": offline_brain.decompose(prompt)})
        if "Review" in tools:
            self.esa_requests.append(body)
            ids = re.findall(r"^- id=(\S+) kind=", content, re.M)[:2]
            return tool_call("Review", {"keep": [{"id": i, "reason": "scripted review keeps the two closest"} for i in ids]})
        self.chat_requests.append(body)
        if not self.script:
            return text("(the script is over)")
        answer = self.script.pop(0)
        return answer(body) if callable(answer) else answer


def tool_results(body: dict) -> list[dict]:
    return [m for m in body["messages"] if m["role"] == "tool"]


def last_tool(body: dict) -> str:
    return tool_results(body)[-1]["content"]


def llm_settings(home, url: str) -> Settings:
    return Settings(home=home, llm_base_url=url, llm_model="scripted")


def weights(image: dict) -> dict[str, float]:
    return {e["id"]: e["weight"] for e in image["experts"]}


def assert_png_with_recipe(image: dict) -> None:
    with Image.open(image["path"]) as im:
        assert im.format == "PNG" and im.size == (32, 32)
    # the prompt rendered: the image's, then the trigger words of its LoRAs (merger.recipe.with_trigger_words)
    assert read_recipe(image["path"]).prompt.startswith(image["prompt"])


# ---------------------------------------------------------------------------- the LLM path


def test_llm_conversation_generate_refine_explain(home):
    def first_expert(body):
        generated = json.loads(next(m["content"] for m in tool_results(body) if '"experts"' in m["content"]))
        return generated["experts"][0]["name"]

    llm = ScriptedLLM([
        tool_call("generate_image", {"prompt": PROMPT}),
        lambda body: text(f"Here it is: {json.loads(last_tool(body))['path']}"),
        lambda body: tool_call("refine_image", {"instruction": f"less of {first_expert(body)}"}),
        text("Done: that expert has less weight now."),
        tool_call("explain_image", {}),
        lambda body: text("Explained: " + last_tool(body)[:200]),
    ])
    server = ScriptedOpenAI(default=llm)
    with running(server) as url, ChatAgent(llm_settings(home, url)) as agent:
        r1 = agent.send("make me a pink circle on a striped background", "llm")
        r2 = agent.send("less of the first expert, please", "llm")
        r3 = agent.send("why did you pick those experts?", "llm")

    assert (r1.brain, r1.tools, len(r1.images)) == ("llm", ["generate_image"], 1)
    first = r1.images[0]
    assert first["path"] in r1.text and first["experts"], r1.text
    assert first["brain"] == "llm" and llm.esa_requests, "the ESA ran its LLM steps through the same endpoint"
    assert_png_with_recipe(first)
    offered = {t["function"]["name"] for t in llm.chat_requests[0]["tools"]}
    assert {"generate_image", "refine_image", "explain_image", "search_experts", "graph_status", "add_expert",
            "start_graph_updates", "stop_graph_updates"} <= offered

    assert r2.tools == ["refine_image"] and len(r2.images) == 1
    second = r2.images[0]
    target = first["experts"][0]["id"]
    assert second["parent"] == first["n"] and second["seed"] == first["seed"] and second["prompt"] == first["prompt"]
    assert weights(second)[target] < weights(first)[target], (weights(first), weights(second))
    assert set(weights(second)) == set(weights(first))
    assert_png_with_recipe(second)

    assert r3.tools == ["explain_image"] and not r3.images
    explanation = json.loads(last_tool(llm.chat_requests[-1]))
    assert explanation["image"] == second["n"]
    for expert in explanation["experts"]:
        assert expert["reason"] and expert["calibration"] and expert["calibrated_prompts"] > 0
    assert r3.text.startswith("Explained:")


def test_llm_conversation_resumes_after_restart(home):
    llm = ScriptedLLM([tool_call("generate_image", {"prompt": "a teal diamond on a mint background", "seed": 5}),
                       text("here"),
                       tool_call("refine_image", {"instruction": "another seed"}),
                       text("again")])
    with running(ScriptedOpenAI(default=llm)) as url:
        with ChatAgent(llm_settings(home, url)) as agent:
            agent.send("a teal diamond please", "llm-resume")
        with ChatAgent(llm_settings(home, url)) as again:  # a new process would do just this
            reply = again.send("and once more with another seed", "llm-resume")
    history = [m.get("content") for m in llm.chat_requests[-2]["messages"]]
    assert "a teal diamond please" in history, "the earlier turn is in what the LLM sees"
    assert reply.images and reply.images[0]["seed"] == 6 and reply.images[0]["parent"] == 1


def test_llm_plugin_tool_is_called(home):
    pytest.importorskip("diffgraph_example_plugin", reason="pip install -e examples/diffgraph-example-plugin")
    from diffgraph_example_plugin import lucky_seed

    llm = ScriptedLLM([tool_call("lucky_seed", {"text": "Ada"}), lambda body: text(f"Your seed: {last_tool(body)}")])
    with running(ScriptedOpenAI(default=llm)) as url, ChatAgent(llm_settings(home, url)) as agent:
        reply = agent.send("give me a lucky seed for Ada", "plugin")
    assert "lucky_seed" in {t["function"]["name"] for t in llm.chat_requests[0]["tools"]}
    assert reply.tools == ["lucky_seed"]
    assert reply.text == f"Your seed: {lucky_seed.invoke({'text': 'Ada'})}"


def test_llm_tool_errors_are_clear_and_the_conversation_goes_on(home):
    llm = ScriptedLLM([
        tool_call("generate_image", {"prompt": "   "}),
        lambda body: text("Tool said: " + last_tool(body)),
        tool_call("refine_image", {"instruction": "make it sparkle"}),
        lambda body: text("Tool said: " + last_tool(body)),
        tool_call("generate_image", {"prompt": "a red square on a white background"}),
        text("ok"),
        tool_call("refine_image", {"instruction": "make it sparkle"}),
        lambda body: text("Tool said: " + last_tool(body)),
        tool_call("no_such_tool", {}),
        lambda body: text("Tool said: " + last_tool(body)),
        tool_call("refine_image", {"instruction": "another seed"}),
        text("ok"),
    ])
    with running(ScriptedOpenAI(default=llm)) as url, ChatAgent(llm_settings(home, url)) as agent:
        empty = agent.send("draw nothing", "llm-bad")
        no_image = agent.send("make it sparkle", "llm-bad")
        made = agent.send("a red square", "llm-bad")
        unknown = agent.send("make it sparkle", "llm-bad")
        bogus = agent.send("use your secret tool", "llm-bad")
        after = agent.send("another seed", "llm-bad")
    assert "error: the prompt is empty" in empty.text
    assert "no image in this conversation yet" in no_image.text
    assert made.images
    assert "I do not know the refinement 'make it sparkle'" in unknown.text
    assert "no_such_tool" in bogus.text and "not a valid tool" in bogus.text.lower()
    assert after.images and after.images[0]["parent"] == made.images[0]["n"]


def test_dead_llm_endpoint_gets_an_answer_from_the_offline_brain(home):
    with ChatAgent(llm_settings(home, "http://127.0.0.1:9/v1")) as agent:
        started = time.monotonic()
        first = agent.send(PROMPT, "dead")
        second = agent.send("explain", "dead")
        elapsed = time.monotonic() - started
    assert first.brain == "offline" and first.images
    assert "failed" in first.text and "the offline brain answered" in first.text
    assert first.images[0]["brain"] == "offline", "the ESA did not wait for the dead endpoint again"
    assert "calibration over" in second.text
    assert elapsed < 60


@pytest.mark.parametrize("garbage", [
    tool_call("generate_image", "{not json"),
    {"raw": "<html>502 Bad Gateway</html>", "status": 502},
    {"raw": "this is not JSON", "status": 200},
    text(""),
], ids=["broken-tool-arguments", "bad-gateway-html", "not-json", "empty-answer"])
def test_llm_garbage_gets_an_answer_and_the_conversation_goes_on(home, garbage):
    server = ScriptedOpenAI(default=garbage)
    with running(server) as url, ChatAgent(llm_settings(home, url)) as agent:
        thread = f"garbage-{len(server.requests)}-{time.monotonic_ns()}"
        reply = agent.send(PROMPT, thread)
        assert reply.brain == "offline" and reply.images, reply.text
        assert "the offline brain answered" in reply.text
        assert ("unusable" in reply.text) or ("failed" in reply.text)
        server.default = ScriptedLLM([text("Back to normal.")])  # the endpoint recovers
        again = agent.send("thanks", thread)
    assert (again.brain, again.text) == ("llm", "Back to normal.")


# ---------------------------------------------------------------------------- the offline brain


def test_offline_conversation_generate_refine_explain(home):
    with ChatAgent(Settings(home=home), llm=None) as agent:
        r1 = agent.send(PROMPT, "offline")
        name = r1.images[0]["experts"][0]["name"]
        r2 = agent.send(f"less of {name}", "offline")
        r3 = agent.send("use only one expert", "offline")
        r4 = agent.send("same but a square instead of a circle", "offline")
        r5 = agent.send("explain", "offline")
        r6 = agent.send("search striped backgrounds", "offline")
        r7 = agent.send("status", "offline")
    for reply in (r1, r2, r3, r4, r5, r6, r7):
        assert reply.brain == "offline" and "offline brain" in reply.text
    first, second, third, fourth = (r.images[0] for r in (r1, r2, r3, r4))
    assert len(first["experts"]) >= 2
    target = first["experts"][0]["id"]
    assert weights(second)[target] < weights(first)[target]
    assert len(third["experts"]) == 1 and third["parent"] == second["n"]
    assert fourth["prompt"] == "a pink square on a striped white background" and fourth["seed"] == first["seed"]
    assert all(Image.open(im["path"]).size == (32, 32) for im in (first, second, third, fourth))
    assert "calibration over" in r5.text and f"Image {fourth['n']}" in r5.text
    assert "Stripes" in r6.text
    assert "22 experts" in r7.text or "23 experts" in r7.text


def test_offline_refinement_only_re_renders(home):
    """A recipe edit skips selection and planning: same prompt, same seed, the recipe edited."""
    with ChatAgent(Settings(home=home), llm=None) as agent:
        first = agent.send("vintage sepia photo of a red square on a beige background", "recipe").images[0]
        assert any(e["kind"] == "ckpt" for e in first["experts"])
        ckpt = next(e for e in first["experts"] if e["kind"] == "ckpt")
        second = agent.send(f"less of {ckpt['name']}", "recipe").images[0]
    before = first["recipe"]["effective"]["checkpoints"][ckpt["id"]]
    after = second["recipe"]["effective"]["checkpoints"][ckpt["id"]]
    # "less of" halves the expert's odds against the rest of its group (the base anchor)
    assert after / (1 - after) == pytest.approx(0.5 * before / (1 - before), rel=1e-4)
    assert (second["prompt"], second["seed"]) == (first["prompt"], first["seed"])


def test_conversation_resumes_after_recreating_the_agent(home):
    with ChatAgent(Settings(home=home), llm=None) as agent:
        first = agent.send("a purple triangle on a gray background", "resume").images[0]
    with ChatAgent(Settings(home=home), llm=None) as agent:
        assert [im["n"] for im in agent.images("resume")] == [1]
        assert agent.history("resume")[0] == {"role": "user", "content": "a purple triangle on a gray background"}
        name = first["experts"][0]["name"] if first["experts"] else None
        reply = agent.send(f"less of {name}" if name else "another seed", "resume")
    assert reply.images[0]["n"] == 2 and reply.images[0]["parent"] == 1


def test_offline_bad_input_gets_clear_answers(home):
    with ChatAgent(Settings(home=home), llm=None) as agent:
        t = "bad"
        empty = agent.send("   ", t)
        assert "empty" in empty.text and not empty.images
        no_image = agent.send("less of pink pop", t)
        assert "no image to refine yet" in no_image.text
        long = agent.send(("a red square on a white background, " * 300)[:9_999] + "x", t)
        assert "10,000 characters" in long.text and long.images
        assert len(long.images[0]["prompt"]) <= MAX_PROMPT_CHARS
        assert any("used the first" in n for n in long.images[0]["notes"])
        japanese = agent.send("白い背景に赤い円", t)
        assert japanese.images and "non-Latin script" in japanese.text
        unknown = agent.send("make it sparkle", t)
        assert "I do not know the refinement 'make it sparkle'" in unknown.text and not unknown.images
        unknown_expert = agent.send("less of the watercolour expert", t)
        assert "is not an expert of this image" in unknown_expert.text
        fine = agent.send("another seed", t)
        assert fine.images and fine.images[0]["parent"] == japanese.images[0]["n"]


# ---------------------------------------------------------------------------- growing the graph


@pytest.fixture()
def own_home(graph_home, tmp_path):
    target = tmp_path / "home"
    shutil.copytree(graph_home, target)
    return target


def test_add_expert_by_path_and_background_gca(own_home, artifacts_dir, tmp_path):
    folder = tmp_path / "my-loras"
    folder.mkdir()
    manifest = json.loads((artifacts_dir / "manifest.json").read_text())
    pink = next(e for e in manifest["experts"] if e["slug"] == "pink-pop")
    tensors = load_file(artifacts_dir / pink["file"])  # the user's own retrain: other bytes than the hub's Pink Pop
    save_file({k: v * 1.01 for k, v in tensors.items()}, folder / "hot-pink.safetensors")
    (folder / "hot-pink.json").write_text(json.dumps({
        "name": "Hot Pink Local", "kind": "lora", "base_model": "miniworld-sd", "trigger_words": ["hot pink"],
        "description": "Hot pink and magenta objects."}))
    with ChatAgent(Settings(home=own_home, reference_prompts=4), llm=None) as agent:
        added = agent.send(f"add expert {folder / 'hot-pink.safetensors'}", "grow")
        assert "Hot Pink Local" in added.text and ": active" in added.text, added.text
        found = agent.send("search hot pink objects", "grow")
        assert "Hot Pink Local" in found.text
        status = agent.send("status", "grow")
        assert "23 experts (active 23)" in status.text, "adding one expert removed none of the others"
        copy = tmp_path / "copies" / "pink pop (1).safetensors"
        copy.parent.mkdir()
        shutil.copy(artifacts_dir / pink["file"], copy)  # the hub's own file: the same expert from another source
        merged = agent.send(f"add expert {copy}", "grow")
        assert re.search(r"removed \(the same file as (?:civitai:\d+|hf:\S+): one expert, another source\)", merged.text), merged.text
        missing = agent.send(f"add expert {tmp_path / 'nothing-here.safetensors'}", "grow")
        assert "neither an http(s) URL" in missing.text

        started = agent.send(f"start gca file:{folder} every 1h", "grow")
        assert "Background GCA started" in started.text
        again = agent.send("start gca", "grow")
        assert "already going" in again.text
        gca = agent.services.gca
        deadline = time.monotonic() + 120
        while gca.status()["passes"] < 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        stopped = agent.send("stop gca", "grow")
        assert "stop" in stopped.text
        gca._run.thread.join(timeout=120)
        assert not gca.running and gca.status()["passes"] == 1


def test_add_expert_by_model_page_url(own_home, artifacts_dir):
    """An expert gone from the graph comes back from its mini-world hub page URL (the hub's
    Civitai API for one model, its homepage read in Chromium, calibration)."""
    from diffgraph.graph_store.store import GraphStore
    from diffgraph.miniworld.hub import running_hub

    with GraphStore.open(own_home) as store:
        row = next(r for r in store.catalog.list_experts() if r.name == "Pink Pop")
        store.set_status(row.id, "removed", "test: gone")
    settings = Settings(home=own_home, reference_prompts=4, allowed_hosts=("127.0.0.1",))  # the hub's machine, listed
    with running_hub(artifacts_dir, port=0) as hub, ChatAgent(settings, llm=None) as agent:
        url = f"{hub.civitai_url}/models/{row.source_id}/pink-pop"
        reply = agent.send(f"add expert {url}", "url")
    assert "Pink Pop" in reply.text and ": active" in reply.text, reply.text
    with GraphStore.open(own_home) as store:
        assert store.catalog.get(row.id).status == "active"
        assert len(store.catalog.list_experts(status="active")) == 22


def test_terminal_chat_shows_image_paths_and_resumes(own_home):
    """`diffgraph chat` as a person runs it: lines on standard input, images under DIFFGRAPH_HOME."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "DIFFGRAPH_HOME": str(own_home), "COLUMNS": "200"}
    env.pop("DIFFGRAPH_LLM_BASE_URL", None)
    command = [sys.executable, "-m", "diffgraph.agents.cli", "chat", "--thread", "terminal"]
    first = subprocess.run(command, input="a pink circle on a striped white background\n/quit\n", env=env,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    paths = re.findall(r"image: (\S+\.png)", first.stdout)
    assert paths and all(p.startswith(str(own_home / "outputs" / "chat" / "terminal")) for p in paths), first.stdout
    assert "offline brain" in first.stdout and "Pink Pop" in first.stdout
    again = subprocess.run(command, input="another seed\n", env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming: 2 messages, 1 images" in again.stdout and "changed from image 1: another seed" in again.stdout


def test_a_generate_session_is_neither_offered_nor_allowed_the_tools_that_change_the_graph(home, tmp_path):
    """A "generate" user (a served UI's login without an admin key): the LLM is not offered
    add_expert or the graph-update tools, a call to one anyway (an LLM steered by a prompt) is an
    error the LLM reads and nothing is crawled, and the offline brain refuses the same commands
    in one line; the local CLI's "admin" role is offered all of them."""
    target = tmp_path / "never-crawled"
    llm = ScriptedLLM([tool_call("add_expert", {"location": str(target)}),
                       lambda body: text("The tool said: " + last_tool(body)),
                       tool_call("start_graph_updates", {"sources": [f"local:{target}"]}),
                       lambda body: text("The tool said: " + last_tool(body))])
    server = ScriptedOpenAI(default=llm)
    with running(server) as url, ChatAgent(llm_settings(home, url)) as agent:
        added = agent.send(f"add the expert at {target}", "visitor", role="generate")
        started = agent.send("keep the graph up to date", "visitor", role="generate")
        assert not agent.services.gca.running
    offered = {t["function"]["name"] for t in llm.chat_requests[0]["tools"]}
    assert "generate_image" in offered and not offered & {"add_expert", "start_graph_updates", "stop_graph_updates"}
    for reply in (added, started):
        assert "only an admin session may do" in reply.text, reply.text
    with ChatAgent(Settings(home=home), llm=None) as agent:
        for command in (f"add expert {target}", f"start gca local:{target}", "stop gca"):
            refused = agent.send(command, "visitor-offline", role="generate")
            assert refused.text.startswith("Sorry: adding experts and starting or stopping graph updates change the "
                                           "graph, which only an admin session may do"), refused.text
        allowed = agent.send(f"add expert {target}", "local")  # the CLI's role: admin
        assert "only an admin session" not in allowed.text and "neither an http(s) URL" in allowed.text, allowed.text
