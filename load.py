"""Everything that reads a checkpoint folder: config.json (both transformers layouts, InternVL's nested one),
generation_config.json, tokenizer files (tokenizer.json, or SentencePiece tokenizer.model converted without
sentencepiece), hub ids, and the safetensors weights under their official key names, every key checked, each
parameter read as the rows it holds (under FSDP2 a rank reads only its shards' rows).

    m = load_model("OpenGVLab/InternVL2-8B", dtype=torch.bfloat16, mpgui=True, mpgui_mode="textual")
    tok = load_tokenizer(folder)
"""
import dataclasses
import hashlib
import json
import os
import re
import struct
import sys
import time

import torch
from safetensors import safe_open
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors

import data
from model import MPGUI, InternVL, ModelConfig, Qwen2VL

# config.json's architectures[0] -> ModelConfig.arch; decided here, once
ARCHS = {"Qwen2VLForConditionalGeneration": "qwen2_vl", "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
         "InternVLChatModel": "internvl", "MPGUI": "mpgui"}
# what a caller may set on the config before the model is built: token ids the files lack, and run-time switches
SETTINGS = ("image_token_id", "extra_token_id", "im_start_token_id", "mpgui_mode", "gate_mask", "lm_skip_layer",
            "lm_skip_ratio", "lm_skip_rand", "uigraph_threshold", "uigraph_train", "uigraph_test")


def read_json(folder, name):
    """A JSON file of the folder as a dict, {} when it is absent."""
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def fingerprint(folder, samples=64, chunk=1 << 16):
    """A short hash of a checkpoint folder: config.json, and each safetensors file's name, size, header and
    `samples` evenly spaced chunks of its data (a merge shows; a 16 GB base takes well under a second)."""
    h = hashlib.sha256()
    with open(os.path.join(folder, "config.json"), "rb") as f:
        h.update(f.read())
    for path in safetensors_files(folder):
        size = os.path.getsize(path)
        h.update(os.path.basename(path).encode() + size.to_bytes(8, "little"))
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")  # safetensors: an 8-byte header length, then the JSON header
            h.update(f.read(n))
            for k in range(samples):
                f.seek(8 + n + (size - 8 - n) * k // samples)
                h.update(f.read(chunk))
    return h.hexdigest()[:16]


def resolve(path):
    """A local folder, or a hub id (owner/name) fetched through huggingface_hub."""
    # a path that starts with / . ~, or whose first part is a local folder, is never taken for a hub id
    if os.path.isdir(path):
        return path
    if not re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", path) or os.path.isdir(path.split("/")[0]):
        raise FileNotFoundError(f"{path}: no such checkpoint folder (and not a hub id, owner/name)")
    return hub_snapshot(path)


def hub_snapshot(repo_id):
    """snapshot_download with a timeout on every request (GUIVLM_HUB_TIMEOUT seconds, default 20), HF_HUB_OFFLINE
    respected; an unreachable hub, or a repo not found or not cached, is one line (SystemExit), never a hang."""
    import huggingface_hub as hub
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    value = os.environ.get("GUIVLM_HUB_TIMEOUT", "20")
    timeout = float(value) if re.fullmatch(r"\d+(\.\d*)?", value.strip()) else 0
    if not timeout > 0:
        raise SystemExit(f"GUIVLM_HUB_TIMEOUT={value!r}: expected a number of seconds > 0")
    # huggingface_hub passes timeout=None (no timeout) on its repo_info and file-listing calls, so a proxy that
    # accepts and never answers hangs it for ever: every request its shared client sends gets our timeout instead
    client = hub.get_session()
    if not getattr(client, "guivlm_timeout", None):
        send = client.send

        def send_with_timeout(request, **kw):
            t = request.extensions.get("timeout") or {}
            request.extensions["timeout"] = {k: t.get(k) or client.guivlm_timeout for k in ("connect", "read",
                                                                                               "write", "pool")}
            return send(request, **kw)
        client.send = send_with_timeout
    client.guivlm_timeout = timeout
    http = sys.modules[type(client).__module__.split(".")[0]]  # the client's HTTP library (httpx, or httpx2)
    endpoint, offline, t0 = constants.ENDPOINT, constants.HF_HUB_OFFLINE, time.time()
    try:
        return hub.snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.py"],
                                     etag_timeout=timeout)
    except RepositoryNotFoundError:  # also a gated or private repo without a token
        raise SystemExit(f"{repo_id}: no such repo on the hub ({endpoint}), or it is gated or private and needs a "
                         "token (hf auth login)") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, http.HTTPError) as e:  # HTTPError: timeouts, refused connections
        if offline:
            raise SystemExit(f"{repo_id} is not in the local hub cache ({constants.HF_HUB_CACHE}) and "
                             "HF_HUB_OFFLINE=1; pass a local folder, or unset HF_HUB_OFFLINE to download it") from None
        cause = e.__cause__ or e
        why = f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}".rstrip(": ")
        raise SystemExit(f"could not reach the hub ({endpoint}) for {repo_id} ({why}, after {time.time() - t0:.1f} s;"
                         f" each request times out after {timeout:g} s, GUIVLM_HUB_TIMEOUT); pass a local folder or "
                         "set HF_HUB_OFFLINE=1 to use the local cache") from None


# ----------------------------------------------------------------------------------------------------------------------
# config.json -> ModelConfig


def _need(d, key, where):
    if key not in d:
        raise KeyError(f"{where}: config.json has no '{key}'")
    return d[key]


def config_from_hf(d, where="config.json", generation_config=None, mpgui=False):
    """The ModelConfig of an official config.json (dict): Qwen2-VL / Qwen2.5-VL (flat 4.x layout or 5.x's nested
    `text_config`), InternVLChatModel or a merged MPGUI. mpgui=True: MP-GUI on an InternVL checkpoint."""
    name = (d.get("architectures") or [""])[0]
    arch = ARCHS.get(name) or {"qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_5_vl"}.get(d.get("model_type"))
    if arch is None:
        raise ValueError(f"{where}: unsupported architecture {name!r} / model_type {d.get('model_type')!r}")
    if mpgui and arch not in ("internvl", "mpgui"):
        raise ValueError(f"{where}: mpgui=True needs an InternVL checkpoint, not {arch}")
    arch = "mpgui" if mpgui else arch
    if arch in ("internvl", "mpgui"):
        return internvl_config(d, arch, where, generation_config)
    return qwen_config(d, arch, where, generation_config)


def qwen_config(d, arch, where, generation_config=None):
    """The ModelConfig of a Qwen2-VL / Qwen2.5-VL config.json; absent vision keys take transformers' defaults."""
    # Qwen2VLVisionConfig / Qwen2_5_VLVisionConfig (models/qwen2_vl/configuration_qwen2_vl.py, models/qwen2_5_vl/...):
    # the official Qwen2-VL-2B config.json stores only a few of them
    t = {**d, **d.get("text_config", {})}  # 5.x nests the decoder under text_config; 4.x keeps it flat
    rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
    hidden, heads = _need(t, "hidden_size", where), _need(t, "num_attention_heads", where)
    v = d.get("vision_config", {})
    if arch == "qwen2_vl":
        vit_hidden, vit_out = v.get("embed_dim", 1280), v.get("hidden_size", 1536)
        vit_inter, act = vit_hidden * v.get("mlp_ratio", 4), v.get("hidden_act", "quick_gelu")
    else:
        vit_hidden, vit_out = v.get("hidden_size", 1280), v.get("out_hidden_size", hidden)
        vit_inter, act = v.get("intermediate_size", 3420), v.get("hidden_act", "silu")
    eos = (generation_config or {}).get("eos_token_id", t.get("eos_token_id"))
    ties = [c["tie_word_embeddings"] for c in (d, d.get("text_config", {})) if "tie_word_embeddings" in c]
    tie = any(ties) if ties else True  # either level asks for it, as transformers reads it; old configs omit it
    qwen2_5 = arch == "qwen2_5_vl"
    return ModelConfig(
        arch=arch, vocab_size=_need(t, "vocab_size", where), hidden_size=hidden,
        intermediate_size=_need(t, "intermediate_size", where), num_layers=_need(t, "num_hidden_layers", where),
        num_heads=heads, num_kv_heads=t.get("num_key_value_heads", heads),
        head_dim=t.get("head_dim") or hidden // heads, rms_norm_eps=t.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", t.get("rope_theta", 1e6)),
        mrope_section=list(_need(rope, "mrope_section", where + " rope_scaling")), tie_word_embeddings=bool(tie),
        image_token_id=_need(t, "image_token_id", where),
        vision_start_token_id=_need(t, "vision_start_token_id", where),
        eos_token_ids=eos if isinstance(eos, list) else [eos], pad_token_id=t.get("pad_token_id") or 0,
        vit_hidden_size=vit_hidden, vit_out_hidden_size=vit_out, vit_num_layers=v.get("depth", 32),
        vit_num_heads=v.get("num_heads", 16), vit_intermediate_size=vit_inter, vit_act=act,
        vit_patch=v.get("patch_size", v.get("spatial_patch_size", 14)),
        vit_temporal_patch=v.get("temporal_patch_size", 2), vit_merge=v.get("spatial_merge_size", 2),
        vit_window=v.get("window_size", 112) if qwen2_5 else 0,
        vit_fullatt_blocks=list(v.get("fullatt_block_indexes", [7, 15, 23, 31])) if qwen2_5 else [])


def internvl_config(d, arch, where, generation_config=None):
    """An official InternVLChatModel config.json: vision_config (InternViT) + llm_config (InternLM2 or Qwen2). The
    special-token ids are not in it: they come from the tokenizer files (see `special_token_id`)."""
    v, l = _need(d, "vision_config", where), _need(d, "llm_config", where)
    llm = (l.get("architectures") or [""])[0]
    if llm not in ("InternLM2ForCausalLM", "Qwen2ForCausalLM"):
        raise ValueError(f"{where}: unsupported llm_config.architectures {llm!r}")
    if v.get("qk_normalization") or v.get("norm_type", "layer_norm") != "layer_norm":
        raise ValueError(f"{where}: InternViT-6B (rms_norm / qk_normalization) is not supported")
    rope = l.get("rope_scaling") or {}
    kind = rope.get("type") or rope.get("rope_type")
    if kind not in (None, "default", "dynamic"):
        raise ValueError(f"{where}: unsupported rope_scaling {rope}")
    qwen2 = llm == "Qwen2ForCausalLM"
    hidden, heads = _need(l, "hidden_size", where), _need(l, "num_attention_heads", where)
    image, patch, ratio = d.get("force_image_size") or v["image_size"], v["patch_size"], d.get("downsample_ratio", 0.5)
    eos = (generation_config or {}).get("eos_token_id", l.get("eos_token_id"))
    return ModelConfig(
        arch=arch, llm_arch="qwen2" if qwen2 else "internlm2", vocab_size=_need(l, "vocab_size", where),
        hidden_size=hidden, intermediate_size=_need(l, "intermediate_size", where),
        num_layers=_need(l, "num_hidden_layers", where), num_heads=heads,
        num_kv_heads=l.get("num_key_value_heads", heads), head_dim=l.get("head_dim") or hidden // heads,
        rms_norm_eps=l.get("rms_norm_eps", 1e-6), rope_theta=l.get("rope_theta", 10000.0), mrope_section=[],
        tie_word_embeddings=False,  # the official code forces an untied head for every size; never tie by default
        image_token_id=None, vision_start_token_id=None, eos_token_ids=eos if isinstance(eos, list) else [eos],
        pad_token_id=l.get("pad_token_id") or 0, attention_bias=True if qwen2 else l.get("bias", True),
        max_position_embeddings=l.get("max_position_embeddings", 32768),
        # the official code runs Qwen2 under transformers 4.37.2, which ignores rope_scaling and always applies
        # sliding_window (use_sliding_window notwithstanding); both matter only past 32k tokens on real checkpoints
        rope_dynamic=float(rope.get("factor", 0.0)) if kind == "dynamic" and not qwen2 else 0.0,
        sliding_window=(l.get("sliding_window") or 0) if qwen2 else 0,
        vit_hidden_size=v["hidden_size"], vit_out_hidden_size=hidden, vit_num_layers=v["num_hidden_layers"],
        vit_num_heads=v["num_attention_heads"], vit_intermediate_size=v["intermediate_size"],
        vit_act=v.get("hidden_act", "gelu"), vit_patch=patch, vit_image_size=image,
        vit_qkv_bias=v.get("qkv_bias", True), vit_norm_eps=v.get("layer_norm_eps", 1e-6),
        vit_drop_path=v.get("drop_path_rate", 0.0), downsample_ratio=ratio, ps_version=d.get("ps_version", "v1"),
        select_layer=d.get("select_layer", -1), num_image_token=int((image // patch) ** 2 * ratio ** 2),
        template=d.get("template", ""))


def special_token_id(folder, token):
    """The id of an added token from the folder's tokenizer files (tokenizer.json, tokenizer_config.json or
    added_tokens.json), or None."""
    for t in read_json(folder, "tokenizer.json").get("added_tokens", []):
        if t["content"] == token:
            return t["id"]
    for i, t in read_json(folder, "tokenizer_config.json").get("added_tokens_decoder", {}).items():
        if t["content"] == token:
            return int(i)
    return read_json(folder, "added_tokens.json").get(token)


# ----------------------------------------------------------------------------------------------------------------------
# weights: official folders (sharded or not), both Qwen key layouts, every key checked


def safetensors_files(folder):
    index = read_json(folder, "model.safetensors.index.json")
    if index:
        return sorted({os.path.join(folder, v) for v in index["weight_map"].values()})
    single = os.path.join(folder, "model.safetensors")
    if not os.path.exists(single):
        raise FileNotFoundError(f"{folder}: neither model.safetensors nor model.safetensors.index.json")
    return [single]


def qwen_key(k):
    """transformers 5 nests the modules (model.visual.*, model.language_model.*); 4.x and ours: visual.*, model.*."""
    if k.startswith("model.visual."):
        return k[len("model."):]
    if k.startswith("model.language_model."):
        return "model." + k[len("model.language_model."):]
    return k


def index_weights(model, folder, rename=lambda k: k, optional=()):
    """({parameter name: (file, key)}, absent parts) from the headers alone; bad keys stop the load, named."""
    # missing, unexpected or mis-shaped keys are named before any weight is read; submodules in `optional` may be
    # absent. A tied head is the embedding: the files may omit it (load_weights checks a stored one)
    params = dict(model.named_parameters(remove_duplicate=False))
    sources, unexpected, wrong = {}, [], []
    for path in safetensors_files(folder):
        with safe_open(path, framework="pt", device="cpu") as f:
            for key in f.keys():
                name, shape = rename(key), tuple(f.get_slice(key).get_shape())
                if name not in params:
                    unexpected.append(key)
                elif shape != tuple(params[name].shape):
                    wrong.append(f"{key}: file {shape}, model {tuple(params[name].shape)}")
                else:
                    sources[name] = (path, key)
    expected = set(params) - ({"lm_head.weight"} if model.cfg.tie_word_embeddings else set())
    absent = [p for p in optional if not any(n.startswith(p + ".") for n in sources)]
    expected -= {n for n in expected if any(n.startswith(p + ".") for p in absent)}
    missing = sorted(expected - set(sources))
    problems = [f"{what} ({len(keys)}): " + ", ".join(keys[:8]) + " ..." * (len(keys) > 8) for what, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)) if keys]
    if problems:
        raise ValueError(f"{folder}: checkpoint does not match the model: " + "; ".join(problems))
    return sources, absent


def read_rows(path, key, a, b, dtype=None):
    """Rows a:b of tensor `key` of a safetensors file, in dtype (None: the file's)."""
    # rows past the file's (a grown vocabulary) are the mean of its rows, summed in fixed chunks: the same figures
    # whichever rank holds them, in any world size
    with safe_open(path, framework="pt", device="cpu") as f:
        s = f.get_slice(key)
        n = s.get_shape()[0]
        t = s[min(a, n):min(b, n)].to(dtype)
        if b > n:
            mean = sum(s[i:i + 4096].double().sum(0) for i in range(0, n, 4096)) / n
            t = torch.cat([t, mean.to(t.dtype).expand(b - max(a, n), *t.shape[1:])])
    return t


def load_weights(model, dtype=None, device="cpu"):
    """Fills the parameters of `model` still on the meta device from model.sources, in dtype (or {name: dtype})."""
    # dtype None keeps the file's. The other parameters (new parts, adapters) are kept. One FSDP2 sharded (a DTensor,
    # dim 0 in chunks) gets only its local shard's rows, read as such from the file: each rank reads and holds its
    # share of the weights
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset as local_rows
    params, head, todo = dict(model.named_parameters(remove_duplicate=False)), "lm_head.weight", dict(model.sources)

    def rows(p):  # (first, end) of the rows this process holds
        shape, at = local_rows(p.shape, p.device_mesh, p.placements) if isinstance(p, DTensor) else (p.shape, [0])
        return at[0], at[0] + shape[0]
    if model.cfg.tie_word_embeddings and todo.pop(head, None):  # a stored tied head must equal the embedding
        emb = next(n for n in todo if n.endswith("embed_tokens.weight"))
        if not torch.equal(*(read_rows(*model.sources[n], *rows(params[n])) for n in (head, emb))):
            raise ValueError(f"{model.folder}: tie_word_embeddings is true but {head} differs from {emb}; a merged "
                             "head would be silently replaced by the embedding. Set tie_word_embeddings false.")
    state = {}
    for name, (path, key) in todo.items():
        p = params[name]
        if p.is_meta:
            t = read_rows(path, key, *rows(p), dtype.get(name) if isinstance(dtype, dict) else dtype).to(device)
            state[name] = DTensor.from_local(t, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()) \
                if isinstance(p, DTensor) else t
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()  # assign=True replaces the Parameter a tie shares
    if unfilled := [n for n, p in model.named_parameters() if p.is_meta]:
        raise ValueError(f"parameters neither in the files nor created: {unfilled[:8]}")


def load_model(path, dtype=None, device="cpu", mpgui=False, **settings):
    """Builds the model a checkpoint folder (or hub id) describes and loads its weights; dtype None keeps the
    file's dtype. mpgui=True: MP-GUI on an InternVL checkpoint, the parts it lacks from their first-stage init.
    `settings` (names in SETTINGS) are set on the config before the model is built."""
    # device "meta": nothing read yet (model.sources says where each weight is; load_weights reads them), the parts
    # the files lack already created in full on the CPU (fp32): train.build_model shards the model before the reads.
    # InternVL's special-token ids among the settings: None (or not given) reads them from the tokenizer files
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise TypeError(f"load_model: unknown settings {unknown}; allowed: {', '.join(SETTINGS)}")
    folder = resolve(path)
    config = os.path.join(folder, "config.json")
    if not os.path.isfile(config):
        raise FileNotFoundError(f"{folder}: no config.json")
    cfg = config_from_hf(read_json(folder, "config.json"), config, read_json(folder, "generation_config.json") or None,
                         mpgui)
    if cfg.is_internvl:  # special ids live in the tokenizer files, not in config.json
        ids = dict(image_token_id=data.IMG_CONTEXT, extra_token_id=data.EXTRA_CONTEXT, im_start_token_id="<|im_start|>")
        for name, token in ids.items():
            if settings.get(name) is None:
                settings[name] = special_token_id(folder, token)
        end = special_token_id(folder, data.IM_END)
        cfg.eos_token_ids = [end] if end is not None else cfg.eos_token_ids
    cfg = dataclasses.replace(cfg, **{k: v for k, v in settings.items() if v is not None})
    with torch.device("meta"):
        model = {"internvl": InternVL, "mpgui": MPGUI}.get(cfg.arch, Qwen2VL)(cfg)
    model.sources, new_parts = index_weights(model, folder, (lambda k: k) if cfg.is_internvl else qwen_key,
                                             optional=MPGUI.PARTS if cfg.is_mpgui else ())
    for name in new_parts:  # e.g. stage 1 starts MP-GUI from InternVL2-8B, which has none of its parts
        model.get_submodule(name).to_empty(device="cpu")  # in full, before any sharding: every rank draws alike
        model.init_part(name)
    model.initialised, model.folder = list(new_parts), folder
    if device != "meta":
        load_weights(model, dtype, device)
        for name in new_parts:
            model.get_submodule(name).to(device, dtype or model.decoder.embedding.weight.dtype)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------------
# tokenizers: tokenizer.json as it is, or InternLM2's SentencePiece tokenizer.model rebuilt as a `tokenizers` BPE


def load_tokenizer(path):
    """The tokenizer of a checkpoint folder (or a tokenizer.json path)."""
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file) and os.path.isfile(os.path.join(path, "tokenizer.model")):
        return load_spm_folder(path)  # InternLM2 ships SentencePiece only
    if not os.path.isfile(file):
        where = os.path.dirname(file) or "."
        raise FileNotFoundError(f"no tokenizer.json or tokenizer.model found in {where} (looked for {file})")
    return Tokenizer.from_file(file)


# InternVL2-2B/8B/26B (InternLM2) ship only a SentencePiece tokenizer.model. We rebuild it as a `tokenizers` BPE
# (the recipe of transformers' convert_slow_tokenizer.py) with a small protobuf reader, so neither sentencepiece nor
# protobuf is needed.


def _proto_fields(buf):
    """(field number, value) of a protobuf message."""
    # varint key = field << 3 | wire type (0 varint, 1 fixed64, 2 length-prefixed, 5 fixed32)
    def varint(i):
        out = shift = 0
        while True:
            out, shift, i = out | (buf[i] & 0x7F) << shift, shift + 7, i + 1
            if buf[i - 1] < 0x80:
                return out, i
    i = 0
    while i < len(buf):
        key, i = varint(i)
        wire = key & 7
        if wire not in (0, 1, 2, 5):
            raise ValueError(f"not a SentencePiece model: protobuf wire type {wire}")
        if wire == 0:
            val, i = varint(i)
        else:
            n, i = varint(i) if wire == 2 else ({1: 8, 5: 4}[wire], i)
            val, i = buf[i:i + n], i + n
        yield key >> 3, val


def read_spm_model(model_file):
    """A SentencePiece model's pieces (text, score, type) and its trainer and normalizer specs as {field: value}."""
    # ModelProto: 1 pieces {1 piece, 2 score, 3 type}, 2 trainer_spec {3 model_type, 35 byte_fallback, 41 bos_id},
    # 3 normalizer_spec {2 precompiled_charsmap, 3 add_dummy_prefix, 4 remove_extra_whitespaces}
    with open(model_file, "rb") as f:
        fields = list(_proto_fields(f.read()))

    def spec(n):  # a repeated submessage's parts concatenate into one message
        return dict(_proto_fields(b"".join(v for k, v in fields if k == n)))
    pieces = []
    for k, v in fields:
        if k == 1:
            p = dict(_proto_fields(v))  # type 1 (NORMAL) when absent
            pieces.append((p[1].decode(), struct.unpack("<f", p.get(2, bytes(4)))[0], p.get(3, 1)))
    trainer, norm = spec(2), spec(3)
    if trainer.get(3, 1) != 2:  # model_type: 1 UNIGRAM (the default), 2 BPE, 3 WORD, 4 CHAR
        raise ValueError(f"{model_file}: SentencePiece model_type {trainer.get(3, 1)} is not BPE (2); "
                         "only BPE is supported")
    return pieces, trainer, norm


def spm_to_tokenizer(model_file, added_tokens=None, add_bos=True):
    """A SentencePiece BPE model as a `tokenizers` Tokenizer. added_tokens {id: content}: HF configs rename pieces
    (InternLM2's [UNUSED_TOKEN_*] -> <|im_end|>) and append more."""
    pieces, trainer, norm = read_spm_model(model_file)
    added_tokens = added_tokens or {}
    names = {i: p for i, (p, _, _) in enumerate(pieces)} | added_tokens
    vocab = {t: i for i, t in names.items()}
    # sentencepiece BPE merges the adjacent pair whose concatenation is the best-scoring normal piece (leftmost
    # first), so every split of a normal piece into two vocab pieces is a merge, ranked by the piece's score, then id
    ranked = []
    for i, (_, score, typ) in enumerate(pieces):
        t = names[i]
        if typ == 1:
            ranked += [(-score, i, vocab[t[:k]], vocab[t[k:]], k) for k in range(1, len(t))
                       if t[:k] in vocab and t[k:] in vocab]
    merges = [(names[i][:k], names[i][k:]) for _, i, _, _, k in sorted(ranked)]
    unk = names[next(i for i, (_, _, typ) in enumerate(pieces) if typ == 2)]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=bool(trainer.get(35, 0))))
    # unknown / control / user-defined pieces and the config's tokens are cut out whole before the BPE sees the text
    special = sorted({i for i, (_, _, typ) in enumerate(pieces) if typ in (2, 3, 4)} | set(added_tokens))
    tok.add_special_tokens([AddedToken(names[i], normalized=False, special=True) for i in special])
    # sentencepiece's normalizer, which HF runs on each stretch of text between added tokens: exactly what
    # transformers' slow InternLM2Tokenizer does (sp_model.encode per stretch), not one sp.encode of the whole text,
    # where the dummy ▁ and the stripping of spaces see across user-defined pieces
    # (whole "x  <img>y" -> "▁x▁<img>y", per stretch "▁x", "<img>", "▁y", with both flags on).
    # charsmap: e.g. nmt_nfkc, as transformers does (close, not exact: "\r\n"); InternLM2's "identity" has none
    dummy, collapse = norm.get(3, 1), norm.get(4, 1)  # add_dummy_prefix (InternLM2: off), remove_extra_whitespaces
    norms = [normalizers.Precompiled(norm[2])] if norm.get(2) else []
    if collapse:  # drops leading spaces and squeezes runs; only " " (after the charsmap) counts: tab, \n, NBSP stay.
        # Oniguruma's ^ and $ match at every line, hence \A and \z
        norms += [normalizers.Replace(Regex(r"\A +"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    norms.append(normalizers.Replace(" ", "▁"))
    if dummy:  # ▁ before every non-empty stretch, before leading whitespace too, as sentencepiece does
        norms.append(normalizers.Prepend("▁"))
    if collapse:  # trailing spaces go after escaping and the prefix, so a trailing literal ▁ goes too
        # ("a▁ " -> "a")
        norms.append(normalizers.Replace(Regex(r"▁+\z"), ""))
    tok.normalizer = normalizers.Sequence(norms)
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if dummy:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    bos = trainer.get(41, 1)  # bos_id; a disabled -1 reads as a huge varint
    if add_bos and bos in names:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{names[bos]} $A", pair=f"{names[bos]} $A {names[bos]} $B", special_tokens=[(names[bos], bos)])
    return tok


def load_spm_folder(folder):
    """tokenizer.model with the HF files beside it: added_tokens.json appends tokens ({content: id});
    tokenizer_config.json's added_tokens_decoder renames pieces and appends tokens (its names win) and
    add_bos_token says whether <s> leads."""
    config = read_json(folder, "tokenizer_config.json")
    added = {i: t for t, i in read_json(folder, "added_tokens.json").items()}
    added.update({int(i): t["content"] for i, t in config.get("added_tokens_decoder", {}).items()})
    return spm_to_tokenizer(os.path.join(folder, "tokenizer.model"), added, config.get("add_bos_token", True))
