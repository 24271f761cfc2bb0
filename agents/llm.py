"""The one place that builds a chat model: langchain-openai's ChatOpenAI against any
OpenAI-compatible endpoint (OpenAI, vLLM, Ollama, llama.cpp server), or None when no endpoint
is configured, in which case every agent runs its offline brain and says so."""

from __future__ import annotations

from diffgraph.settings import Settings, get_settings


def chat_model(settings: Settings | None = None, temperature: float = 0.0):
    """ChatOpenAI for DIFFGRAPH_LLM_BASE_URL / _MODEL / _API_KEY, or None (offline brain); each
    request waits DIFFGRAPH_LLM_TIMEOUT seconds (a local model on a CPU can take minutes) and is
    retried DIFFGRAPH_LLM_RETRIES times before the offline brain answers instead."""
    s = settings or get_settings()
    if not s.llm_base_url:
        return None
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        base_url=s.llm_base_url,
        model=s.llm_model or "gpt-4o-mini",
        api_key=s.llm_api_key or "not-needed",
        temperature=temperature,
        timeout=s.llm_timeout,
        max_retries=s.llm_retries,
    )
