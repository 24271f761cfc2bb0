"""The one place that builds a chat model: langchain-openai's ChatOpenAI against any
OpenAI-compatible endpoint (OpenAI, vLLM, Ollama, llama.cpp server), or None when no endpoint
is configured, in which case every agent runs its offline brain and says so."""

from __future__ import annotations

from diffgraph.settings import Settings, get_settings


def chat_model(settings: Settings | None = None, temperature: float = 0.0):
    """ChatOpenAI for DIFFGRAPH_LLM_BASE_URL / _MODEL / _API_KEY, or None (offline brain)."""
    s = settings or get_settings()
    if not s.llm_base_url:
        return None
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        base_url=s.llm_base_url,
        model=s.llm_model or "gpt-4o-mini",
        api_key=s.llm_api_key or "not-needed",
        temperature=temperature,
        timeout=60,
        max_retries=2,
    )
