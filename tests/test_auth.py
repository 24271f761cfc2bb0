"""A server one can expose (issue 18): API keys with two roles, over real HTTP and in Chromium.

- `diffgraph serve` on a non-loopback address without DIFFGRAPH_API_KEYS is refused in one line
  (unless --insecure-no-auth); a malformed key list is refused the same way, naming no key;
- with keys, every /v1 request needs `Authorization: Bearer KEY` (401 in OpenAI's error shape
  otherwise), a generate key renders, a flood from one key gets 429 with Retry-After, and a
  body over MAX_BODY is 413 whatever its Content-Length says;
- the web UI asks for a login; a generate session renders but cannot add experts, an admin
  session can.
"""

from __future__ import annotations

import ipaddress
import shutil
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from diffgraph.agents.auth import ApiKeys, AuthConfigError, is_loopback
from diffgraph.agents.server import MAX_BODY, ServeRefused, check_bind
from diffgraph.settings import Settings
from diffgraph.tools.sources import ForbiddenDestination, check_destination
from support.serving import serving

GENERATE, ADMIN = "gen-key-0123456789abcdef", "adm-key-0123456789abcdef"
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1"]
PROMPT = "a pink circle on a striped white background"


@pytest.fixture(scope="module")
def served(graph_home, tmp_path_factory):
    from diffgraph.agents.chat import ChatAgent
    from diffgraph.agents.server import create_app

    home = tmp_path_factory.mktemp("auth_home")
    shutil.copytree(graph_home, home, dirs_exist_ok=True)
    config = Settings(home=home, api_keys=f"{GENERATE}, {ADMIN}:admin", rate_limit=5)
    with ChatAgent(config, llm=None) as agent, serving(create_app(config, agent=agent, local=False)) as url:
        yield url


def _error(response: httpx.Response) -> str:
    message = response.json()["error"]["message"]
    assert "\n" not in message and len(message) < 300, message
    return message


def test_a_non_loopback_bind_needs_keys_or_the_insecure_flag():
    keys = ApiKeys.parse(f"{GENERATE},{ADMIN}:admin")
    for host in ("0.0.0.0", "192.168.1.20", "::", "my-gpu-box"):
        with pytest.raises(ServeRefused, match=f"refusing to serve on {host} without API keys"):
            check_bind(host, ApiKeys(), insecure_no_auth=False)
        check_bind(host, keys, insecure_no_auth=False)
        check_bind(host, ApiKeys(), insecure_no_auth=True)
    for host in ("127.0.0.1", "127.8.0.1", "::1", "localhost"):
        assert is_loopback(host)
        check_bind(host, ApiKeys(), insecure_no_auth=False)

    from diffgraph.agents.cli import app

    refused = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0"], env={"DIFFGRAPH_API_KEYS": "", "COLUMNS": "300"})
    assert refused.exit_code == 1 and "refusing to serve on 0.0.0.0 without API keys" in refused.output
    assert "--insecure-no-auth" in refused.output and "Traceback" not in refused.output
    bad = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0"], env={"DIFFGRAPH_API_KEYS": "short:admin"})
    assert bad.exit_code == 1 and "DIFFGRAPH_API_KEYS entry 1" in bad.output and "short" not in bad.output.replace(
        "DIFFGRAPH_API_KEYS entry 1", "")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_only_a_configured_key_has_a_role(guess):
    keys = ApiKeys.parse(f"{GENERATE},{ADMIN}:admin")
    expected = {GENERATE: "generate", ADMIN: "admin"}.get(guess)
    assert keys.role(guess) == expected
    assert keys.bearer_role(f"Bearer {guess}") == (expected if guess == guess.strip() else keys.role(guess.strip()))
    assert keys.bearer_role(guess) is None or guess.lower().startswith("bearer ")
    assert keys.login("admin", guess) == (expected == "admin")
    assert keys.login("generate", guess) == (expected is not None)


def test_key_lists_are_parsed_or_refused_without_showing_a_key():
    assert ApiKeys.parse("").roles == () and not ApiKeys.parse(" , ")
    assert ApiKeys.parse(f" {GENERATE} ,{ADMIN}:admin").roles == ((GENERATE, "generate"), (ADMIN, "admin"))
    for text in ("tooshort", f"{GENERATE},has space in it 0123456789", "a:b:c:0123456789abcdef"):
        with pytest.raises(AuthConfigError) as info:
            ApiKeys.parse(text)
        assert "DIFFGRAPH_API_KEYS entry" in str(info.value) and "0123456789" not in str(info.value)


def test_the_api_needs_a_key_limits_each_key_and_bounds_the_body(served):
    for headers in ({}, {"Authorization": "Bearer not-a-key-0123456789"}, {"Authorization": GENERATE},
                    {"Authorization": f"Basic {GENERATE}"}):
        response = httpx.get(f"{served}/v1/models", headers=headers, timeout=30)
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer", response.text
        assert response.json()["error"]["code"] == "invalid_api_key" and "Authorization: Bearer KEY" in _error(response)
    assert httpx.get(f"{served}/healthz", timeout=30).status_code == 200  # liveness stays open
    assert httpx.get(f"{served}/v1/openapi.json", timeout=30).status_code == 200

    auth = {"Authorization": f"Bearer {GENERATE}"}
    rendered = httpx.post(f"{served}/v1/images/generations", headers=auth, json={"prompt": PROMPT}, timeout=300)
    assert rendered.status_code == 200 and rendered.json()["data"][0]["url"], rendered.text
    huge = httpx.post(f"{served}/v1/images/generations", headers={**auth, "Content-Type": "application/json"},
                      content=b'{"prompt": "' + b"x" * MAX_BODY + b'"}', timeout=30)
    assert huge.status_code == 413 and "maximum is" in _error(huge)

    def chunks():
        yield b'{"prompt": "'
        for _ in range(MAX_BODY // 1024 + 2):
            yield b"y" * 1024
        yield b'"}'
    streamed = httpx.post(f"{served}/v1/images/generations", headers={**auth, "Content-Type": "application/json"},
                          content=chunks(), timeout=30)  # no Content-Length: chunked
    assert streamed.status_code == 413 and "over" in _error(streamed)

    admin = {"Authorization": f"Bearer {ADMIN}"}
    statuses = [httpx.get(f"{served}/v1/models", headers=admin, timeout=30) for _ in range(8)]
    codes = [r.status_code for r in statuses]
    assert codes[:5] == [200] * 5 and 429 in codes[5:], codes  # 5 a minute for this key
    limited = next(r for r in statuses if r.status_code == 429)
    assert int(limited.headers["retry-after"]) >= 1 and "at most 5 a minute" in _error(limited)


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"Debian's Chromium is not at {CHROMIUM}")
def test_the_ui_asks_for_a_login_and_only_an_admin_session_may_add_experts(served, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    target = tmp_path / "nothing-here.safetensors"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            for user, key, refused in (("generate", GENERATE, True), ("admin", ADMIN, False), ("admin", GENERATE, None)):
                context = browser.new_context()  # a browser of its own: no session cookie of another login
                page = context.new_page()
                page.goto(served + "/", wait_until="load")
                page.get_by_label("username").fill(user)
                page.get_by_label("password").fill(key)
                page.get_by_role("button", name="Login").click()
                if refused is None:  # a generate key does not log in as admin
                    expect(page.get_by_text("Incorrect Credentials")).to_be_visible(timeout=30_000)
                    context.close()
                    continue
                page.locator("#prompt textarea").fill(f"add expert {target}")
                page.locator("#send").click()
                chat = page.locator("#chat")
                if refused:
                    expect(chat).to_contain_text("only an admin session may do", timeout=60_000)
                else:
                    expect(chat).to_contain_text("neither an http(s) URL", timeout=60_000)
                    expect(chat).not_to_contain_text("only an admin session")
                context.close()
        finally:
            browser.close()


# ----------------------------------------------------------------------------- where fetches may go

INTERNAL = st.one_of(*(st.ip_addresses(network=n) for n in (
    "127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "100.64.0.0/10", "0.0.0.0/8",
    "::1/128", "fc00::/7", "fe80::/10", "224.0.0.0/4")), st.just(ipaddress.ip_address("fd00:ec2::254")))


@settings(max_examples=300, deadline=None)
@given(INTERNAL, st.sampled_from(["http", "https"]), st.integers(1, 65535))
def test_no_address_inside_the_network_is_fetched_unless_listed(address, scheme, port):
    host = f"[{address}]" if address.version == 6 else str(address)
    url = f"{scheme}://{host}:{port}/api/download/models/1"
    with pytest.raises(ForbiddenDestination, match="DIFFGRAPH_ALLOWED_HOSTS"):
        check_destination(url)
    check_destination(url, allowed=[str(address)])  # the user listed it
    mapped = f"{scheme}://[::ffff:{address}]/x" if address.version == 4 else None
    if mapped:
        with pytest.raises(ForbiddenDestination):
            check_destination(mapped)


@given(st.ip_addresses(v=4).filter(lambda a: a.is_global and not a.is_multicast))
def test_public_addresses_are_fetched(address):
    check_destination(f"https://{address}/models/1")


def test_a_listing_cannot_send_downloads_or_redirects_inside_the_network(tmp_path):
    """A hostile API answer naming the cloud metadata service as a download URL, or redirecting
    a download to another loopback address than the source's own: refused before any connection,
    in one line, the expert rejected; the source's own host still serves."""
    from support.fake_site import FakeSite

    from diffgraph.tools.sources import CivitaiSource, ContentStore, UnsafeFileError

    site = FakeSite()
    data = b"not even read"
    with serving(site.app) as url:
        site.url = url
        site.publish_civitai("meta.safetensors", data, url="http://169.254.169.254/latest/meta-data/")
        site.publish_civitai("hop.safetensors", data + b"2", url=f"{url}/dl/hop")
        site.redirects["/dl/hop"] = url.replace("127.0.0.1", "127.0.0.2") + "/files/1"
        source = CivitaiSource(url, token="")
        try:
            records = {r.files[0].name: r for r in source.iter_models()}
            for name, host in (("meta.safetensors", "169.254.169.254"), ("hop.safetensors", "127.0.0.2")):
                with pytest.raises(UnsafeFileError) as info:
                    source.download(records[name].files[0], ContentStore(tmp_path))
                assert f"{host} is not a public address" in str(info.value)
                assert "\n" not in str(info.value)
        finally:
            source.close()
    assert "/files/1" not in site.paths  # the redirect was never followed
    assert not list(tmp_path.rglob("*.partial"))


def test_the_chat_fetches_experts_only_from_known_hosts(graph_home, tmp_path):
    from diffgraph.agents.chat import ChatAgent

    home = tmp_path / "home"
    shutil.copytree(graph_home, home)
    with ChatAgent(Settings(home=home), llm=None) as agent:
        for url in ("http://169.254.169.254/models/1", "http://127.0.0.1:8080/models/1", "http://intranet/models/7"):
            reply = agent.send(f"add expert {url}", "ssrf")
            assert "is not a host this server fetches experts from (civitai.com, huggingface.co" in reply.text, reply.text
            assert "DIFFGRAPH_ALLOWED_HOSTS" in reply.text
