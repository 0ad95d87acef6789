"""Folds a run's LoRA adapters (and its trained or new parts) into its base and writes a complete checkpoint folder
in the official layout: sharded safetensors + index, config.json, tokenizer files, generation config.

    python merge.py RUN OUT [--checkpoint RUN/checkpoints/step_N] [--device cpu] [--shard-gb 5] [--overwrite]

It checks on a probe batch that merged logits equal base + adapters' and that the files, loaded by the ordinary
loader, reproduce the merged model, before OUT appears; OUT is what the next stage's config names as `base`.
merge.py replaces only folders it wrote (they hold merge.json): another existing OUT needs --overwrite. It refuses a
base that changed since the run was trained (RUN/base.json), so adapters are never folded into the wrong weights.
"""
import argparse
import glob
import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

import checkpoints
import data
import load
import lora

TOL = 1e-4  # fp32; the merge itself is done in fp32 whatever the storage dtype
MARKER = "merge.json"  # in every folder merge.py writes: what it was merged from


def written_by_merge(folder):
    return os.path.isfile(os.path.join(folder, MARKER))


def nested(a, b):
    """a and b are the same folder, or one lies inside the other."""
    a, b = os.path.realpath(a), os.path.realpath(b)
    return a == b or a.startswith(b + os.sep) or b.startswith(a + os.sep)


def check_folders(run, out, base, overwrite):
    """Before any work: OUT is neither the run nor the base (nor inside or around them); an existing OUT, or an OUT.tmp
    or OUT.old left over, is replaced only if merge.py wrote it (or --overwrite); the base is the one trained on."""
    for name, folder in (("the run", run), ("its base", base)):
        if nested(out, folder):
            raise SystemExit(f"merge: OUT {out} is {name} {folder} or overlaps it; write the merge elsewhere")
    for folder in (out, out + ".tmp", out + ".old"):
        if os.path.exists(folder) and not written_by_merge(folder) and not (overwrite and folder == out):
            raise SystemExit(f"merge: {folder} exists and was not written by merge.py (no {MARKER}); move it away"
                             + (" or pass --overwrite" if folder == out else ""))
    trained = load.read_json(run, "base.json")
    if trained and trained["fingerprint"] != (now := load.fingerprint(base)):
        raise SystemExit(f"merge: the run was trained on {trained['folder']} (fingerprint {trained['fingerprint']}), "
                         f"but its base {base} now holds other weights (fingerprint {now}); "
                         "merging would fold the adapters into the wrong model")


def rebuild(run_cfg, state, device):
    """The run's model exactly: base + new/trained tensors from the checkpoint + adapters (unmerged)."""
    run = run_cfg["out"]
    m = load.load_model(run_cfg["base"], dtype=torch.float32, device=device, mpgui=run_cfg["mpgui"],
                        extra_token_id=load.special_token_id(run, data.EXTRA_CONTEXT),  # the id as trained
                        mpgui_mode="fusion", gate_mask=run_cfg["gate_mask"])
    vocab = max((t.shape[0] for k, t in state.items() if k.endswith(("tok_embeddings.weight", "embed_tokens.weight"))),
                default=m.cfg.vocab_size)
    if vocab != m.cfg.vocab_size:
        m.resize_vocab(vocab)
    lora.add_adapters(m, run_cfg["lora_llm_r"], run_cfg["lora_llm_alpha"], run_cfg["lora_vit_r"],
                      run_cfg["lora_vit_alpha"], targets=run_cfg.get("lora_targets") or None)
    own = m.state_dict()
    if unknown := sorted(set(state) - set(own)):
        raise ValueError(f"checkpoint tensors the rebuilt model lacks: {unknown[:5]}")
    m.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)
    return m.eval()


def probe(m, seed=0):
    """A batch that exercises every path: two samples, one with an image (context + EXTRA tokens), random text."""
    g = torch.Generator().manual_seed(seed)
    c = m.cfg
    special = torch.tensor([t for t in (c.image_token_id, c.extra_token_id) if t is not None])

    def text(n):  # random ids among the first 1,000 (every tiny vocabulary has them), an image token replaced by 5
        t = torch.randint(0, min(c.vocab_size, 1000), (n,), generator=g)
        return torch.where(torch.isin(t, special), 5, t)
    if c.is_internvl:
        vision = dict(pixel_values=torch.randn(1, 3, c.vit_image_size, c.vit_image_size, generator=g))
        extra = [c.extra_token_id] * c.num_image_token if c.is_mpgui else []
        img = torch.tensor([c.image_token_id] * c.num_image_token + extra)
    else:  # one 56-px image: 4 x 4 patches -> 4 tokens
        vision = dict(pixel_values=torch.randn(16, 3 * c.vit_temporal_patch * c.vit_patch ** 2, generator=g),
                      image_grid_thw=torch.tensor([[1, 4, 4]]))
        img = torch.full((4,), c.image_token_id)
    a = torch.cat([text(8), img, text(8)])
    return torch.stack([a, text(len(a))]), vision


def write(m, out, base_folder, run, shard_bytes):
    """The official layout, written under OUT.tmp (renamed to OUT once checked: never half-written)."""
    tmp = out + ".tmp"
    if os.path.exists(tmp):  # a failed merge's, checked by check_folders
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    with open(os.path.join(tmp, MARKER), "w") as f:  # first, so even a half-written OUT.tmp is known as ours
        json.dump(dict(run=os.path.abspath(run), base=os.path.abspath(base_folder)), f, indent=2)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in m.state_dict().items()}
    if m.cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # tied: the official files store the embedding only
    base_json = load.read_json(base_folder, "config.json")
    dtype = base_json.get("torch_dtype") or base_json.get("dtype") or "bfloat16"  # transformers 5 writes "dtype"
    cast = getattr(torch, dtype) if isinstance(getattr(torch, str(dtype), None), torch.dtype) else torch.bfloat16
    shards, size = [{}], 0
    for k in sorted(sd):
        t = sd[k].to(cast) if sd[k].is_floating_point() else sd[k]
        if shards[-1] and size + t.nbytes > shard_bytes:
            shards, size = shards + [{}], 0
        shards[-1][k], size = t, size + t.nbytes
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, part in zip(names, shards):
        save_file(part, os.path.join(tmp, name), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(t.nbytes for p in shards for t in p.values())},
             "weight_map": {k: name for name, part in zip(names, shards) for k in part}}
    checkpoints.write_atomic(os.path.join(tmp, "model.safetensors.index.json"), json.dumps(index, indent=2))
    for f in glob.glob(os.path.join(base_folder, "*")):  # config, tokenizer, generation config, remote code
        if os.path.isfile(f) and not f.endswith((".safetensors", ".safetensors.index.json", ".bin")) \
                and os.path.basename(f) != MARKER:
            shutil.copy(f, tmp)
    config_json = load.read_json(tmp, "config.json")
    if m.cfg.is_internvl:
        config_json["llm_config"]["vocab_size"] = m.cfg.vocab_size
        if m.cfg.is_mpgui:  # the released flags: EXTRA from the fusion gate at inference
            config_json.update(architectures=["MPGUI"], use_gate_layer=True, train_textual_perceiver=False,
                               train_graphical_perceiver=False, train_spatial_perceiver=False, train_fusion_gate=False)
    else:
        (config_json["text_config"] if "text_config" in config_json else config_json)["vocab_size"] = m.cfg.vocab_size
    checkpoints.write_atomic(os.path.join(tmp, "config.json"), json.dumps(config_json, indent=2))
    if os.path.exists(os.path.join(run, "tokenizer.json")):  # the tokenizer as trained, added tokens included
        shutil.copy(os.path.join(run, "tokenizer.json"), tmp)
        added = load.read_json(run, "tokenizer.json")["added_tokens"]
        extra = {t["content"]: t["id"] for t in added if t["content"] == data.EXTRA_CONTEXT}
        path = os.path.join(tmp, "added_tokens.json")  # read by the SentencePiece (InternVL2) loaders
        if extra and os.path.exists(path):
            checkpoints.write_atomic(path, json.dumps({**load.read_json(tmp, "added_tokens.json"), **extra}, indent=2))
    checkpoints.sync_folder(tmp)  # every file on disk before the swap: a crash after it leaves OUT whole
    return tmp, cast


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run")
    p.add_argument("out")
    p.add_argument("--checkpoint", default="", help="default: the run's latest")
    p.add_argument("--device", default="cpu")
    p.add_argument("--shard-gb", type=float, default=5.0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT that merge.py did not write")
    a = p.parse_args(argv)
    a.out = a.out.rstrip("/")
    with open(os.path.join(a.run, "config.json")) as f:
        run_cfg = {**json.load(f), "out": a.run}  # the run may have moved
    base = load.resolve(run_cfg["base"])
    check_folders(a.run, a.out, base, a.overwrite)
    ckpt = a.checkpoint or checkpoints.latest(a.run)
    if not ckpt:
        raise FileNotFoundError(f"{a.run}: no checkpoint to merge")
    if fault := checkpoints.fault(ckpt, [checkpoints.TRAINABLE]):  # missing, truncated or a pickle: the file, the cause
        raise SystemExit(f"merge: checkpoint {ckpt} is damaged: {fault}; pass another with --checkpoint")
    state = load_file(os.path.join(ckpt, checkpoints.TRAINABLE))
    m = rebuild(run_cfg, state, a.device)
    ids, vision = probe(m)
    ids, vision = ids.to(a.device), {k: v.to(a.device) for k, v in vision.items()}
    with torch.no_grad():
        ref = m(ids, **vision)  # base + adapters, unmerged
        lora.merge(m)
        err = rel(m(ids, **vision), ref)  # the merge arithmetic itself, fp32
    tmp, dtype = write(m, a.out, base, a.run, int(a.shard_gb * 2**30))
    # the files, through the ordinary loader
    merged = load.load_model(tmp, dtype=torch.float32, device=a.device, gate_mask=run_cfg["gate_mask"])
    with torch.no_grad():
        for p in m.parameters():  # what the files hold: the merged weights rounded to the base's storage dtype
            p.copy_(p.to(dtype))
        err_file = rel(merged(ids, **vision), m(ids, **vision))
    print(f"merged {ckpt} -> {a.out}\n  probe logits, merged vs unmerged (fp32): max relative error {err:.2e}\n"
          f"  probe logits, files ({str(dtype).replace('torch.', '')}) vs merged model: {err_file:.2e}")
    if not (err <= TOL and err_file <= TOL):  # OUT stays as it was; the failed files stay in OUT.tmp to inspect
        raise SystemExit(f"merge check failed: merged vs unmerged {err:.2e}, files vs merged {err_file:.2e}")
    if os.path.exists(a.out):  # the old OUT moves aside before the new one moves in: never half of each
        if os.path.exists(a.out + ".old"):
            shutil.rmtree(a.out + ".old")
        os.replace(a.out, a.out + ".old")
    os.replace(tmp, a.out)
    checkpoints.fsync(os.path.dirname(os.path.abspath(a.out)))  # the swap itself on disk before the old OUT goes
    shutil.rmtree(a.out + ".old", ignore_errors=True)
    return err


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


if __name__ == "__main__":
    main()
