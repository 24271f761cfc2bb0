"""Which base a command or request works with: the one named (--base-model, the API's model,
DIFFGRAPH_BASE), else the graph's only base, else the only one installed; a choice that cannot
be made is one line saying how to make it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from diffgraph.agents.chat import ChatError, ChatServices
from diffgraph.agents.server import APIError, ImageAPI, _validate
from diffgraph.graph_store.records import ExpertRecord
from diffgraph.graph_store.store import GraphStore
from diffgraph.settings import get_settings
from diffgraph.tools.bases import AmbiguousBase, choose_base


def _home_with(tmp_path, bases: list[str]):
    home = tmp_path / "home"
    with GraphStore.open(home) as store:
        for i, base in enumerate(bases):
            record = ExpertRecord("local", f"/m/{i}.safetensors", f"v{i}", f"expert {i}", "lora", base)
            store.upsert_expert(record)
            store.set_status(record.id, "active")
        assert store.catalog.base_models() == sorted(set(bases))
    return home


def test_the_rule():
    assert choose_base(None, []) == "miniworld-sd"  # nothing else installed or held
    assert choose_base(None, ["miniworld-sd"]) == "miniworld-sd"
    assert choose_base("miniworld-sd", ["miniworld-sd", "sd15"]) == "miniworld-sd"
    with pytest.raises(AmbiguousBase) as exc:
        choose_base(None, ["sd15", "miniworld-sd"])
    assert str(exc.value) == ("the graph holds experts of 2 base models (miniworld-sd, sd15): choose one with "
                              "--base-model, the API's model field or DIFFGRAPH_BASE")
    with pytest.raises(KeyError, match="no base-model profile for 'no-such-base-9'"):
        choose_base("no-such-base-9", ["miniworld-sd"])


def test_services_and_api_choose_per_request_between_two_bases(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFGRAPH_HOME", str(_home_with(tmp_path, ["miniworld-sd", "sd15"])))
    monkeypatch.delenv("DIFFGRAPH_BASE", raising=False)
    monkeypatch.delenv("DIFFGRAPH_BASE_SD15", raising=False)
    services = ChatServices(get_settings())
    api = ImageAPI(services)
    try:
        assert sorted(api.models()) == ["miniworld-sd", "sd15"]
        with pytest.raises(KeyError, match="2 base models"):
            services.base_model
        with pytest.raises(ChatError, match="choose one with --base-model"):
            services.generate("a red circle")
        assert api.base_for("miniworld-sd") == "miniworld-sd"
        with pytest.raises(APIError) as refused:  # held by the graph, but its base weights are not configured
            api.base_for("sd15")
        assert refused.value.status == 400 and refused.value.param == "model"
        assert "set DIFFGRAPH_BASE_SD15" in refused.value.message and "\n" not in refused.value.message
        with pytest.raises(APIError, match="2 base models"):
            api.base_for(None)
    finally:
        services.close()

    monkeypatch.setenv("DIFFGRAPH_BASE", "miniworld-sd")
    services = ChatServices(get_settings())
    try:
        assert services.base_model == "miniworld-sd" and ImageAPI(services).base_for(None) == "miniworld-sd"
    finally:
        services.close()


@pytest.mark.parametrize("model, expected", [("dall-e-2", None), ("gpt-image-1", None), (None, None),
                                             ("miniworld-sd", "miniworld-sd")])
def test_openai_model_names_mean_the_servers_base(model, expected):
    body = {"prompt": "a cat", **({} if model is None else {"model": model})}
    assert _validate(body)["model"] == expected


def test_a_model_that_is_not_a_string_is_refused():
    with pytest.raises(APIError) as exc:
        _validate({"prompt": "a cat", "model": ["x"]})
    assert exc.value.param == "model"


def test_generate_on_an_ambiguous_graph_is_a_one_line_error(tmp_path):
    env = {**os.environ, "DIFFGRAPH_HOME": str(_home_with(tmp_path, ["miniworld-sd", "sd15"])), "COLUMNS": "300"}
    env.pop("DIFFGRAPH_BASE", None)
    run = subprocess.run([sys.executable, "-m", "diffgraph.agents.cli", "generate", "a red circle"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 1
    lines = [line for line in run.stdout.splitlines() if line.strip()]
    assert lines == ["error: the graph holds experts of 2 base models (miniworld-sd, sd15): choose one with "
                     "--base-model, the API's model field or DIFFGRAPH_BASE"], run.stdout + run.stderr


def test_background_crawls_default_to_the_sources_of_the_base_in_use(tmp_path, monkeypatch):
    """The mini world's base names its hub; a real base names none, so the user is asked for one."""
    monkeypatch.setenv("DIFFGRAPH_HOME", str(_home_with(tmp_path, ["sd15"])))
    weights = tmp_path / "v1-5.safetensors"
    weights.write_bytes(b"")  # a profile only needs the path to exist; nothing is loaded here
    monkeypatch.setenv("DIFFGRAPH_BASE_SD15", str(weights))
    services = ChatServices(get_settings())
    try:
        assert services.base_model == "sd15"
        with pytest.raises(ChatError) as exc:
            services.start_gca()
        assert str(exc.value).startswith("name the sources to crawl for sd15 (civitai, hf, local, url, file")
        assert "\n" not in str(exc.value) and not services.gca.running
    finally:
        services.close()
    from diffgraph.tools.bases import profile

    assert profile("miniworld-sd").sources == ("miniworld",)
    assert sys.modules.get("diffgraph.miniworld.plugin") is not None  # it came through the registry
