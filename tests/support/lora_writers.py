"""LoRA files in the namings of the wild, written from a known ground truth.

Each writer returns a ``Written``: the state dict (or the path of what it saved), and the
delta every targeted module must receive, computed by the naive arithmetic of its format
(LoRA: (alpha/rank) B @ A; LoHa: (w1a w1b) * (w2a w2b) alpha/rank; LoKr: kron(w1, w2) alpha/rank;
LoCon with a Tucker core: up ∘ mid ∘ down). The LoRA factors come from a PEFT ``LoraConfig``
injected into a copy of the real module tree, so targets, shapes and conv kernels are PEFT's.
The LDM block names are written from the original LDM UNet layout (input_blocks: conv_in, then
per level ``layers_per_block`` x [resnet, attention] and a downsampler; output_blocks:
``layers_per_block + 1`` per level, upsampler last), independently of ``merger.lora_formats``.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

SD_ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
SD_CONV = ["conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv"]
FLUX_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "proj_out",
                "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
                "norm1_context.linear", "norm.linear"]


@dataclass
class Written:
    state: dict[str, torch.Tensor]
    expected: dict[str, torch.Tensor]  # "component.module.weight" -> dW
    metadata: dict[str, str] = field(default_factory=dict)
    path: Path | None = None

    def save(self, path: Path) -> Path:
        if self.path is not None:
            return self.path
        save_file({k: v.contiguous() for k, v in self.state.items()}, str(path), metadata=self.metadata or None)
        return path


def lora_factors(model, targets: list[str], rank: int, alpha: float, seed: int, exclude: str | None = None):
    """{module name: (A, B)} of a PEFT LoraConfig injected into a copy of ``model`` (random A and B),
    and the config."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, exclude_modules=exclude, init_lora_weights=False)
    injected = inject_adapter_in_model(config, copy.deepcopy(model), adapter_name="default")
    gen = torch.Generator().manual_seed(seed)
    factors = {}
    for name, module in injected.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            factors[name] = (torch.randn(a.shape, generator=gen) * 0.2, torch.randn(b.shape, generator=gen) * 0.2)
    return factors, config


def lora_delta(a: torch.Tensor, b: torch.Tensor, scale: float, shape) -> torch.Tensor:
    return (scale * (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1))).reshape(shape)


def _weight_shapes(model) -> dict[str, torch.Size]:
    return {n.removesuffix(".weight"): p.shape for n, p in model.named_parameters() if n.endswith(".weight")}


def expected_lora(component: str, model, factors, scale: float) -> dict[str, torch.Tensor]:
    shapes = _weight_shapes(model)
    return {f"{component}.{name}.weight": lora_delta(a, b, scale, shapes[name]) for name, (a, b) in factors.items()}


# ---------------------------------------------------------------------------------------------- kohya


def kohya_stem(component: str, module: str, family: str = "sd15") -> str:
    if component in ("unet", "transformer"):
        return "lora_unet_" + module.replace(".", "_")
    prefix = {"text_encoder": "lora_te_" if family == "sd15" else "lora_te1_", "text_encoder_2": "lora_te2_"}[component]
    # kohya names keep CLIP's text_model level (transformers 5 flattened CLIPTextModel, not the projection model)
    return prefix + ("" if module.startswith("text_model.") else "text_model_") + module.replace(".", "_")


def kohya(parts: dict[str, tuple], alpha: float, rank: int, family: str = "sd15", stem=kohya_stem) -> Written:
    """parts: component -> (model, factors)."""
    state, expected = {}, {}
    for component, (model, factors) in parts.items():
        for module, (a, b) in factors.items():
            s = stem(component, module, family)
            state[f"{s}.lora_down.weight"], state[f"{s}.lora_up.weight"] = a, b
            state[f"{s}.alpha"] = torch.tensor(float(alpha))
        expected.update(expected_lora(component, model, factors, alpha / rank))
    return Written(state, expected)


def ldm_name(module: str, unet) -> str:
    """diffusers UNet module name -> its name in the original LDM/sgm UNet."""
    lpb = unet.config.layers_per_block
    resnet = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
              "conv_shortcut": "skip_connection", "norm1": "in_layers.0", "norm2": "out_layers.0"}

    def inner(rest, is_resnet):
        if is_resnet:
            head, _, tail = rest.partition(".")
            return resnet.get(rest, resnet.get(head, head) + ("." + tail if tail else ""))
        return rest

    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", module):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"input_blocks.{1 + i * (lpb + 1) + j}.{0 if kind == 'resnets' else 1}.{inner(rest, kind == 'resnets')}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", module):
        return f"input_blocks.{(int(m[1]) + 1) * (lpb + 1)}.0.op"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", module):
        kind, j, rest = m[1], int(m[2]), m[3]
        block = 1 if kind == "attentions" else (0 if j == 0 else 2)
        return f"middle_block.{block}.{inner(rest, kind == 'resnets')}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", module):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"output_blocks.{i * (lpb + 1) + j}.{0 if kind == 'resnets' else 1}.{inner(rest, kind == 'resnets')}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", module):
        i = int(m[1])
        has_attn = getattr(unet.up_blocks[i], "attentions", None) is not None
        return f"output_blocks.{i * (lpb + 1) + lpb}.{2 if has_attn else 1}.conv"
    return {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2"}[module]


def ldm_kohya(parts: dict[str, tuple], alpha: float, rank: int, family: str) -> Written:
    unet = parts["unet"][0]

    def stem(component, module, fam):
        if component == "unet":
            return "lora_unet_" + ldm_name(module, unet).replace(".", "_")
        return kohya_stem(component, module, fam)

    return kohya(parts, alpha, rank, family, stem)


def with_tucker_mid(written: Written, unet, module: str, rank: int, alpha: float, seed: int) -> Written:
    """Replace one 3x3 conv module of a kohya/LoCon file by a LyCORIS Tucker triple (down 1x1, mid kxk, up 1x1)."""
    gen = torch.Generator().manual_seed(seed)
    conv = dict(unet.named_modules())[module]
    out_c, in_c, kh, kw = conv.weight.shape
    down = torch.randn(rank, in_c, 1, 1, generator=gen) * 0.2
    mid = torch.randn(rank, rank, kh, kw, generator=gen) * 0.2
    up = torch.randn(out_c, rank, 1, 1, generator=gen) * 0.2
    s = kohya_stem("unet", module)
    state = dict(written.state)
    state[f"{s}.lora_down.weight"], state[f"{s}.lora_mid.weight"], state[f"{s}.lora_up.weight"] = down, mid, up
    state[f"{s}.alpha"] = torch.tensor(float(alpha))
    expected = dict(written.expected)
    # the composition up(mid(down(x))) as one kernel: W[o, c] = sum_ij up[o, i] mid[i, j] down[j, c]
    expected[f"unet.{module}.weight"] = (alpha / rank) * torch.einsum("oi,ijhw,jc->ochw", up[:, :, 0, 0], mid, down[:, :, 0, 0])
    return Written(state, expected)


def loha(unet_modules: dict[str, torch.nn.Module], rank: int, alpha: float, seed: int, stem=None) -> Written:
    gen = torch.Generator().manual_seed(seed)
    state, expected = {}, {}
    for component_module, module in unet_modules.items():
        component, name = component_module.split(".", 1)
        w = module.weight
        flat_in = w[0].numel()
        f = [torch.randn(s, generator=gen) * 0.3 for s in ((w.shape[0], rank), (rank, flat_in), (w.shape[0], rank), (rank, flat_in))]
        s = (stem or kohya_stem)(component, name, "sd15")
        for key, t in zip(("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), f):
            state[f"{s}.{key}"] = t
        state[f"{s}.alpha"] = torch.tensor(float(alpha))
        expected[f"{component_module}.weight"] = ((f[0] @ f[1]) * (f[2] @ f[3]) * (alpha / rank)).reshape(w.shape)
    return Written(state, expected)


def _factor(n: int) -> tuple[int, int]:
    """n = a * b with a small (LyCORIS' factorization picks a divisor near the factor)."""
    for a in (4, 2, 1):
        if n % a == 0:
            return a, n // a
    return 1, n


def lokr(unet_modules: dict[str, torch.nn.Module], rank: int, alpha: float, seed: int, stem=None) -> Written:
    """Full w1 (a x b) with low-rank w2 = w2_a @ w2_b on even modules; low-rank w1 and full w2 on odd ones."""
    gen = torch.Generator().manual_seed(seed)
    state, expected = {}, {}
    for n, (component_module, module) in enumerate(unet_modules.items()):
        component, name = component_module.split(".", 1)
        w = module.weight
        (a1, c), (b1, d) = _factor(w.shape[0]), _factor(w.shape[1])
        kk = w[0, 0].numel()
        s = (stem or kohya_stem)(component, name, "sd15")
        if n % 2 == 0:
            w1 = torch.randn(a1, b1, generator=gen) * 0.3
            w2a, w2b = torch.randn(c, rank, generator=gen) * 0.3, torch.randn(rank, d * kk, generator=gen) * 0.3
            state.update({f"{s}.lokr_w1": w1, f"{s}.lokr_w2_a": w2a, f"{s}.lokr_w2_b": w2b})
            dw = torch.kron(w1, w2a @ w2b) * (alpha / rank)
        else:
            w1a, w1b = torch.randn(a1, 1, generator=gen) * 0.3, torch.randn(1, b1, generator=gen) * 0.3
            w2 = torch.randn(c, d * kk, generator=gen) * 0.3
            state.update({f"{s}.lokr_w1_a": w1a, f"{s}.lokr_w1_b": w1b, f"{s}.lokr_w2": w2})
            dw = torch.kron(w1a @ w1b, w2) * (alpha / 1)
        state[f"{s}.alpha"] = torch.tensor(float(alpha))
        expected[f"{component_module}.weight"] = dw.reshape(w.shape)
    return Written(state, expected)


# ---------------------------------------------------------------------------------------------- diffusers / PEFT


def diffusers_file(pipeline_cls, directory: Path, parts: dict[str, tuple], configs: dict, rank: int, alpha: float) -> Written:
    """Written by the pipeline class's own ``save_lora_weights`` (adapter metadata included)."""
    from peft.utils import get_peft_model_state_dict  # noqa: F401  (the naming save_lora_weights expects)

    kwargs, expected = {}, {}
    for component, (model, factors) in parts.items():
        layers = {}
        for module, (a, b) in factors.items():
            layers[f"{module}.lora_A.weight"], layers[f"{module}.lora_B.weight"] = a, b
        kwargs[f"{component}_lora_layers"] = layers
        kwargs[f"{component}_lora_adapter_metadata"] = configs[component].to_dict()
        expected.update(expected_lora(component, model, factors, alpha / rank))
    directory.mkdir(parents=True, exist_ok=True)
    pipeline_cls.save_lora_weights(str(directory), **kwargs)
    return Written({}, expected, path=directory / "pytorch_lora_weights.safetensors")


def diffusers_tensors(parts: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """``<component>.<module>.lora_A.weight`` / ``lora_B`` tensors (no metadata: alpha = rank)."""
    return {f"{c}.{m}.lora_{n}.weight": t for c, (_, factors) in parts.items() for m, (a, b) in factors.items()
            for n, t in (("A", a), ("B", b))}


def unprefixed(parts: dict[str, tuple], rank: int, alpha: float) -> Written:
    """PEFT's get_peft_model_state_dict of one model saved as is (no component prefix, alpha = rank)."""
    (component, (model, factors)), = parts.items()
    state = {}
    for module, (a, b) in factors.items():
        state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"] = a, b
    return Written(state, expected_lora(component, model, factors, 1.0))


def peft_native(directory: Path, component: str, model, factors, config) -> Written:
    """What ``PeftModel.save_pretrained`` writes: adapter_model.safetensors (base_model.model.*) and
    adapter_config.json (where the alpha lives)."""
    from peft import get_peft_model

    peft_model = get_peft_model(copy.deepcopy(model), copy.deepcopy(config))
    with torch.no_grad():
        for name, module in peft_model.base_model.model.named_modules():
            if name in factors:
                a, b = factors[name]
                module.lora_A["default"].weight.copy_(a)
                module.lora_B["default"].weight.copy_(b)
    peft_model.save_pretrained(str(directory))
    scale = config.lora_alpha / config.r
    return Written({}, expected_lora(component, model, factors, scale), path=directory / "adapter_model.safetensors")


# ---------------------------------------------------------------------------------------------- FLUX


def flux_kohya(transformer, rank: int, alpha: float, seed: int, blocks=(0, 7, 18), single=(0, 37),
               text_encoder=None) -> Written:
    """sd-scripts' FLUX naming (BFL module names): fused qkv in the double blocks, proj, mlp,
    modulation; linear2 and modulation in the single blocks; img_in; CLIP-L as lora_te1_ when
    ``text_encoder`` = (model, factors) is given. (linear1, the fused q/k/v/mlp of the single
    blocks, is left out: diffusers hardcodes FLUX.1's 3072/12288 widths to split it.)"""
    gen = torch.Generator().manual_seed(seed)
    shapes = _weight_shapes(transformer)
    state, expected = {}, {}
    scale = alpha / rank

    def put(stem, targets, dims=None):
        ins = shapes[targets[0]][1]
        outs = [shapes[t][0] for t in targets]
        down = torch.randn(rank, ins, generator=gen) * 0.2
        up = torch.randn(sum(outs), rank, generator=gen) * 0.2
        state[f"{stem}.lora_down.weight"], state[f"{stem}.lora_up.weight"] = down, up
        state[f"{stem}.alpha"] = torch.tensor(float(alpha))
        for t, piece in zip(targets, torch.split(up, outs)):
            expected[f"transformer.{t}.weight"] = scale * piece @ down

    for i in blocks:
        b = f"transformer_blocks.{i}"
        put(f"lora_unet_double_blocks_{i}_img_attn_qkv", [f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v"])
        put(f"lora_unet_double_blocks_{i}_txt_attn_qkv", [f"{b}.attn.add_q_proj", f"{b}.attn.add_k_proj", f"{b}.attn.add_v_proj"])
        put(f"lora_unet_double_blocks_{i}_img_attn_proj", [f"{b}.attn.to_out.0"])
        put(f"lora_unet_double_blocks_{i}_txt_attn_proj", [f"{b}.attn.to_add_out"])
        put(f"lora_unet_double_blocks_{i}_img_mlp_0", [f"{b}.ff.net.0.proj"])
        put(f"lora_unet_double_blocks_{i}_img_mlp_2", [f"{b}.ff.net.2"])
        put(f"lora_unet_double_blocks_{i}_txt_mod_lin", [f"{b}.norm1_context.linear"])
    for i in single:
        put(f"lora_unet_single_blocks_{i}_linear2", [f"single_transformer_blocks.{i}.proj_out"])
        put(f"lora_unet_single_blocks_{i}_modulation_lin", [f"single_transformer_blocks.{i}.norm.linear"])
    put("lora_unet_img_in", ["x_embedder"])
    if text_encoder is not None:
        te = kohya({"text_encoder": text_encoder}, alpha, rank, "flux")
        state.update(te.state)
        expected.update(te.expected)
    return Written(state, expected)


BFL_NAMES = {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0",
             "ff.net.2": "img_mlp.2", "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin"}


def flux_comfy(transformer, rank: int, alpha: float, seed: int) -> Written:
    """ComfyUI/BFL module names with PEFT's lora_A/lora_B spelling and an alpha per module
    (``diffusion_model.double_blocks.0.img_attn.proj.lora_A.weight``); non-fused modules only."""
    factors, _ = lora_factors(transformer, list(BFL_NAMES), rank, alpha, seed)
    state, expected = {}, {}
    shapes = _weight_shapes(transformer)
    for module, (a, b) in factors.items():
        m = re.match(r"transformer_blocks\.(\d+)\.(.+)", module)
        if m is None or m[2] not in BFL_NAMES:
            continue
        stem = f"diffusion_model.double_blocks.{m[1]}.{BFL_NAMES[m[2]]}"
        state[f"{stem}.lora_A.weight"], state[f"{stem}.lora_B.weight"] = a, b
        state[f"{stem}.alpha"] = torch.tensor(float(alpha))
        expected[f"transformer.{module}.weight"] = lora_delta(a, b, alpha / rank, shapes[module])
    return Written(state, expected)


def flux_kohya_stem(component: str, module: str, family: str = "flux") -> str:
    """sd-scripts' FLUX name of a (non-fused) transformer module: transformer_blocks.3.attn.to_out.0 ->
    lora_unet_double_blocks_3_img_attn_proj."""
    m = re.match(r"transformer_blocks\.(\d+)\.(.+)", module)
    if m and m[2] in BFL_NAMES:
        return f"lora_unet_double_blocks_{m[1]}_{BFL_NAMES[m[2]].replace('.', '_')}"
    m = re.match(r"single_transformer_blocks\.(\d+)\.(proj_out|norm\.linear)$", module)
    if m:
        return f"lora_unet_single_blocks_{m[1]}_{'linear2' if m[2] == 'proj_out' else 'modulation_lin'}"
    raise KeyError(module)
