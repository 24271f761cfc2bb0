"""The real metric suite on tiny random-weight models of the real architectures.

Every model is built with the class its real checkpoint comes from (or a line-by-line
transcription of it where that class cannot be installed here), shrunk through its config, and
saved with the real file names, key layouts and folder layouts: Hub-repo folders under a
weights dir, one model in a Hugging Face cache, single files flat. RealSuite then loads them
from disk like the real weights. Where the real class is available the scores are also checked
against it: HPSv2 against open_clip's own ``CLIP`` (run in a subprocess, see
support/tiny_metrics.py), and
ImageReward against a transcription of BLIP's ViT plus the text encoder run without padding.
No mocks; nothing touches the network.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from diffgraph.tools.scoring import get_suite  # noqa: E402
from diffgraph.tools.scoring import preprocess  # noqa: E402
from diffgraph.tools.scoring.real import METRICS, MissingMetricWeights, RealSuite, UnsafeWeightsError  # noqa: E402
from support.tiny_metrics import build_metric_weights, images_for_scoring  # noqa: E402

PROMPTS = ["a red cube on a wooden table", "a watercolor painting of a lighthouse at dusk",
           "portrait of an old sailor, studio lighting"]
OTHER_PROMPTS = ["a green sphere floating in space", "pixel art of a castle", "a bowl of ramen, top view"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A weights dir and an HF cache laid out like the real downloads, holding tiny models."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("real_metrics")
    images = images_for_scoring()
    built = build_metric_weights(root, images, PROMPTS, OTHER_PROMPTS)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HOME", str(built["hf_home"]))
        mp.delenv("HF_HUB_CACHE", raising=False)
        mp.delenv("DIFFGRAPH_METRICS_DIR", raising=False)
        suite = RealSuite(weights_dir=built["wd"], device="cpu")
        yield dict(root=root, suite=suite, images=images, **built)


# ----------------------------------------------------------------------------- tests

def test_scores_have_the_suite_shape_and_are_finite_and_deterministic(world):
    suite, images = world["suite"], world["images"]
    assert suite.names == METRICS
    v1 = suite.score(images, PROMPTS)
    assert len(v1) == len(images) and all(len(v) == len(METRICS) for v in v1)
    assert all(math.isfinite(x) for v in v1 for x in v)
    assert suite.score(images, PROMPTS) == v1  # same inputs, same numbers
    one_by_one = [x for im, p in zip(images, PROMPTS) for x in suite.score([im], [p])[0]]
    assert one_by_one == pytest.approx([x for v in v1 for x in v], rel=1e-5, abs=1e-5)  # batching-independent
    # a second suite loaded from the same files agrees
    other = RealSuite(weights_dir=world["wd"], device="cpu", metrics=("hps_v2", "image_reward"))
    assert other.score(images, PROMPTS) == [[v[4], v[1]] for v in v1]
    assert all(math.isfinite(suite.reward(v)) for v in v1)


def test_prompts_change_text_metrics_and_not_the_aesthetic_score(world):
    suite, images = world["suite"], world["images"]
    a, b = suite.score(images, PROMPTS), suite.score(images, OTHER_PROMPTS)
    col = {m: i for i, m in enumerate(suite.names)}
    for m in ("image_reward", "pick_score", "hps_v2"):
        assert all(x[col[m]] != y[col[m]] for x, y in zip(a, b)), m
    # CLIP Score clamps negative cosines to 0, so compare the cosines themselves
    tower = suite._clip_l()
    assert not torch.allclose(tower.cosine(images, PROMPTS), tower.cosine(images, OTHER_PROMPTS))
    assert [x[col["aesthetic"]] for x in a] == [y[col["aesthetic"]] for y in b]
    # and images matter too
    assert suite.score(images[:1] * 3, PROMPTS) != a


def test_hps_matches_open_clip_itself(world):
    """HPSv2 through the open_clip -> CLIPModel key mapping equals open_clip's own CLIP fed by
    open_clip's own tokenizer (pixels come from our HPSv2 preprocessing: torchvision is absent)."""
    suite, images = world["suite"], world["images"]
    i = suite.names.index("hps_v2")
    ours = torch.tensor([v[i] for v in suite.score(images, PROMPTS)])
    ours2 = torch.tensor([v[i] for v in suite.score(images, OTHER_PROMPTS)])
    assert torch.allclose(ours, world["hps_ref"]["hps"].float(), atol=1e-4), (ours, world["hps_ref"]["hps"])
    assert torch.allclose(ours2, world["hps_ref"]["hps2"].float(), atol=1e-4)
    # and our CLIP tokenizer (built from open_clip's BPE table) gives open_clip's token ids
    # up to the end token (open_clip pads with 0, we pad with the end token; the text tower is
    # causal and pools at the first end token, so padding cannot matter)
    theirs = world["hps_ref"]["ids"]
    mine = preprocess.clip_token_ids(suite._scorer("hps_v2").tokenizer, PROMPTS)
    for a, b in zip(mine.tolist(), theirs.tolist()):
        end = b.index(49407) + 1
        assert a[:end] == b[:end] and not any(b[end:])


def test_image_reward_matches_blip_reference(world):
    """ImageReward through BlipVisionModel/BlipTextModel equals BLIP's ViT + text encoder,
    with the prompt padded to 35 tokens in the suite and unpadded in the reference."""
    suite, images, ir = world["suite"], world["images"], world["ir"]
    i = suite.names.index("image_reward")
    ours = [v[i] for v in suite.score(images, PROMPTS)]
    tok = preprocess.bert_tokenizer(world["wd"] / "bert-base-uncased")
    pix = preprocess.batch(images, "openai_clip", 64)
    for k, prompt in enumerate(PROMPTS):
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        ref = ir.reward(pix[k:k + 1], ids)
        assert ours[k] == pytest.approx(float(ref), abs=1e-4)


def test_clip_aesthetic_and_pickscore_follow_their_definitions(world):
    from transformers import CLIPModel

    suite, images, wd = world["suite"], world["images"], world["wd"]
    vec = suite.score(images, PROMPTS)
    col = {m: i for i, m in enumerate(suite.names)}
    clip = CLIPModel.from_pretrained(str(wd / "openai/clip-vit-large-patch14")).eval()
    pix = preprocess.batch(images, "openai_clip", 56)
    ids = preprocess.clip_token_ids(world["clip_tok"], PROMPTS)
    with torch.no_grad():
        img = nn.functional.normalize(clip.visual_projection(clip.vision_model(pixel_values=pix).pooler_output), dim=-1)
        txt = nn.functional.normalize(clip.text_projection(clip.text_model(input_ids=ids).pooler_output), dim=-1)
        clip_score = 100 * (img * txt).sum(-1).clamp(min=0)
        aesthetic = world["aesthetic"].eval()(img).squeeze(-1)
    assert [v[col["clip_score"]] for v in vec] == pytest.approx(clip_score.tolist(), abs=1e-3)
    assert [v[col["aesthetic"]] for v in vec] == pytest.approx(aesthetic.tolist(), abs=1e-4)
    snap = world["hf_home"] / "hub/models--yuvalkirstain--PickScore_v1/snapshots/0123456789abcdef"
    pick = CLIPModel.from_pretrained(str(snap)).eval()
    with torch.no_grad():
        img = nn.functional.normalize(pick.get_image_features(pixel_values=preprocess.batch(images, "hf_clip", 56)).pooler_output, dim=-1)
        txt = nn.functional.normalize(pick.get_text_features(input_ids=ids).pooler_output, dim=-1)
        expected = pick.logit_scale.exp() * (img * txt).sum(-1)
    assert [v[col["pick_score"]] for v in vec] == pytest.approx(expected.tolist(), abs=1e-3)


def test_reward_is_the_documented_weighted_z_score(world):
    suite = RealSuite(weights_dir=world["wd"], device="cpu", metrics=("aesthetic", "hps_v2"), lazy=True,
                      reward_weights={"aesthetic": 1.0, "hps_v2": 3.0},
                      reward_stats={"aesthetic": (5.0, 2.0), "hps_v2": (0.2, 0.05)})
    assert suite.reward([7.0, 0.3]) == pytest.approx((1.0 * 1.0 + 3.0 * 2.0) / 4.0)
    stats = suite.fit_reward_stats([[1.0, 0.1], [3.0, 0.3]])
    assert stats["aesthetic"] == pytest.approx((2.0, math.sqrt(2.0)))
    assert suite.reward([2.0, 0.2]) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        suite.reward([1.0])


def test_get_suite_builds_the_real_suite(world):
    suite = get_suite("real", weights_dir=world["wd"], metrics=("aesthetic",), device="cpu")
    assert suite.names == ("aesthetic",)
    assert len(suite.score(world["images"][:2], PROMPTS[:2])) == 2


def test_missing_weights_raise_one_error_naming_them(world, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("DIFFGRAPH_METRICS_DIR", raising=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MissingMetricWeights) as err:
        RealSuite(weights_dir=empty, device="cpu")
    msg = str(err.value)
    assert set(err.value.missing) == set(METRICS)
    for needle in ("openai/clip-vit-large-patch14", "config.json", "model.safetensors", "ImageReward.pt",
                   "THUDM/ImageReward", "sac+logos+ava1-l14-linearMSE.pth", "yuvalkirstain/PickScore_v1",
                   "HPS_v2.1_compressed.pt", "xswu/HPSv2", str(empty), str(tmp_path / "empty_hf" / "hub")):
        assert needle in msg, needle
    assert "downloaded" in msg

    # only what is actually missing is named: copy the full layout without ImageReward.pt
    partial = tmp_path / "partial"
    shutil.copytree(world["wd"], partial)
    (partial / "THUDM/ImageReward/ImageReward.pt").unlink()
    monkeypatch.setenv("HF_HOME", str(world["hf_home"]))
    with pytest.raises(MissingMetricWeights) as err:
        RealSuite(weights_dir=partial, device="cpu", lazy=True)
    assert list(err.value.missing) == ["image_reward"]
    assert "ImageReward.pt" in str(err.value) and "HPS_v2" not in str(err.value)

    # without the packaged-vocab fallback, a missing bert-base-uncased is named too
    shutil.rmtree(partial / "bert-base-uncased")
    with pytest.raises(MissingMetricWeights) as err:
        RealSuite(weights_dir=partial, device="cpu", metrics=("image_reward",), lazy=True, bert_fallback=False)
    assert "bert-base-uncased" in str(err.value) and "vocab.txt" in str(err.value)

    # DIFFGRAPH_METRICS_DIR is the default weights dir
    monkeypatch.setenv("DIFFGRAPH_METRICS_DIR", str(world["wd"]))
    assert RealSuite(metrics=("hps_v2",), lazy=True).weights_dir == world["wd"]


class _Payload:
    """A pickle that writes a marker file when unpickled without weights_only."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('executed')",))


def test_pickle_that_would_run_code_is_refused_and_never_executed(world, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf"))
    wd = tmp_path / "wd"
    (wd / "THUDM/ImageReward").mkdir(parents=True)
    shutil.copytree(world["wd"] / "bert-base-uncased", wd / "bert-base-uncased")
    marker = tmp_path / "pwned"
    evil = wd / "THUDM/ImageReward/ImageReward.pt"
    torch.save({"blip.visual_encoder.cls_token": _Payload(marker)}, evil)
    with pytest.raises(UnsafeWeightsError) as err:
        RealSuite(weights_dir=wd, device="cpu", metrics=("image_reward",))
    assert str(evil) in str(err.value)
    assert not marker.exists()
    # the same payload through a plain unpickle does run: the refusal above is what stopped it
    evil_aesthetic = wd / "sac+logos+ava1-l14-linearMSE.pth"
    shutil.copytree(world["wd"] / "openai", wd / "openai")
    torch.save(_Payload(marker), evil_aesthetic)
    with pytest.raises(UnsafeWeightsError):
        RealSuite(weights_dir=wd, device="cpu", metrics=("aesthetic",))
    assert not marker.exists()
    torch.load(evil_aesthetic, weights_only=False)
    assert marker.read_text() == "executed"
