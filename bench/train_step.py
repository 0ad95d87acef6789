"""Training-step benchmark: ours vs a transformers + peft baseline, same batch, one process.

    python bench/train_step.py --size tiny                       # CPU, fp32 (a few seconds)
    python bench/train_step.py --size tiny-internvl              # CPU, fp32, MP-GUI layout
    python bench/train_step.py --size mpgui-stage4 --device cuda # H100 / H200, bf16
    python bench/train_step.py --size qwen2vl-2b --device cuda

A step = forward + backward + AdamW step over the trainable tensors, activation checkpointing on, random weights
(nothing is downloaded; on GPU both models are built directly in bf16 on the device).
- ours: model.py + lora.py exactly as train.py builds them (one process: the loss is forward(return_loss=True),
  the chunked fused head + cross-entropy; `--no-chunked` uses the full fp32 logits instead; `--pack` packs the
  micro-batch into one row).
- baseline: transformers (SDPA, gradient_checkpointing_enable(use_reentrant=False)) + peft LoRA on the same
  modules and ranks, loss from `labels=` (transformers' own cross-entropy on the full logits).
  * Qwen2-VL sizes: Qwen2VLForConditionalGeneration with the same config (tiny: the very same weights).
  * InternVL2 / MP-GUI sizes: transformers' native InternVLForConditionalGeneration with a LlamaConfig text model
    of InternLM2-7B's shapes (InternLM2 = Llama's architecture with fused wqkv; transformers has no InternLM2).
    It has NO perceivers and NO fusion gate: MP-GUI's EXTRA positions are ordinary tokens to it, so both sides run
    the same sequence length; ours also runs the three perceivers + gate (trained), i.e. more work.
MFU uses model FLOPs (recompute not counted), stated per step as
    LLM:    T_llm * (4 * N_llm + 2 * N_llm_trained) + 6 * L * d * sum_rows(T_row^2)   (causal attention fwd+bwd)
    vision: T_vit * (c * N_vit + 2 * N_vit_trained)  + 2 * c' * L_v * d_v * sum_seq(T_seq^2)     (bidirectional)
with c = 4, c' = 6 when the tower is back-propagated (LoRA on the ViT), else c = 2, c' = 2 (forward only);
N = matmul parameters (embeddings excluded, head included), vision tokens counted (ViT patches incl. CLS).
Peak: H100 / H200 989e12 bf16 dense FLOP/s. Peak memory: torch.cuda.max_memory_allocated (n/a on CPU).
"""
import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import load  # noqa: E402
import lora  # noqa: E402
import model as M  # noqa: E402

PEAK = {"H100": 989e12, "H200": 989e12}
QWEN_LLM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

SIZES = {  # family, text (Qwen2 / InternLM2 shapes), vision, LoRA ranks, image tokens, text tokens, batch
    "tiny": dict(family="qwen", text=dict(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                          num_attention_heads=8, num_key_value_heads=2),
                 vision=dict(depth=4, embed_dim=128, num_heads=4, mlp_ratio=4), grid=(16, 24), text_tokens=200,
                 lora_llm=8, lora_vit=0, batch=2),
    "qwen2vl-2b": dict(family="qwen", text=dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                                                num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2),
                       vision=dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4), grid=(56, 96),  # 1344 tokens
                       text_tokens=256, lora_llm=32, lora_vit=0, batch=1),
    "tiny-internvl": dict(family="internvl", text=dict(vocab_size=512, hidden_size=256, intermediate_size=688,
                                                       num_hidden_layers=4, num_attention_heads=8,
                                                       num_key_value_heads=2),
                          vision=dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                      intermediate_size=512, image_size=112), tiles=7, text_tokens=200, lora_llm=8,
                          lora_vit=8, batch=2),
    "mpgui-stage4": dict(family="internvl", text=dict(vocab_size=92553, hidden_size=4096, intermediate_size=14336,
                                                      num_hidden_layers=32, num_attention_heads=32,
                                                      num_key_value_heads=8),
                         vision=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                     intermediate_size=4096, image_size=448), tiles=7, text_tokens=500, lora_llm=64,
                         lora_vit=64, batch=1),
}
IMG, VS, VE, EXTRA = 500, 501, 502, 503  # tiny ids; real sizes put them at vocab - 8 ..


def ids_for(S):
    v = S["text"]["vocab_size"]
    return (IMG, VS, VE, EXTRA) if v == 512 else (v - 8, v - 7, v - 6, v - 5)


# ----------------------------------------------------------------------------------------------------------------------
# models


def hf_qwen_config(S):
    import transformers as T
    img, vs, ve, _ = ids_for(S)
    text = dict(S["text"], rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24] if S["text"]["hidden_size"] >
                                         1000 else [4, 6, 6]}, rms_norm_eps=1e-6, tie_word_embeddings=True,
                rope_theta=1e6, max_position_embeddings=32768)
    vis = dict(S["vision"], hidden_size=S["text"]["hidden_size"])
    cfg = T.Qwen2VLConfig(text_config=text, vision_config=vis, image_token_id=img, video_token_id=img + 10 if
                          img == IMG else img - 1, vision_start_token_id=vs, vision_end_token_id=ve)
    cfg._attn_implementation = "sdpa"
    return cfg


def hf_internvl_config(S):
    import transformers as T
    img, _, _, _ = ids_for(S)
    v = S["vision"]
    vis = T.InternVLVisionConfig(hidden_size=v["hidden_size"], num_hidden_layers=v["num_hidden_layers"],
                                 num_attention_heads=v["num_attention_heads"], intermediate_size=v["intermediate_size"],
                                 image_size=[v["image_size"]] * 2, attention_bias=True, use_mean_pooling=False)
    text = T.LlamaConfig(**S["text"], rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=32768,
                         tie_word_embeddings=False)
    cfg = T.InternVLConfig(vision_config=vis, text_config=text, image_token_id=img, tie_word_embeddings=False,
                           image_seq_length=(v["image_size"] // 28) ** 2)
    cfg._attn_implementation = "sdpa"
    for c in (cfg.vision_config, cfg.text_config):
        c._attn_implementation = "sdpa"
    return cfg


def ours_internvl_config(S):
    v, t = S["vision"], S["text"]
    img, _, _, extra = ids_for(S)
    d = {"architectures": ["MPGUI"], "downsample_ratio": 0.5, "ps_version": "v2", "force_image_size": v["image_size"],
         "template": "internlm2-chat",
         "vision_config": dict(v, patch_size=14, qkv_bias=True, hidden_act="gelu", layer_norm_eps=1e-6),
         "llm_config": dict(t, architectures=["InternLM2ForCausalLM"], rms_norm_eps=1e-5, rope_theta=1e6, bias=False,
                            max_position_embeddings=32768, eos_token_id=2, pad_token_id=2)}
    cfg = load.config_from_hf(d)
    cfg.image_token_id, cfg.extra_token_id, cfg.im_start_token_id = img, extra, ids_for(S)[1]
    return cfg


def build_ours(S, device, dtype, folder=None):
    if folder:  # the very same weights as the baseline (tiny Qwen)
        m = load.load_model(folder, dtype=dtype, device=device)
    else:
        cfg = load.config_from_hf(hf_qwen_config(S).to_dict()) if S["family"] == "qwen" else ours_internvl_config(S)
        with torch.device(device):
            torch.set_default_dtype(dtype)
            if S.get("plain"):  # --plain: InternVL2 without perceivers, EXTRA as text: the baseline's exact work
                cfg.arch = "internvl"
            m = (M.Qwen2VL if S["family"] == "qwen" else M.InternVL if S.get("plain") else M.MPGUI)(cfg)
            torch.set_default_dtype(torch.float32)
    m.requires_grad_(False)
    lora.add_adapters(m, S["lora_llm"], 2 * S["lora_llm"], S["lora_vit"],
                      2 * S["lora_vit"], 0.0)
    for _, layer in lora.lora_layers(m):
        layer.lora_A.requires_grad_(True), layer.lora_B.requires_grad_(True)
    if S["family"] == "internvl" and not S.get("plain"):
        m.cfg.mpgui_mode = "fusion"
        for name in M.MPGUI.PARTS:  # stage 4: perceivers + gate trained (initialised as their first stage does)
            m.init_part(name)
            m.get_submodule(name).requires_grad_(True)
    for mod in m.modules():
        if isinstance(mod, M.Block):
            mod.checkpointing = True
    return m.train()


def build_baseline(S, device, dtype, folder=None):
    import transformers as T
    from peft import LoraConfig, get_peft_model
    if S["family"] == "qwen":
        if folder:
            hf = T.Qwen2VLForConditionalGeneration.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
        else:
            with torch.device(device):
                hf = T.Qwen2VLForConditionalGeneration._from_config(hf_qwen_config(S), dtype=dtype)
        llm = r"model\.language_model\.layers\.\d+\.(self_attn|mlp)\.(" + "|".join(QWEN_LLM_TARGETS) + ")"
        targets, vit = llm, None
    else:
        with torch.device(device):
            hf = T.InternVLForConditionalGeneration._from_config(hf_internvl_config(S), dtype=dtype)
        targets = r"model\.language_model\.layers\.\d+\.(self_attn|mlp)\.(" + "|".join(QWEN_LLM_TARGETS) + ")"
        vit = r"model\.vision_tower\.encoder\.layer\.\d+\.(attention\.(q_proj|k_proj|v_proj|projection_layer)|" \
              r"mlp\.(fc1|fc2))"
    hf = hf.to(device)
    hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    r = S["lora_llm"]
    hf = get_peft_model(hf, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets))
    if vit and S["lora_vit"]:
        hf.add_adapter("vit", LoraConfig(r=S["lora_vit"], lora_alpha=2 * S["lora_vit"], target_modules=vit))
        hf.base_model.set_adapter(["default", "vit"])
    for n, p in hf.named_parameters():  # peft keeps adapters in fp32 by default, as lora.py does
        if "lora_" in n:
            p.requires_grad_(True)
    return hf.train()


# ----------------------------------------------------------------------------------------------------------------------
# batch, steps, FLOPs


def make_batch(S, device, seed=0):
    """Right-padded batch of `batch` samples: text, one image block, text; the last 64 tokens are supervised."""
    g = torch.Generator().manual_seed(seed)
    img, vs, ve, extra = ids_for(S)
    B, rows = S["batch"], []
    if S["family"] == "qwen":
        h, w = S["grid"]
        n_img = h * w // 4
        pv = torch.randn(B * h * w, 3 * 2 * 14 * 14, generator=g)
        vision = dict(pixel_values=pv, image_grid_thw=torch.tensor([[1, h, w]] * B))
        block = [vs] + [img] * n_img + [ve]
    else:
        n = (S["vision"]["image_size"] // 28) ** 2
        vision = dict(pixel_values=torch.randn(B * S["tiles"], 3, S["vision"]["image_size"], S["vision"]["image_size"],
                                               generator=g))
        block = [vs] + [img] * (n * S["tiles"]) + [extra] * (n * S["tiles"]) + [ve]
    for b in range(B):
        k = S["text_tokens"] - 16 * b  # slightly different lengths: padding exists
        t = torch.randint(10, 400, (k,), generator=g).tolist()
        rows.append(t[:k // 3] + block + t[k // 3:])
    L = max(map(len, rows))
    ids = torch.tensor([r + [0] * (L - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in rows])
    sup = torch.tensor([[0] * (len(r) - 64) + [1] * 64 + [0] * (L - len(r)) for r in rows]).bool()
    labels = ids.masked_fill(~sup, -100)
    return dict(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device),
                **{k: v.to(device) for k, v in vision.items()})


def model_flops(m, S, batch):
    """Model FLOPs of one training step (see the module docstring), from our module's shapes."""
    c = m.cfg
    lin = lambda mod, trained: sum(p.numel() for n, p in mod.named_parameters() if p.dim() == 2 and
                                   p.requires_grad == trained and "embed" not in n)
    dec = m.decoder.layers
    n_llm, n_llm_t = lin(dec, False) + m.head.weight.numel(), lin(dec, True)
    rows = batch["attention_mask"].sum(1).float()
    f = rows.sum() * (4 * n_llm + 2 * n_llm_t) + 6 * c.num_layers * c.hidden_size * (rows ** 2).sum()
    tower = [mod for name, mod in m.named_children() if name not in ("language_model", "model", "lm_head")]
    n_vit = sum(lin(t, False) for t in tower)
    n_vit_t = sum(lin(t, True) for t in tower)
    if S["family"] == "qwen":
        seq = [int(t.prod()) for t in batch["image_grid_thw"]]
    else:
        seq = [(S["vision"]["image_size"] // 14) ** 2 + 1] * len(batch["pixel_values"])
    t_vit = sum(seq)
    cc, ca = (4, 6) if S["lora_vit"] else (2, 2)
    f += t_vit * (cc * n_vit + 2 * n_vit_t) + 2 * ca * c.vit_num_layers * c.vit_hidden_size * sum(s * s for s in seq)
    return float(f)


def step_fn(model, batch, ours, chunked, pack, device):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, foreach=device == "cuda")
    n = (batch["labels"][:, 1:] != -100).sum()
    auto = torch.autocast("cuda", torch.bfloat16, enabled=device == "cuda")
    kw = dict(batch)
    if ours and pack:
        kw = model.pack(**kw)

    def step():
        with auto:
            if ours and chunked:
                loss = model(**kw, return_loss=True) / n
            elif ours:
                logits = model(**kw)
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), kw["labels"][:, 1:].flatten(),
                                                         reduction="sum") / n
            else:
                extra = {"mm_token_type_ids": (kw["input_ids"] == ids_for_batch[0]).int()} if qwen_flag[0] else {}
                loss = model(**kw, **extra).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return step


ids_for_batch, qwen_flag = [0], [False]


def measure(step, warmup, steps, device):
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    losses = [step() for _ in range(warmup)]
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        losses.append(step())
        sync()
        times.append(time.perf_counter() - t)
    times.sort()
    mem = torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else None
    return times[len(times) // 2], mem, float(losses[0])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="tiny", choices=list(SIZES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=0)
    p.add_argument("--no-chunked", action="store_true")
    p.add_argument("--pack", action="store_true")
    p.add_argument("--plain", action="store_true", help="InternVL sizes: ours without perceivers / gate")
    p.add_argument("--only", choices=["ours", "baseline"], default=None)
    a = p.parse_args()
    S = dict(SIZES[a.size])
    S["batch"], S["plain"] = a.batch or S["batch"], a.plain
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    batch = make_batch(S, a.device)
    ids_for_batch[0], qwen_flag[0] = ids_for(S)[0], S["family"] == "qwen"
    tokens = int(batch["attention_mask"].sum())
    res, tmp = {}, None
    if S["family"] == "qwen" and a.device == "cpu":  # tiny: the same weights on both sides
        import transformers as T
        tmp = tempfile.TemporaryDirectory()
        torch.manual_seed(0)
        T.Qwen2VLForConditionalGeneration(hf_qwen_config(S)).save_pretrained(tmp.name)
    flops = None
    for name in ("ours", "baseline"):
        if a.only and name != a.only:
            continue
        build = build_ours if name == "ours" else build_baseline
        mdl = build(S, a.device, dtype, tmp.name if tmp else None)
        if name == "ours":
            flops = model_flops(mdl, S, batch)
        step = step_fn(mdl, batch, name == "ours", not a.no_chunked, a.pack, a.device)
        res[name] = measure(step, a.warmup, a.steps, a.device)
        del mdl, step
        if a.device == "cuda":
            torch.cuda.empty_cache()
    dev = torch.cuda.get_device_name() if a.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    peak = next((v for k, v in PEAK.items() if k in dev), None)
    print(f"size {a.size} on {dev}, {dtype}, batch {S['batch']} x {batch['input_ids'].shape[1]} ({tokens} tokens incl. "
          f"image tokens), median of {a.steps} steps after {a.warmup} warm-up; ours: chunked loss "
          f"{not a.no_chunked}, pack {a.pack}, plain {a.plain}; model FLOPs/step "
          f"{flops / 1e12 if flops else float('nan'):.3f} T")
    print("| impl | step s | tokens/s | MFU | peak mem GiB | first loss |\n|---|---|---|---|---|---|")
    for name, (t, mem, loss) in res.items():
        mfu = f"{flops / t / peak:.1%}" if peak and flops else "n/a"
        print(f"| {name} | {t:.4f} | {tokens / t:.0f} | {mfu} | {f'{mem:.2f}' if mem is not None else 'n/a'} | "
              f"{loss:.4f} |")
    if len(res) == 2:
        (to, mo, _), (tb, mb, _) = res["ours"], res["baseline"]
        print(f"| ours/baseline | {to / tb:.2f}x time | {tb / to:.2f}x | | "
              f"{f'{mo / mb:.2f}x' if mo is not None else 'n/a'} | |")


if __name__ == "__main__":
    main()
