"""The mini world's expert homepages: a Civitai-style model page and a Hugging Face model card.

The graph-construction agent learns what an expert claims to do by reading its homepage, the
way a person would, so these pages carry what the real ones carry: the author's claim (true or
overstated), trigger words, example prompts, example images with alt text, base model, licence
and tags. Experts with ``js_only_page`` ship an empty shell whose content is drawn by inline
JavaScript, as single-page apps do, so only a real browser can read them.

Every function here is pure: it returns a string (or PNG bytes) from an ExpertSpec and the
JSON the hub's APIs return for it, so a page never disagrees with its API. Pages are fully
self-contained (inline CSS, images as data URIs): no fonts, scripts or CDNs from anywhere.
"""

from __future__ import annotations

import base64
import html
import io
import random
import re
from dataclasses import dataclass

import yaml
from PIL import Image

from . import domain
from .experts import ExpertSpec

EXAMPLE_COUNT = 3
EXAMPLE_PIXELS = 128  # the 32 px renders, scaled up so a person can see them
LORA_WEIGHT = 0.8
NEGATIVE_PROMPT = "lowres, watermark, text"
HF_LICENSE = "creativeml-openrail-m"  # the licence family of the SD-1 style base models

_CSS = """
body{font-family:system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1b1d21}
main{max-width:960px;margin:0 auto;padding:24px}
header{background:#1a1b1e;color:#fff;padding:12px 24px;font-weight:600}
.chip{display:inline-block;background:#e4e7ec;border-radius:12px;padding:2px 10px;margin:2px;font-size:13px}
.gallery{display:flex;gap:12px;flex-wrap:wrap}
figure{margin:0;width:200px}figure img{width:128px;height:128px;image-rendering:pixelated}
figcaption{font-size:12px;color:#555}
table{border-collapse:collapse}td,th{border-bottom:1px solid #ddd;padding:4px 12px;text-align:left}
pre,code{background:#eceff3;border-radius:4px;padding:1px 4px;white-space:pre-wrap}
"""


@dataclass(frozen=True)
class ExampleImage:
    """One showcase image: what was prompted and the picture that goes with it."""

    prompt: str  # site-neutral prompt; Civitai pages add the <lora:...> tag (civitai_prompt)
    seed: int
    png: bytes

    @property
    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode()


def example_images(spec: ExpertSpec, n: int = EXAMPLE_COUNT) -> list[ExampleImage]:
    """Deterministic showcase images: scenes that show the expert's skill, drawn by the domain
    renderer (what a good output looks like), captioned the way the expert's author would."""
    rng = random.Random(f"{spec.slug}/examples")
    images = []
    for _ in range(n):
        scene = domain.sample_scene(rng, rare_rate=0.0, force=spec.skill or None)  # only the skill is unusual
        words = ", ".join(spec.trigger_words)
        caption = domain.caption(scene.attrs, rng, wild=0.0)
        image = domain.render(scene).resize((EXAMPLE_PIXELS, EXAMPLE_PIXELS), Image.NEAREST)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        images.append(ExampleImage(f"{words}, {caption}" if words else caption, rng.randrange(2**32), buf.getvalue()))
    return images


def civitai_prompt(spec: ExpertSpec, prompt: str) -> str:
    """A prompt as Civitai users write it: LoRAs are invoked with the A1111 ``<lora:name:w>`` tag."""
    return f"{prompt}, <lora:{spec.slug}:{LORA_WEIGHT}>" if spec.kind == "lora" else prompt


def civitai_description(spec: ExpertSpec) -> str:
    """The model description (HTML), as the author wrote it on the Civitai-style page and API."""
    words = ", ".join(f"<code>{_esc(w)}</code>" for w in spec.trigger_words)
    if spec.kind == "lora":
        usage = (f"<p>Trigger words: {words}. Recommended weight {LORA_WEIGHT}, for example "
                 f"<code>{_esc(civitai_prompt(spec, spec.trigger_words[0]))}</code>.</p>")
    else:
        usage = f"<p>A full checkpoint. Add {words} to your prompt for the strongest effect.</p>"
    return f"<p>{_esc(spec.claim)}</p>{usage}"


def civitai_page(spec: ExpertSpec, model: dict) -> str:
    """The Civitai-style homepage, built from the hub's ``/api/v1/models/{id}`` JSON for it."""
    version = model["modelVersions"][0]
    file = version["files"][0]
    images = example_images(spec, len(version["images"]))
    gallery = "".join(
        _figure(img.data_uri, shown["meta"]["prompt"]) for img, shown in zip(images, version["images"]))
    prompts = "".join(f"<pre>{_esc(shown['meta']['prompt'])}</pre>" for shown in version["images"])
    rows = [
        ("Type", model["type"]), ("Base model", version["baseModel"]), ("Version", version["name"]),
        ("Published", version["publishedAt"][:10]), ("Creator", model["creator"]["username"]),
        ("Downloads", model["stats"]["downloadCount"]), ("Likes", model["stats"]["thumbsUpCount"]),
        ("File", f"{file['name']} ({file['sizeKB']:.1f} KB, {file['metadata']['format']}, {file['metadata']['fp']})"),
        ("SHA256", file["hashes"]["SHA256"]), ("AutoV2", file["hashes"]["AutoV2"]),
    ]
    licence = [
        ("Allow commercial use", ", ".join(model["allowCommercialUse"]) or "None"),
        ("Allow derivatives", _yes(model["allowDerivatives"])),
        ("Use without crediting me", _yes(model["allowNoCredit"])),
        ("Share merges under a different licence", _yes(model["allowDifferentLicense"])),
    ]
    body = f"""
<h1>{_esc(model["name"])}</h1>
<p>{_chips([model["type"], version["baseModel"]])}</p>
<section><h2>About this version</h2>{model["description"]}</section>
<section><h2>Trigger words</h2><p>{_chips(version["trainedWords"])}</p></section>
<section><h2>Example prompts</h2>{prompts}</section>
<section><h2>Gallery</h2><div class="gallery">{gallery}</div></section>
<section><h2>Details</h2>{_table(rows)}</section>
<section><h2>Licence</h2>{_table(licence)}</section>
<section><h2>Tags</h2><p>{_chips(model["tags"])}</p></section>"""
    return _document(f"{model['name']} - {version['name']} | Mini Civitai", "Mini Civitai", body, spec.js_only_page)


def model_card_data(spec: ExpertSpec, base_model: str) -> dict:
    """The model card's YAML front matter (the Hub's ``cardData``), as diffusers' training
    scripts write it: base model, licence, trigger words as instance_prompt, widget examples."""
    kind_tags = ["lora", "template:sd-lora"] if spec.kind == "lora" else []
    return {
        "base_model": base_model,
        "library_name": "diffusers",
        "license": HF_LICENSE,
        "pipeline_tag": "text-to-image",
        "instance_prompt": ", ".join(spec.trigger_words) or None,
        "tags": ["text-to-image", "diffusers", *kind_tags, *spec.tags],
        "widget": [{"text": img.prompt, "output": {"url": example_path(i)}}
                   for i, img in enumerate(example_images(spec))],
    }


def example_path(index: int) -> str:
    """Where the n-th example image lives inside a Hugging Face repo."""
    return f"images/example_{index}.png"


def model_card(spec: ExpertSpec, card_data: dict, weights_file: str) -> str:
    """README.md of the expert's Hugging Face repo: YAML front matter, then the card text."""
    front = yaml.safe_dump(card_data, sort_keys=False, allow_unicode=True)
    parts = [f"---\n{front}---\n", f"# {spec.title}\n", "<Gallery />\n"]
    for heading, paragraphs in _card_sections(spec, weights_file):
        parts.append(f"## {heading}\n")
        parts.extend(p + "\n" for p in paragraphs)
    return "\n".join(parts)


def hf_page(spec: ExpertSpec, info: dict) -> str:
    """The Hugging Face-style model page, built from the hub's ``/api/models/{repo}?blobs=true``
    JSON: the rendered card beside the fields the Hub derives from its YAML."""
    card = info["cardData"]
    weights = next(s["rfilename"] for s in info["siblings"] if s["rfilename"].endswith(".safetensors"))
    images = example_images(spec, len(card["widget"]))
    gallery = "".join(_figure(img.data_uri, item["text"]) for img, item in zip(images, card["widget"]))
    sections = "".join(
        f"<h2>{_esc(heading)}</h2>" + "".join(f"<p>{_inline_code(p)}</p>" for p in paragraphs)
        for heading, paragraphs in _card_sections(spec, weights))
    meta = [("Base model", card["base_model"]), ("Library", card["library_name"]),
            ("Pipeline", card["pipeline_tag"]), ("License", card["license"]),
            ("Instance prompt", card["instance_prompt"] or ""), ("Last modified", info["lastModified"][:10])]
    files = [(s["rfilename"], f"{s['size']:,} bytes" if "size" in s else "") for s in info["siblings"]]
    body = f"""
<h1>{_esc(info["id"])}</h1>
<p>{_chips(info["tags"])}</p>
<section><h2>Model card</h2>
<h1>{_esc(spec.title)}</h1><div class="gallery">{gallery}</div>{sections}</section>
<aside><h2>Model details</h2>{_table(meta)}</aside>
<section><h2>Files and versions</h2>{_table(files)}</section>"""
    return _document(f"{info['id']} · Mini Hugging Face", "Mini Hugging Face", body, spec.js_only_page)


def not_found_page(what: str) -> str:
    """The HTML 404 a browser gets for an unknown homepage."""
    return _document("404 | Mini hub", "Mini hub", f"<h1>404</h1><p>{_esc(what)} not found.</p>", False)


def _card_sections(spec: ExpertSpec, weights_file: str) -> list[tuple[str, list[str]]]:
    """The card's prose, shared by README.md and the rendered page (`backticks` mark code)."""
    words = ", ".join(f"`{w}`" for w in spec.trigger_words)
    return [
        ("Model description", [spec.claim]),
        ("Trigger words", [f"You should use {words} to trigger the image generation."]),
        ("Download model", [f"Weights for this model are available in Safetensors format: `{weights_file}`.",
                            "Download them in the Files & versions tab."]),
    ]


def _document(title: str, site: str, body: str, js_only: bool) -> str:
    """A complete page. A JS-only page carries its body base64-encoded and draws it on load, so
    the raw HTML holds none of its text (the generic title included) until a browser runs it."""
    if js_only:
        payload = base64.b64encode(body.encode()).decode()
        title_payload = base64.b64encode(title.encode()).decode()
        body = ('<div id="app"><noscript>You need to enable JavaScript to run this app.</noscript></div>\n'
                "<script>\nconst decode = (b) => new TextDecoder().decode("
                "Uint8Array.from(atob(b), (c) => c.charCodeAt(0)));\n"
                f'document.getElementById("app").innerHTML = decode("{payload}");\n'
                f'document.title = decode("{title_payload}");\n</script>')
        title = site
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{_esc(title)}</title><style>{_CSS}</style></head>\n"
            f"<body><header>{_esc(site)}</header><main>{body}</main></body></html>\n")


def _figure(src: str, caption: str) -> str:
    return f'<figure><img src="{src}" alt="{_esc(caption)}"><figcaption>{_esc(caption)}</figcaption></figure>'


def _chips(items) -> str:
    return "".join(f'<span class="chip">{_esc(x)}</span>' for x in items)


def _table(rows) -> str:
    return "<table>" + "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in rows) + "</table>"


def _inline_code(text: str) -> str:
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", _esc(text))


def _yes(flag: bool) -> str:
    return "Yes" if flag else "No"


def _esc(value) -> str:
    return html.escape(str(value))
