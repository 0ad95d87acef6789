"""Supervised fine-tuning with LoRA and trainable parts, one code path from 1 process to N nodes.

    python train.py configs/textual.json [--key=value ...]
    torchrun --nproc_per_node 8 train.py configs/textual.json
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 train.py CONFIG

A run folder holds config.json (the resolved config), metrics.jsonl, and checkpoints/step_N (trainable weights,
optimizer, scheduler, step, data position, RNG states; the last keep_last), each written under a temporary name,
synced and renamed; a run resumes from its latest checkpoint by itself, and a finished one run again does nothing.
`python merge.py RUN OUT` folds the result into a checkpoint.
"""
import ast
import dataclasses
import datetime
import functools
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from tokenizers import AddedToken

import checkpoints
import data
import formats
import load
import lora
import model


@dataclass
class TrainConfig:
    # run: where it starts, what it reads, where it writes
    base: str = ""  # starting checkpoint: folder or hub id (a stage's base is the previous stage's merge)
    # what the data is: internvl | vlaser (InternVL / MP-GUI: meta; vlaser adds the point prefix to <point> samples) |
    # showui_grounding | showui_navigation | llamafactory (Qwen2-VL / Qwen2.5-VL: data_dir + datasets)
    data_format: str = "internvl"
    out: str = "runs/run"  # run folder
    resume: str = ""  # a checkpoint folder to resume from ("" = the run's latest, if any)
    # engine: optimizer and schedule, batches, precision, data loading, logging, checkpoints
    lr: float = 1e-5  # peak learning rate of the LoRA adapters
    lr_parts: float = 0.0  # peak learning rate of train_parts (0 = lr)
    weight_decay: float = 0.01  # on every trainable tensor, as the official DeepSpeed optimizer does
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    warmup_ratio: float = 0.03
    schedule: str = "linear"  # decay after warmup: linear (the official DeepSpeed WarmupDecayLR) | cosine
    grad_clip: float = 1.0  # 0 = no clipping (the gradient norm is still logged)
    global_batch: int = 64  # samples per optimizer step, all ranks and accumulation steps together
    micro_batch: int = 8  # samples per forward on one rank
    epochs: float = 1.0
    max_steps: int = 0  # stop after this many optimizer steps (0 = the epochs decide)
    max_length: int = 4096  # longer samples are skipped and counted, never truncated
    drop_path: float = 0.1  # ViT stochastic depth (the official runs keep 0.1 on the frozen ViT)
    bf16: bool = True  # bf16 compute (fp32 master weights, fp32 gradient reduction)
    base_dtype: str = "auto"  # frozen weights' storage: auto (bfloat16 if bf16, else float32) | bfloat16 | float32
    activation_checkpointing: bool = True
    pack: bool = False  # each micro-batch as one row, attention within each sample (no padding compute)
    chunked_loss: bool = True  # fused head + cross-entropy in row chunks: no (tokens, vocab) fp32 logits
    group_by_length: bool = True
    num_workers: int = 4
    seed: int = 0
    log_every: int = 1
    save_every: int = 0  # optimizer steps between checkpoints (0 = only at the end)
    keep_last: int = 3  # checkpoints kept: each new one removes the older ones beyond the last keep_last (0 = all)
    dist_timeout_min: int = 30
    dp_replicate: int = 0  # HSDP: replicas of the FSDP-sharded model (0 = the nodes under torchrun; 1 = plain FSDP)
    compile: bool = False  # torch.compile each Block (decoder layer, vision block) on its own, as torchtitan does
    # LoRA, and the modules trained in full
    lora_llm_r: int = 0  # LoRA rank on the language model (0 = none)
    lora_llm_alpha: int = 0
    lora_vit_r: int = 0  # LoRA rank on the vision tower (0 = none)
    lora_vit_alpha: int = 0
    lora_dropout: float = 0.05
    lora_targets: list = field(default_factory=list)  # module-name suffixes in both scopes ([] = the family's defaults)
    train_parts: list = field(default_factory=list)  # module names trained in full (e.g. textual_perceiver)
    # MP-GUI
    mpgui: bool = False  # build MP-GUI (perceivers + gate) on the base, initialising the parts it lacks
    mpgui_mode: str = "fusion"  # what fills EXTRA tokens: textual | graphical | spatial | fusion | mean (ablation)
    gate_mask: str = "prompt_only"  # fusion-gate keys: prompt_only | official (answers leak in, as released)
    init_parts: list = field(default_factory=list)  # MP-GUI parts re-initialised at this stage's start
    # InternVL data (internvl, vlaser)
    meta: str = ""  # InternVL meta json: {name: {root, annotation, repeat_time, data_augment, max_dynamic_patch}}
    max_tiles: int = 6  # InternVL tiles per image (+ thumbnail); a dataset's max_dynamic_patch overrides it
    # Qwen data (ShowUI and LLaMA-Factory)
    data_dir: str = ""  # ShowUI: $_DATA_DIR (ShowUI-desktop/, GUI_Course/GUIAct/, ...); llamafactory: its dataset_dir
    datasets: list = field(default_factory=list)  # ShowUI: "name:json" pairs; llamafactory: dataset_info.json names
    min_pixels: int = 256 * 28 * 28  # Qwen image area bounds of smart_resize (ShowUI: min/max_visual_tokens * 28^2)
    max_pixels: int = 1344 * 28 * 28
    # ShowUI data
    num_turn: int = 1  # grounding queries per screenshot; > 1 also makes vtvt history actions targets
    crop_min: float = 1.0  # grounding: crop / pad scale range per side (1 and 1 = off)
    crop_max: float = 1.0
    xy_int: bool = False  # grounding: answers as 0-1000 integers instead of 2-decimal 0-1 floats
    num_history: int = 4  # navigation: past actions in the prompt
    interleaved_history: str = "tttt"  # navigation: tttt (actions as text) | vtvt ([screenshot, action] pairs)
    # LLaMA-Factory data
    media_dir: str = ""  # where relative image paths are found first ("" = data_dir)
    max_samples: int = 0  # the first records kept per dataset (0 = all)
    image_max_pixels: int = 768 * 768  # shrink each image to this area before smart_resize (0 = off), as upstream
    keep_untagged_system: bool = False  # a leading system message under tags without system_tag: upstream drops it
    # token selection: ShowUI's UI-guided selection, copied into the model config (model.py)
    lm_skip_layer: str = "[1,28,0]"
    lm_skip_ratio: float = 0.0
    lm_skip_rand: bool = False
    uigraph_threshold: float = 1.0


CHOICES = dict(data_format=("internvl", "vlaser", "showui_grounding", "showui_navigation", "llamafactory"),
               schedule=("linear", "cosine"), mpgui_mode=("textual", "graphical", "spatial", "fusion", "mean"),
               gate_mask=("prompt_only", "official"), interleaved_history=("tttt", "vtvt"),
               base_dtype=("auto", "bfloat16", "float32"))
RATIOS = ("warmup_ratio", "lora_dropout", "drop_path", "lm_skip_ratio")  # in [0, 1]
POSITIVE = ("lr", "global_batch", "micro_batch", "max_length", "max_tiles", "num_turn", "log_every",
            "dist_timeout_min", "min_pixels", "max_pixels", "epochs", "crop_min", "crop_max")


def check_value(where, k, v):
    """Checks field k's value: its default's type, one of CHOICES, in its range; `where` names it in the error."""
    # a float field takes an int; no field but a bool field takes a bool
    default = getattr(TrainConfig(), k)
    expected = (float, int) if isinstance(default, float) else type(default)
    if not isinstance(v, expected) or isinstance(v, bool) != isinstance(default, bool):
        raise TypeError(f"{where}: {k} = {v!r} is not a {type(default).__name__}")
    if k in CHOICES and v not in CHOICES[k]:
        raise ValueError(f"{where}: {k} = {v!r} is not one of {', '.join(CHOICES[k])}")
    if k in RATIOS and not 0 <= v <= 1 or k in POSITIVE and not v > 0 or \
            isinstance(v, (int, float)) and not isinstance(v, bool) and not v >= 0:  # NaN fails every comparison
        allowed = "in [0, 1]" if k in RATIOS else "> 0" if k in POSITIVE else ">= 0"
        raise ValueError(f"{where}: {k} = {v!r} must be {allowed}")


def load_config(path, overrides=()):
    """A JSON file filled into TrainConfig, then --key=value overrides; bad keys and values are errors naming them."""
    with open(path) as f:
        raw = json.load(f)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    for k, v in raw.items():
        if k.startswith("_"):  # "_comment" style keys document a config
            continue
        if k not in names:
            raise KeyError(f"{path}: unknown config key {k!r}")
        check_value(path, k, v)
    cfg = TrainConfig(**{k: v for k, v in raw.items() if k in names})
    for o in overrides:
        if not o.startswith("--") or "=" not in o:
            raise ValueError(f"override {o!r} is not --key=value")
        k, v = o[2:].split("=", 1)
        if k not in names:
            raise KeyError(f"unknown config key {k!r} in override {o!r}")
        if not isinstance(getattr(cfg, k), str):  # a string field takes the text as it is
            try:
                v = ast.literal_eval(v)
            except (ValueError, SyntaxError):
                pass  # not a Python literal: stays text, which only a string field takes
        check_value(f"override {o!r}", k, v)
        setattr(cfg, k, v)
    if cfg.crop_min > cfg.crop_max:
        raise ValueError(f"{path}: crop_min {cfg.crop_min} > crop_max {cfg.crop_max}")
    if cfg.base_dtype == "bfloat16" and not cfg.bf16:  # bf16 weights in fp32 compute: nothing casts them
        raise ValueError(f"{path}: base_dtype bfloat16 needs bf16 compute, but bf16 is false (auto follows bf16)")
    cfg.base_dtype = {"auto": "bfloat16" if cfg.bf16 else "float32"}.get(cfg.base_dtype, cfg.base_dtype)
    return cfg


# ----------------------------------------------------------------------------------------------------------------------
# model: parts, LoRA, FSDP2


def build_model(cfg, tok, device):
    """The base with the run's switches, MP-GUI's EXTRA token and parts, LoRA, and the trainable set."""
    # Built on the meta device and, under torchrun, sharded (FSDP2) before any weight is read: each rank reads only
    # its shards' rows. What the files lack (new parts, adapters) is created in full on the CPU first, in the order
    # one process draws it (init_distributed seeds every rank alike); grown vocabulary rows come from load_weights.
    # Trained and new tensors are fp32 masters, the frozen rest is stored in base_dtype.
    extra = tok.token_to_id(data.EXTRA_CONTEXT)
    if extra is None and cfg.mpgui:  # InternVL2-8B has every InternVL token but this one
        tok.add_special_tokens([AddedToken(data.EXTRA_CONTEXT, special=True, normalized=False)])
        extra = tok.token_to_id(data.EXTRA_CONTEXT)
    switches = {k: getattr(cfg, k) for k in ("mpgui_mode", "gate_mask", "lm_skip_layer", "lm_skip_ratio",
                                             "lm_skip_rand", "uigraph_threshold")}
    m = load.load_model(cfg.base, device="meta", mpgui=cfg.mpgui, extra_token_id=extra, **switches)
    base_vocab = m.cfg.vocab_size
    if m.cfg.is_mpgui:
        if extra >= m.cfg.vocab_size:
            m.resize_vocab(extra + 1)
        for name in cfg.init_parts:
            m.get_submodule(name).to_empty(device="cpu")
            m.init_part(name)
    if m.cfg.is_internvl:
        m.vision_model.set_drop_path(cfg.drop_path)
    m.requires_grad_(False)
    lora.add_adapters(m, cfg.lora_llm_r, cfg.lora_llm_alpha, cfg.lora_vit_r, cfg.lora_vit_alpha, cfg.lora_dropout,
                      cfg.lora_targets)  # the adapters are new Parameters: trainable
    for name in cfg.train_parts:
        m.get_submodule(name).requires_grad_(True)
    # what the base checkpoint does not hold: saved with every checkpoint so merge.py can rebuild the run exactly
    m.new_tensors = [n for n, _ in m.named_parameters() if n.split(".")[0] in m.initialised + cfg.init_parts]
    if m.cfg.vocab_size != base_vocab:
        m.new_tensors += [n for n, p in m.named_parameters() if p.shape[0] == m.cfg.vocab_size and p.dim() == 2]
    for mod in m.modules():
        if isinstance(mod, model.Block):
            mod.checkpointing = cfg.activation_checkpointing
            if cfg.compile:  # each Block's math on its own, before FSDP2 (torchtitan's order); the activation
                mod.block = torch.compile(mod.block)  # checkpoint and FSDP2's hooks stay eager
    dtypes = {n: torch.float32 if p.requires_grad or n in m.new_tensors else getattr(torch, cfg.base_dtype)
              for n, p in m.named_parameters()}
    m = shard(m, cfg, device) if dist.is_initialized() else m
    load.load_weights(m, dtypes, device)
    return m.to(device)


def build_dataset(cfg, tok, model_cfg):
    """The training set of cfg.data_format, for the model family of model_cfg (the model config)."""
    internvl = model_cfg.is_internvl
    if cfg.data_format not in CHOICES["data_format"]:
        raise ValueError(f"unknown data_format {cfg.data_format!r}")
    if internvl != (cfg.data_format in ("internvl", "vlaser")):
        raise ValueError(f"data_format {cfg.data_format!r} does not fit a {model_cfg.arch} model: InternVL / "
                         "MP-GUI read internvl or vlaser; Qwen2-VL / Qwen2.5-VL read showui_grounding, "
                         "showui_navigation or llamafactory")
    if internvl and cfg.lm_skip_ratio > 0:
        raise ValueError(f"lm_skip_ratio {cfg.lm_skip_ratio}: UI-guided token selection is ShowUI's, for Qwen2-VL "
                         f"bases; {cfg.base} is {model_cfg.arch}")
    common = (tok, cfg.min_pixels, cfg.max_pixels, cfg.max_length)
    if internvl:
        ds = formats.InternVLDataset(
            cfg.meta, tok, model_cfg.template, model_cfg.num_image_token, model_cfg.vit_image_size, cfg.max_tiles,
            cfg.max_length, data.EXTRA_CONTEXT if model_cfg.is_mpgui else None,
            point_prefix=formats.VLASER_POINT_PREFIX if cfg.data_format == "vlaser" else None)
    elif cfg.data_format == "showui_grounding":
        ds = formats.ShowUIGrounding(cfg.data_dir, cfg.datasets, *common, cfg.num_turn, cfg.crop_min, cfg.crop_max,
                                     cfg.xy_int)
    elif cfg.data_format == "showui_navigation":
        ds = formats.ShowUINavigation(cfg.data_dir, cfg.datasets, *common, cfg.num_history, cfg.interleaved_history,
                                      cfg.num_turn)
    else:
        ds = formats.LlamaFactoryDataset(cfg.data_dir, cfg.datasets, *common, cfg.image_max_pixels, cfg.media_dir,
                                         cfg.max_samples, cfg.keep_untagged_system)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print_skipped([], formats.load_report(ds))  # per file: skipped of read, at load
    return ds


def vision_inputs(b, m, distributed, device):
    """(b, model m's vision kwargs on device); a micro-batch without images still feeds the vision tower."""
    # Under FSDP every rank runs every unit in every micro-batch (their all-gathers and reduce-scatters are
    # collectives all ranks join). InternVL / MP-GUI: zero tiles, a (0, 3, S, S) tensor (in one process too: one
    # path). Qwen, under FSDP only: a blank image, its tokens in extra padding columns of b (image tokens in the first
    # row, padding in the others), masked out of attention and loss.
    if m.cfg.is_internvl:
        px = b["pixel_values"]
        px = px if px is not None else torch.zeros(0, 3, m.cfg.vit_image_size, m.cfg.vit_image_size)
        return b, {"pixel_values": px.to(device)}
    c = m.cfg
    if b["pixel_values"] is None and distributed:
        g = 2 * c.vit_merge  # a (1, 2m, 2m) patch grid, which the merger's m x m merge turns into 2 x 2 = 4 tokens
        col = torch.full((b["input_ids"].shape[0], (g // c.vit_merge) ** 2), c.pad_token_id)
        col[0] = c.image_token_id
        b = dict(b, input_ids=torch.cat([b["input_ids"], col], 1), labels=torch.cat([b["labels"], col * 0 - 100], 1),
                 attention_mask=torch.cat([b["attention_mask"], col * 0], 1), image_grid_thw=torch.tensor([[1, g, g]]),
                 pixel_values=torch.zeros(g * g, 3 * c.vit_temporal_patch * c.vit_patch ** 2))
    return b, {k: b[k].to(device) for k in ("pixel_values", "image_grid_thw") if b[k] is not None}


def shard(m, cfg, device):
    """FSDP2: each decoder block, the vision tower as one unit, then the root (torchtitan's order); HSDP if asked."""
    # dp_replicate > 1: a 2-D mesh, each replica sharded over world / dp_replicate ranks (by default one node's)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.device_mesh import init_device_mesh
    world = dist.get_world_size()
    rep = cfg.dp_replicate or world // int(os.environ.get("LOCAL_WORLD_SIZE", world))
    mesh = init_device_mesh(device.type, (rep, world // rep), mesh_dim_names=("dp_replicate", "dp_shard")) \
        if rep > 1 else init_device_mesh(device.type, (world,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if cfg.bf16 else torch.float32, reduce_dtype=torch.float32)
    # the last block (like the root, by FSDP2's default) stays gathered after forward: backward needs it at once
    for i, layer in enumerate(m.decoder.layers):
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(m.decoder.layers) - 1)
    fully_shard(m.vision, mesh=mesh, mp_policy=mp)
    fully_shard(m, mesh=mesh, mp_policy=mp)
    return m


def step_flops(m, cfg, b):
    """Model FLOPs of micro-batch b: matmuls and attention, as FlopCounterMode counts them (tools/dry_run.py)."""
    # Per weight and row: 2 forward, 2 for the input gradient where backward passes, 2 for a trained weight's
    # gradient, 2 to recompute a checkpointed block. Attention per layer: forward 4 * width * rows * keys (causal:
    # half the keys), backward 2.5 times that (it recomputes the scores, as FlashAttention does). Rows: the decoder's
    # the tokens (ShowUI's token selection not subtracted), the head's the supervised ones (chunked loss), the vision
    # tower's its patches, the image tokens for mlp1, the perceivers, the gate and the merger. Idle parts (another
    # stage's perceivers) and Qwen2.5-VL's windowed attention count nothing. Measured against the counter at the
    # recipes' sizes (tests/test_dry_run.py): within 0.03%, but for the fusion gate, whose keys and values run over
    # the prompt and the perceivers' tokens, counted here as image tokens (fusion.json: 0.4-3% under).
    c, ac, pv, T = m.cfg, cfg.activation_checkpointing, b.get("pixel_values"), b["attention_mask"].sum(1).tolist()
    conv = (nn.Conv2d, nn.Conv3d)  # the patch embeddings: on pixels, which need no gradient

    def linear(params, rows, back, ckpt=False):  # matrices only: biases and norms are additions, not FLOPs here
        return rows * sum(p.numel() * (2 + 2 * back * (1 + ckpt) + 2 * p.requires_grad) for p in params if p.dim() > 1)

    def blocks(mod, rows, back, grad_in):  # checkpointed: recompute stops at the last tensor backward saves, so a
        # block's last projection is not recomputed unless LoRA's path runs after it; grad_in False: the first
        # block's attention input projections read an input that needs no gradient, so compute none for it
        bs = [x for x in mod.modules() if isinstance(x, model.Block)]
        last = [[x for x in blk.modules() if isinstance(x, nn.Linear)][-1] for blk in bs]
        skip = sum(x.weight.numel() for x in last if not isinstance(x, lora.LoRALinear)) * back * ac
        attn_in = [x for n, x in bs[0].named_modules() if isinstance(x, nn.Linear) and "att" in n][:-1]
        skip += sum(x.weight.numel() for x in attn_in) * back * (not grad_in)
        return linear([p for x in bs for p in x.parameters()], rows, back, ac) - 2 * rows * skip

    head_rows = int((b["labels"][:, 1:] != -100).sum()) if cfg.chunked_loss else sum(T)
    inner = {id(p) for x in (m.decoder.layers, m.head) for p in x.parameters()}
    upstream = any(p.requires_grad for p in m.parameters() if id(p) not in inner)  # embeddings, image features
    f = blocks(m.decoder, sum(T), True, upstream) + linear([m.head.weight], head_rows, True)
    f += 4 * c.num_heads * c.head_dim * c.num_layers * sum(t * t / 2 for t in T) * (3.5 + ac)
    if pv is None:
        return f
    back = any(p.requires_grad for p in m.vision.parameters())
    if c.is_internvl:  # every tile one sequence: its patches and the class token
        seq, full = [(pv.shape[-1] // c.vit_patch) ** 2 + 1] * len(pv), c.vit_num_layers
    else:  # every image (frame) one sequence of patches
        seq = [h * w for t, h, w in b["image_grid_thw"].tolist() for _ in range(t)]
        full = len(c.vit_fullatt_blocks) if c.vit_window else c.vit_num_layers
    stem = [x.weight for x in m.vision.modules() if isinstance(x, conv)]
    f += blocks(m.vision, sum(seq), back, any(w.requires_grad for w in stem)) + linear(stem, sum(seq), False)
    f += 4 * c.vit_hidden_size * full * sum(s * s for s in seq) * (1 + back * (2.5 + ac))
    used = lambda n: c.mpgui_mode in (n.split("_")[0], "fusion") or c.mpgui_mode == "mean" and n.endswith("perceiver")
    idle = [n for n in getattr(m, "PARTS", ()) if not used(n)]
    done = {id(p) for x in [m.decoder, m.head, m.vision] + [getattr(m, n) for n in idle] for p in x.parameters()}
    merger = list(m.vision.merger.parameters()) if hasattr(m.vision, "merger") else []  # Qwen's, in the tower
    side = [p for p in m.parameters() if id(p) not in done] + merger  # mlp1, perceivers, gate: on image tokens
    img = int((b["input_ids"] == c.image_token_id).sum())
    return f + sum(linear([p for p in side if p.requires_grad == t], img, back or t) for t in (True, False))


PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # bf16 dense


def peak_flops(device):
    """This GPU's bf16 dense peak from PEAK_FLOPS; 0 on CPUs and unknown GPUs (no MFU)."""
    if device.type != "cuda":
        return 0
    return next((v for k, v in PEAK_FLOPS.items() if k in torch.cuda.get_device_name()), 0)


# ----------------------------------------------------------------------------------------------------------------------


def init_distributed(cfg):
    """(rank, world, device) of this process: under torchrun (RANK set) one of a group, on its LOCAL_RANK's GPU."""
    # also seeds the model's initial draws and checks that global_batch splits into micro-batches over the world
    distributed = "RANK" in os.environ
    if distributed:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=cfg.dist_timeout_min))
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_flush_denormal(device.type == "cpu")  # CPUs run denormals ~10-100x slower; GPUs flush them
    torch.manual_seed(cfg.seed)  # every rank draws the same initial adapters and new parts (FSDP does not broadcast)
    if cfg.global_batch % (cfg.micro_batch * world):
        raise ValueError(f"global_batch {cfg.global_batch} is not a multiple of micro_batch x world "
                         f"({cfg.micro_batch} x {world})")
    if world % max(cfg.dp_replicate, 1):
        raise ValueError(f"dp_replicate {cfg.dp_replicate} does not divide the world size {world}")
    return rank, world, device


def end_distributed(distributed):
    """Undoes init_distributed: torch's default denormals again, and this process out of its group."""
    torch.set_flush_denormal(False)
    if distributed:
        dist.destroy_process_group()


def seed_all(seed):
    """Seeds Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# what may differ when a run folder is run again: where it lies, how long it goes on (the schedule is recomputed for the
# new total), how often it logs and saves, how many checkpoints it keeps, data workers, the process-group timeout, an
# explicit checkpoint to resume
RESUMABLE = ("out", "max_steps", "save_every", "keep_last", "log_every", "num_workers", "dist_timeout_min", "resume")


def check_rerun(cfg):
    """A run folder that holds a run already is resumed only under the same config (RESUMABLE aside)."""
    # otherwise the run would go on with its old schedule and state while config.json claimed the new values
    # a key added since the run began holds what reproduces it: its default; a frozen base was fp32 before base_dtype
    old = load.read_json(cfg.out, "config.json")
    old = old and {**dataclasses.asdict(TrainConfig()), "base_dtype": "float32", **old}
    new = dataclasses.asdict(cfg)
    diff = [f"{k}: {old[k]!r} there, {new.get(k)!r} now" for k in sorted(set(old) | set(new))
            if k not in RESUMABLE and old.get(k) != new.get(k)] if old else []
    if diff:
        raise SystemExit(f"{cfg.out} holds a run with another config ({'; '.join(diff)}); to start a new run, "
                         "pass another --out")


def write_run(cfg, tok, folder):
    """The run folder with the resolved config (also printed) and the tokenizer as trained, each written atomically."""
    os.makedirs(cfg.out, exist_ok=True)
    checkpoints.write_atomic(os.path.join(cfg.out, "config.json"), json.dumps(dataclasses.asdict(cfg), indent=2))
    # the base folder the adapters belong to: merge.py refuses to fold them into any other
    checkpoints.write_atomic(os.path.join(cfg.out, "base.json"), json.dumps(dict(folder=os.path.abspath(folder),
                                                                     fingerprint=load.fingerprint(folder)), indent=2))
    checkpoints.write_atomic(os.path.join(cfg.out, "tokenizer.json"), tok.to_str(pretty=True))
    print(json.dumps(dataclasses.asdict(cfg)))


def print_skipped(skipped, notes=()):
    """One line per skipped sample (file, line, reason), then the notes; unprintable characters backslash-escaped."""
    # line: a jsonl line (from 1) or a JSON record (from 0)
    enc = sys.stdout.encoding or "utf-8"
    for text in [f"skip {file}:{line}: {reason}" for file, line, reason in skipped] + list(notes):
        print(text.encode(enc, "backslashreplace").decode(enc))


def total_steps(cfg, ds):
    """Optimizer steps of the run: max_steps, else `epochs` passes of full global batches (at least one)."""
    if len(ds) < cfg.global_batch:
        raise ValueError(f"{len(ds)} usable samples ({len(ds.skipped)} skipped), fewer than global_batch "
                         f"{cfg.global_batch}")
    steps_per_epoch = len(ds) // cfg.global_batch
    return cfg.max_steps or max(1, int(steps_per_epoch * cfg.epochs))


def lr_lambda(cfg, total):
    """LambdaLR's factor: linear warmup over warmup_ratio of the steps, then linear or cosine decay to 0."""
    warm = math.ceil(cfg.warmup_ratio * total)

    def f(step):  # step counts optimizer steps taken so far
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(total - warm, 1)
        return max(0.0, 1 - t) if cfg.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return f


def make_optimizer(m, params, cfg, total, device):
    """AdamW with the LoRA adapters at lr and the parts trained in full at lr_parts (0 = lr), and its schedule."""
    names = {id(p): n for n, p in m.named_parameters()}
    lora_p = [p for p in params if names[id(p)].endswith(("lora_A", "lora_B"))]
    part_p = [p for p in params if not names[id(p)].endswith(("lora_A", "lora_B"))]
    groups = [dict(params=lora_p, lr=cfg.lr), dict(params=part_p, lr=cfg.lr_parts or cfg.lr)]
    groups = [g for g in groups if g["params"]]  # adapters only, or parts only: one group
    opt = torch.optim.AdamW(groups, betas=tuple(cfg.betas), eps=1e-8, weight_decay=cfg.weight_decay,
                            foreach=device.type == "cuda")
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total))


def resume_point(cfg):
    """(checkpoint, its state.json) to resume from: cfg.resume, else the run's latest; (None, None) for a new run."""
    ckpt = cfg.resume or checkpoints.latest(cfg.out)
    return (ckpt, checkpoints.read_state(ckpt)) if ckpt else (None, None)


def resume_run(cfg, ckpt, m, opt, sched, rank):
    """(step, data position) of checkpoint ckpt (None: a new run, step 0); later checkpoints and metrics set aside."""
    # The run's later checkpoints belong to a continuation given up (an earlier --resume): they move to
    # checkpoints/abandoned/N/, never deleted. metrics.jsonl is cut to the steps up to the resumed one.
    step, position = checkpoints.load(ckpt, m, opt, sched, rank) if ckpt else (0, 0)
    if rank == 0:
        root = os.path.join(cfg.out, "checkpoints")
        later = [c for c in checkpoints.listed(root) if os.path.basename(c) > f"step_{step:07d}"]
        if later:
            away = os.path.join(root, "abandoned", f"{time.strftime('%Y%m%d-%H%M%S')}_resumed_at_{step:07d}")
            os.makedirs(away)  # new: an existing folder is an error, never merged into
            for c in later:
                os.replace(c, os.path.join(away, os.path.basename(c)))
            print(f"resuming at step {step}: the later checkpoints {[os.path.basename(c) for c in later]} -> {away}")
        print(f"resumed from {ckpt}: step {step}, sample {position}" if ckpt else f"{cfg.out}: no checkpoint, step 0")
        path = os.path.join(cfg.out, "metrics.jsonl")
        lines = open(path).readlines() if os.path.exists(path) else []
        # a line without its newline is a record cut by a kill: its step came after every checkpoint
        kept = [line for line in lines if line.endswith("\n") and json.loads(line)["step"] <= step]
        checkpoints.write_atomic(path, "".join(kept))
    return step, position


def step_order(n, cfg, lengths, epoch):
    """The global order of sample indices for one epoch: seeded; length-grouped within megabatches."""
    if cfg.group_by_length:
        return data.length_grouped_indices(lengths, cfg.global_batch, cfg.seed + epoch)
    return torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()


def rank_slice(order, start, micro_index, world, rank, mb):
    """This rank's micro_index-th micro-batch of the global batch at order[start:]."""
    # of its world x accum micro-batches of mb, rank r's a-th is number a * world + r
    k = micro_index * world + rank
    return order[start + k * mb:start + (k + 1) * mb]


class Seeded(torch.utils.data.Dataset):
    """ds read at (epoch, index) keys with Python's `random` seeded from (seed, epoch, index) alone, then restored."""
    # the readers' crop and turn draws use only `random`: a sample's draws are the same whichever worker reads it,
    # at any world size, resumed or not (saved worker states would tie them to num_workers and worker order)

    def __init__(self, ds, seed):
        self.ds, self.seed = ds, seed

    def __getitem__(self, key):  # (epoch, index), from loader's batch_sampler
        state = random.getstate()
        random.seed(f"{self.seed}:{key[0]}:{key[1]}")  # a str seed is hashed by SHA-512: the same in every process
        try:
            return self.ds[key[1]]
        finally:
            random.setstate(state)


def loader(ds, cfg, world, rank, pad, position):
    """Yields (global sample position after the step, this rank's `accum` collated micro-batches) from `position` on."""
    # each global batch is a slice of the epoch's order, dealt out by rank_slice; an epoch's ragged tail is dropped
    n, mb, gb = len(ds), cfg.micro_batch, cfg.global_batch
    accum = gb // (mb * world)  # micro-batches per rank and optimizer step
    while True:
        epoch, start = divmod(position, n)
        order = step_order(n, cfg, ds.lengths, epoch)
        plan = [(epoch * n + s + gb, [(epoch, i) for i in rank_slice(order, s, a, world, rank, mb)])
                for s in range(start, n - gb + 1, gb) for a in range(accum)]
        if plan:
            it = iter(torch.utils.data.DataLoader(  # its own generator: the global RNG (dropout) stays untouched
                Seeded(ds, cfg.seed), batch_sampler=[idx for _, idx in plan], num_workers=cfg.num_workers,
                collate_fn=functools.partial(data.collate, pad_id=pad), generator=torch.Generator().manual_seed(epoch)))
            for k in range(accum - 1, len(plan), accum):
                yield plan[k][0], [next(it) for _ in range(accum)]
        position = (epoch + 1) * n


def target_tokens(micro, device, distributed):
    """(target tokens (labels but the first, not -100), skipped samples) of the global batch, all ranks'."""
    n = torch.tensor([float(sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro if b["input_ids"] is not None)),
                      float(sum(len(b["skipped"]) for b in micro))], device=device)
    if distributed:
        dist.all_reduce(n)
    return n[0], int(n[1])


def summed_loss(m, kw, chunked):
    """A micro-batch's cross-entropy summed over its targets: fused head + loss in row chunks, or from full logits."""
    if chunked:
        return m(**kw, return_loss=True)
    logits = m(**kw)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), kw["labels"][:, 1:].flatten(), reduction="sum")


def global_loss(loss_sum, n_tok, distributed, step, run):
    """The step's loss, the mean over all ranks' targets; a non-finite one stops the run, naming the last checkpoint."""
    if distributed:
        dist.all_reduce(loss_sum)
    loss = (loss_sum / n_tok.clamp(min=1)).item()
    if not math.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss} at step {step + 1}; the last good checkpoint is "
                                 f"{checkpoints.latest(run)}")
    return loss


def blank_batch(pad):
    """Run under FSDP for an all-skipped micro-batch: two padding tokens, one a target, for a loss the caller zeroes."""
    # a rank that skipped the model would leave the others waiting in its units' collectives
    ids = torch.full((1, 2), pad)
    return dict(input_ids=ids, labels=torch.tensor([[-100, pad]]), attention_mask=torch.ones_like(ids),
                pixel_values=None, image_grid_thw=None)


def step_record(step, loss, lr, norm, micro, t0, t_data, world, flops, peak, skipped):
    """A step's metrics.jsonl record; t0: when the step began. Tokens (no padding) and skipped: all ranks'; flops:
    this rank's (step_flops), against one GPU's peak."""
    dt = time.time() - t0
    tokens = sum(int(b["attention_mask"].sum()) for b in micro if b["input_ids"] is not None) * world
    return dict(step=step, loss=loss, lr=lr, grad_norm=float(norm), tokens=tokens, data_wait_s=t_data,
                tok_per_s=tokens / dt, mfu=flops / dt / peak if peak else None,
                peak_mem_gb=torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
                skipped=skipped)


def report_step(rec, log, bar, log_every):
    """Rank 0: the step's metrics.jsonl line (flushed), every log_every steps the bar's figures."""
    log.write(json.dumps(rec) + "\n")
    log.flush()
    if rec["step"] % log_every == 0:
        bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tok_per_s']:.0f}",
                        **({"mfu": f"{rec['mfu']:.1%}"} if rec["mfu"] else {}))


def usage(asked):
    """Prints how to call train.py and every config key with its default; the exit code (0 when asked)."""
    print("usage: python train.py CONFIG [--key=value ...]\n" + __doc__ +
          "\nConfig keys (JSON file or --key=value) and their defaults:")
    for f in dataclasses.fields(TrainConfig):
        print(f"  {f.name} = {getattr(TrainConfig(), f.name)!r}")
    return 0 if asked else 2


def main(argv):
    if not argv or argv[0] in ("-h", "--help"):
        sys.exit(usage(asked=bool(argv)))
    cfg = load_config(argv[0], argv[1:])
    rank, world, device = init_distributed(cfg)
    distributed = dist.is_initialized()  # under torchrun
    folder = load.resolve(cfg.base)
    tok = load.load_tokenizer(folder)
    check_rerun(cfg)
    m = build_model(cfg, tok, device)
    seed_all(cfg.seed + rank)  # dropout and drop-path: each rank its own draws
    ds = build_dataset(cfg, tok, m.cfg)
    if rank == 0:
        print_skipped(ds.skipped)
    total = total_steps(cfg, ds)  # the data decides it (epochs): known only now, and nothing is written before
    ckpt, state = resume_point(cfg)
    if state and state["step"] >= total:  # a finished run run again: said, and the folder left as it is
        if rank == 0:
            print(f"{cfg.out} is finished: {ckpt} is step {state['step']} of {total}; nothing to do")
        end_distributed(distributed)
        return
    if rank == 0:
        write_run(cfg, tok, folder)
    params = [p for p in m.parameters() if p.requires_grad]
    opt, sched = make_optimizer(m, params, cfg, total, device)
    step, position = resume_run(cfg, ckpt, m, opt, sched, rank)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=cfg.bf16 and not distributed)  # FSDP2 casts itself
    peak = peak_flops(device)
    log = open(os.path.join(cfg.out, "metrics.jsonl"), "a") if rank == 0 else None
    bar = tqdm(total=total, initial=step, disable=rank != 0, desc=os.path.basename(cfg.out))
    batches = loader(ds, cfg, world, rank, m.cfg.pad_token_id, position)
    m.train()
    empty, skipped = 0, 0  # global batches in a row without a target token; all ranks' skips since the last step
    while step < total:
        t0 = time.time()
        position, micro = next(batches)
        t_data = time.time() - t0
        print_skipped(s for b in micro for s in b["skipped"])  # every rank its own
        n_tok, n_skipped = target_tokens(micro, device, distributed)
        skipped += n_skipped
        if n_tok == 0:  # every sample skipped, on every rank (all-reduced): no forward, no step; its skips count next
            empty += 1
            if rank == 0:
                print(f"no update: every sample of the global batch ending at sample {position} was skipped")
            if empty == len(ds) // cfg.global_batch:  # an epoch's worth in a row: the data is all skipped
                raise RuntimeError(f"{empty} global batches in a row (to sample {position}) had every sample skipped")
            continue
        loss_sum = torch.zeros((), device=device)
        for b in micro if distributed else [b for b in micro if b["input_ids"] is not None]:
            blank = b["input_ids"] is None  # all its samples skipped: one process passes it by, FSDP runs a blank one
            b, vision = vision_inputs(blank_batch(m.cfg.pad_token_id) if blank else b, m, distributed, device)
            kw = {k: b[k].to(device) for k in ("input_ids", "attention_mask", "labels")} | vision
            kw = m.pack(**kw) if cfg.pack else kw
            with autocast:
                loss = summed_loss(m, kw, cfg.chunked_loss)
            loss = loss * 0 if blank else loss  # a blank batch: every unit's graph, no loss and zero gradients
            (loss / n_tok * world).backward()  # FSDP averages over ranks: world * mean = global sum
            loss_sum += loss.detach()
        loss_val = global_loss(loss_sum, n_tok, distributed, step, cfg.out)
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))  # 0: off
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        flops = sum(step_flops(m, cfg, b) for b in micro if b["input_ids"] is not None)
        rec = step_record(step, loss_val, sched.get_last_lr()[0], norm, micro, t0, t_data, world, flops, peak, skipped)
        empty, skipped = 0, 0
        if rank == 0:
            report_step(rec, log, bar, cfg.log_every)
        bar.update(1)
        if step == total or (cfg.save_every and step % cfg.save_every == 0):
            checkpoints.save(cfg.out, m, opt, sched, step, position, rank, cfg.keep_last)
    bar.close()
    if log:
        log.close()
    end_distributed(distributed)


if __name__ == "__main__":
    main(sys.argv[1:])
