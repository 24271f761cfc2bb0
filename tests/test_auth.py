"""A server one can expose (issue 18): API keys with two roles, over real HTTP and in Chromium.

- `diffgraph serve` on a non-loopback address without DIFFGRAPH_API_KEYS is refused in one line
  (unless --insecure-no-auth); a malformed key list is refused the same way, naming no key;
- with keys, every /v1 request needs `Authorization: Bearer KEY` (401 in OpenAI's error shape
  otherwise), a generate key renders, a flood from one key gets 429 with Retry-After, and a
  body over MAX_BODY is 413 whatever its Content-Length says;
- the web UI asks for a login; a generate session renders but cannot add experts, an admin
  session can; its chat turns have the API's per-minute budget for each login and address (the
  turn over it is answered with the 429 line and never reaches the agent), and none without keys;
- every request, the UI's included, must name this server in its Host header (loopback, the bind
  address, DIFFGRAPH_SERVER_HOSTS; any name on every interface with keys), or 400: no page can
  rebind its own name to a loopback server whose UI user is an admin; and a browser's request
  from another site (Origin) is 403. The hostile names and origins are generated.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from diffgraph.agents.auth import ApiKeys, AuthConfigError, HostCheck, is_loopback
from diffgraph.agents.server import MAX_BODY, ServeRefused, check_bind
from diffgraph.settings import Settings, get_settings
from diffgraph.tools.sources import ForbiddenDestination, check_destination
from support.budget import budget
from support.serving import serving

GENERATE, ADMIN = "gen-key-0123456789abcdef", "adm-key-0123456789abcdef"
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1"]
PROMPT = "a pink circle on a striped white background"


LISTED = ("gpu-box.example", "10.9.8.7")  # DIFFGRAPH_SERVER_HOSTS of the `named` server


def _home(graph_home, tmp_path_factory, name: str) -> Path:
    home = tmp_path_factory.mktemp(name)
    shutil.copytree(graph_home, home, dirs_exist_ok=True)
    return home


@pytest.fixture(scope="module")
def served(graph_home, tmp_path_factory):
    """Keys, bound to every interface and no DIFFGRAPH_SERVER_HOSTS: any Host, the keys the gate."""
    from diffgraph.agents.chat import ChatAgent
    from diffgraph.agents.server import create_app

    config = Settings(home=_home(graph_home, tmp_path_factory, "auth_home"), api_keys=f"{GENERATE}, {ADMIN}:admin",
                      rate_limit=5)
    with ChatAgent(config, llm=None) as agent, serving(create_app(config, agent=agent, host="0.0.0.0")) as url:
        yield url


@pytest.fixture(scope="module")
def loopback(graph_home, tmp_path_factory):
    """Loopback without keys: the UI's user is an admin, the server no web page may drive. Its
    rate limit of 1 a minute limits nothing without keys."""
    from diffgraph.agents.chat import ChatAgent
    from diffgraph.agents.server import create_app

    config = Settings(home=_home(graph_home, tmp_path_factory, "loopback_home"), rate_limit=1)
    with ChatAgent(config, llm=None) as agent, serving(create_app(config, agent=agent, host="127.0.0.1")) as url:
        yield url, config.artifacts_dir


@pytest.fixture(scope="module")
def named(graph_home, tmp_path_factory):
    """Keys on every interface with DIFFGRAPH_SERVER_HOSTS (so only the names listed, and
    loopback's, are answered) and DIFFGRAPH_RATE_LIMIT=2, read from the environment as `serve`
    reads them; yields its URL and every message its agent was sent."""
    from diffgraph.agents.chat import ChatAgent
    from diffgraph.agents.server import create_app

    with pytest.MonkeyPatch.context() as env:
        for name, value in (("HOME", str(_home(graph_home, tmp_path_factory, "named_home"))),
                            ("API_KEYS", f"{GENERATE},{ADMIN}:admin"), ("RATE_LIMIT", "2"),
                            ("SERVER_HOSTS", " GPU-Box.example, 10.9.8.7 ,")):
            env.setenv(f"DIFFGRAPH_{name}", value)
        config = get_settings()
    assert config.server_hosts == LISTED and config.rate_limit == 2
    with ChatAgent(config, llm=None) as agent, serving(create_app(config, agent=agent, host="0.0.0.0")) as url:
        sent, send = [], agent.send

        def counted(message, *args, **kwargs):
            sent.append(message)
            return send(message, *args, **kwargs)

        agent.send = counted
        yield url, sent


def _error(response: httpx.Response) -> str:
    message = response.json()["error"]["message"]
    assert "\n" not in message and len(message) < 300, message
    return message


def _login(page, user: str, key: str) -> None:
    page.get_by_label("username").fill(user)
    page.get_by_label("password").fill(key)
    page.get_by_role("button", name="Login").click()


def _gradio_call(client: httpx.Client, api_name: str, data: list) -> list:
    """One event through Gradio's HTTP API (POST /gradio_api/call/NAME, then its result stream)."""
    event = client.post(f"/gradio_api/call/{api_name}", json={"data": data})
    assert event.status_code == 200, event.text
    lines = client.get(f"/gradio_api/call/{api_name}/{event.json()['event_id']}").text.splitlines()
    assert "event: complete" in lines, lines[:4]
    return json.loads(lines[lines.index("event: complete") + 1].removeprefix("data: "))


def _last_text(history: list) -> str:
    return history[-1]["content"][0]["text"]


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
                _login(page, user, key)
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


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"Debian's Chromium is not at {CHROMIUM}")
def test_ui_chat_turns_have_the_api_rate_limit_per_login_and_address(named):
    """DIFFGRAPH_RATE_LIMIT=2: an admin session's third turn within the minute is answered with
    the 429 line in the chat, its text kept in the box, and the agent never sees it; the base
    picker's turns count too (over HTTP, same login and address), a generate login has its own."""
    from playwright.sync_api import expect, sync_playwright

    url, sent = named
    before = len(sent)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page()
            page.goto(url + "/", wait_until="load")
            _login(page, "admin", ADMIN)
            box, chat = page.locator("#prompt textarea"), page.locator("#chat")
            for message in ("help", "status"):
                box.fill(message)
                page.locator("#send").click()
                expect(box).to_have_value("", timeout=60_000)  # answered: the box is cleared
            expect(chat).to_contain_text("I am the offline brain")
            box.fill("help")
            page.locator("#send").click()
            expect(chat).to_contain_text("too many requests: at most 2 a minute; retry in", timeout=60_000)
            expect(box).to_have_value("help")
        finally:
            browser.close()
    assert sent[before:] == ["help", "status"], sent[before:]

    with httpx.Client(base_url=url, timeout=60) as admin, httpx.Client(base_url=url, timeout=60) as generate:
        assert admin.post("/login", data={"username": "admin", "password": ADMIN}).status_code == 200
        assert generate.post("/login", data={"username": "generate", "password": GENERATE}).status_code == 200
        refused = _last_text(_gradio_call(admin, "pick_base", ["miniworld-sd", [], None])[0])
        assert refused.startswith("too many requests: at most 2 a minute; retry in"), refused
        assert sent[before:] == ["help", "status"], sent[before:]
        picked = _last_text(_gradio_call(generate, "pick_base", ["miniworld-sd", [], None])[0])
        assert "now renders with" in picked and sent[before:] == ["help", "status", "/base miniworld-sd"], picked


def test_without_keys_nothing_is_rate_limited(loopback):
    url, _ = loopback
    with httpx.Client(base_url=url, timeout=60) as client:
        for _ in range(3):  # its limit is 1 a minute
            assert client.get("/v1/models").status_code == 200
            assert "I am the offline brain" in _last_text(_gradio_call(client, "respond", ["help", [], None, []])[1])


# ----------------------------------------------------------------------------- the names a server answers to

_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,14}[a-z0-9])?", fullmatch=True)
_NAMES = st.builds(lambda labels, tld: ".".join([*labels, tld]), st.lists(_LABEL, min_size=1, max_size=3),
                   st.from_regex(r"[a-z]{2,8}", fullmatch=True)).filter(lambda name: name not in LISTED)
# a name of this server with something before or after it: another name, user info, a path
_CORES = st.sampled_from(["localhost", "127.0.0.1", "127.8.9.10", "[::1]", "0.0.0.0", *LISTED])
_BEFORE = st.sampled_from(["evil.", "evil-", "x", "0", "1", ".", "-", "_", "evil.example@", "user:pass@", "[", "%"])
_AFTER = st.sampled_from([".evil.example", "-evil", ".nip.io", "evil", "@evil.example", ":80@evil.example", "/", "/x",
                          "?x", "#x", " x", "..", ":x", ":7860.evil.example", "%2e", "\\x", "]", ":", "@"])
_LOOKALIKES = st.one_of(st.tuples(_BEFORE, _CORES, st.just("")), st.tuples(st.just(""), _CORES, _AFTER),
                        st.tuples(_BEFORE, _CORES, _AFTER)).map("".join)
_PORT = st.one_of(st.just(""), st.integers(1, 65535).map(lambda port: f":{port}"))


def _mixed_case(strategy):
    return strategy.flatmap(lambda text: st.lists(st.booleans(), min_size=len(text), max_size=len(text)).map(
        lambda upper: "".join(c.upper() if up else c for c, up in zip(text, upper))))


HOSTILE = _mixed_case(st.one_of(st.builds(str.__add__, _NAMES, _PORT), st.builds(str.__add__, _LOOKALIKES, _PORT)))
LOOPBACK = _mixed_case(st.builds(str.__add__, st.one_of(st.ip_addresses(network="127.0.0.0/8").map(str),
                                                        st.sampled_from(["localhost", "[::1]"])), _PORT))
NAMED = st.one_of(LOOPBACK, _mixed_case(st.builds(str.__add__, st.sampled_from([*LISTED, "0.0.0.0"]), _PORT)))
SCHEMES = st.sampled_from(["http", "https"])


def _refused(refusal, status: int) -> None:
    assert refusal is not None and refusal[0] == status, refusal
    assert "DIFFGRAPH_SERVER_HOSTS" in refusal[1] and "\n" not in refusal[1], refusal


@budget(300, 5000)
def test_only_a_host_naming_this_server_and_its_own_origin_are_answered(examples):
    """HostCheck alone: loopback at any port, the bind address and the listed names pass; other
    names, look-alikes and tricks are 400 as Host and 403 as Origin, in any case; with keys on
    every interface and no list any Host passes, but still no other site's Origin."""
    keys = ApiKeys.parse(f"{GENERATE},{ADMIN}:admin")
    listed = HostCheck.for_server("0.0.0.0", LISTED, keys)
    checks = [listed, HostCheck.for_server("127.0.0.1", (), ApiKeys()),
              HostCheck.for_server("::", (), ApiKeys())]  # --insecure-no-auth: no keys, so the check applies
    open_ = HostCheck.for_server("0.0.0.0", (), keys)

    @settings(max_examples=examples, deadline=None)
    @given(HOSTILE, LOOPBACK, NAMED, SCHEMES)
    def run(hostile, loopback, name, scheme):
        for check in checks:
            _refused(check.refusal(hostile, None), 400)
            _refused(check.refusal(hostile, f"{scheme}://{hostile}"), 400)  # its own origin does not make it ours
            assert check.refusal(loopback, None) is None
            assert check.refusal(loopback, f"{scheme}://{loopback}") is None
            _refused(check.refusal(loopback, f"{scheme}://{hostile}"), 403)
        assert listed.refusal(name, None) is None and listed.refusal("127.0.0.1:7860", f"{scheme}://{name}") is None
        assert open_.refusal(hostile, None) is None  # the keys are the gate
        assert open_.refusal(hostile, f"{scheme}://{hostile}") is None  # a page of the name it reached us by
        _refused(open_.refusal("192.168.1.20:7860", f"{scheme}://{hostile}"), 403)

    run()
    for check in (*checks, open_):
        _refused(check.refusal("127.0.0.1:7860", "null"), 403)  # a sandboxed or file:// page
        _refused(check.refusal("127.0.0.1:7860", "ftp://127.0.0.1"), 403)
    for check in checks:
        _refused(check.refusal(None, None), 400)
    assert HostCheck.for_server("192.168.1.20", (), keys).refusal("evil.example", None) is not None  # one address
    assert HostCheck.for_server("my-gpu-box", (), keys).refusal("MY-GPU-BOX:7860", None) is None


# What a page's requests can reach: the UI, Gradio's API (config, info, queue, direct calls, login) and /v1.
PATHS = [("GET", "/"), ("GET", "/config"), ("GET", "/gradio_api/info"), ("POST", "/gradio_api/queue/join"),
         ("POST", "/gradio_api/call/respond"), ("POST", "/login"), ("GET", "/v1/models"),
         ("POST", "/v1/images/generations"), ("GET", "/healthz")]


def _invalid_host(response: httpx.Response, host: str) -> None:
    assert response.status_code == 400, (host, response.request.url.path, response.status_code, response.text[:200])
    assert response.json()["error"]["code"] == "invalid_host" and "DIFFGRAPH_SERVER_HOSTS" in _error(response)


def _refused_on_every_path(client: httpx.Client, hostile: str) -> None:
    """Every path of PATHS, asked with ``Host: hostile``, is the one-line 400."""
    for method, path in PATHS:
        _invalid_host(client.request(method, path, headers={"Host": hostile}, json={"prompt": PROMPT}), hostile)


@budget(25, 400)
def test_no_page_can_rebind_its_name_to_a_loopback_server(loopback, examples):
    """Bound to loopback without keys (its UI user an admin): every path answers 400 to a Host
    that is not loopback's, and serves loopback's at any port and in any case."""
    url, _ = loopback
    with httpx.Client(base_url=url, timeout=30) as client:
        @settings(max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(HOSTILE, LOOPBACK)
        def run(hostile, name):
            _refused_on_every_path(client, hostile)
            for path in ("/", "/config", "/v1/models"):
                assert client.get(path, headers={"Host": name}).status_code == 200, (name, path)

        run()


@budget(10, 200)
def test_a_server_answers_the_names_DIFFGRAPH_SERVER_HOSTS_lists_and_no_other(named, examples):
    url, _ = named
    with httpx.Client(base_url=url, timeout=30) as client:
        @settings(max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(HOSTILE, NAMED)
        def run(hostile, name):
            _refused_on_every_path(client, hostile)
            assert client.get("/", headers={"Host": name}).status_code == 200, name  # the login page
            models = client.get("/v1/models", headers={"Host": name})
            assert models.status_code == 401, (name, models.text)  # past the Host, at the keys

        run()


def test_keys_on_every_interface_answer_any_host_but_no_other_site(served):
    auth = {"Authorization": f"Bearer {GENERATE}"}
    for host in ("evil.example", "192.168.1.20:7860", "my-gpu-box"):
        assert httpx.get(f"{served}/", headers={"Host": host}, timeout=30).status_code == 200, host
        assert httpx.get(f"{served}/v1/models", headers={"Host": host}, timeout=30).status_code == 401, host
    for host in ("192.168.1.20:7860", "my-gpu-box"):
        crossed = httpx.post(f"{served}/v1/images/generations", json={"prompt": PROMPT}, timeout=30,
                             headers={**auth, "Host": host, "Origin": "https://evil.example"})
        assert crossed.status_code == 403 and crossed.json()["error"]["code"] == "cross_site_request", crossed.text
        assert "cross-site request refused" in _error(crossed)
        own = httpx.get(f"{served}/v1/models", headers={"Host": host, "Origin": f"http://{host}"}, timeout=30)
        assert own.status_code == 401, own.text  # its own page: on to the keys


@budget(20, 300)
def test_no_page_of_another_site_can_post_to_the_server(loopback, examples):
    """Origin of any other site: 403 for an image request, Gradio's queue and login, and nothing
    rendered; the server's own pages (and loopback's at another port) are answered."""
    url, artifacts = loopback
    with httpx.Client(base_url=url, timeout=300) as client:
        config = client.get("/config").json()
        fn = next(d["id"] for d in config["dependencies"] if d["api_name"] == "pick_base")
        join = {"data": [None, [], None], "fn_index": fn, "session_hash": "cross-site-test"}
        posts = [("/v1/images/generations", {"prompt": PROMPT}), ("/gradio_api/queue/join", join),
                 ("/gradio_api/call/respond", {"data": ["help", [], None, []]}), ("/login", {})]
        images = sorted(artifacts.rglob("*.png"))

        @settings(max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(HOSTILE, SCHEMES)
        def run(hostile, scheme):
            for path, body in posts:
                response = client.post(path, json=body, headers={"Origin": f"{scheme}://{hostile}"})
                assert response.status_code == 403, (hostile, path, response.status_code, response.text[:200])
                assert response.json()["error"]["code"] == "cross_site_request" and "DIFFGRAPH_SERVER_HOSTS" in _error(response)

        run()
        assert sorted(artifacts.rglob("*.png")) == images  # nothing was rendered
        port = urlsplit(url).port
        for origin in (url, f"http://localhost:{port}", f"http://localhost:{port + 1}"):
            rendered = client.post("/v1/images/generations", json={"prompt": PROMPT}, headers={"Origin": origin})
            assert rendered.status_code == 200 and rendered.json()["data"][0]["url"], rendered.text
            joined = client.post("/gradio_api/queue/join", json=join, headers={"Origin": origin})
            assert joined.status_code == 200 and joined.json()["event_id"], joined.text


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
