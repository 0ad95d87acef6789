"""A run's checkpoints, RUN/checkpoints/step_NNNNNNN/, with no pickle: trainable.safetensors (the tensors the run
trained or created), optimizer.safetensors (Adam's state by parameter name), state.json (step, data position,
scheduler, param groups, every rank's RNG states). Each is written under step_N.tmp, synced and renamed, so it exists
whole or not at all; a damaged one is named, never repaired. Also the atomic small-file write that run folders use.
"""
import json
import os
import random
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

TRAINABLE = "trainable.safetensors"  # in each checkpoint: the tensors the base lacks or the run trained


def rng_state():
    """This process's Python, NumPy, torch and CUDA generator states, as JSON-able lists."""
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    cuda = [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else None
    return dict(python=[version, list(words), gauss], numpy=[name, keys.tolist(), pos, has_gauss, cached],
                torch=torch.get_rng_state().tolist(), cuda=cuda)


def set_rng_state(s):
    version, words, gauss = s["python"]
    random.setstate((version, tuple(words), gauss))
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(s["torch"], dtype=torch.uint8))
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(c, dtype=torch.uint8) for c in s["cuda"]])


def fsync(path):
    """A file's bytes, or a folder's names (a rename in it is on disk once the folder is synced), to disk."""
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def sync_folder(folder):
    """A folder written under a temporary name, before its rename: each of its files, then the folder itself."""
    for name in os.listdir(folder):
        fsync(os.path.join(folder, name))
    fsync(folder)


def write_atomic(path, text):
    """path holds the old text or the new, never a part of one: written to path.tmp, synced, renamed over path, and
    the folder synced; on a failure the temporary file (ours) is removed and path is as it was."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        fsync(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # only when writing or renaming failed
            os.remove(tmp)
    fsync(os.path.dirname(path) or ".")


FILES = (TRAINABLE, "optimizer.safetensors", "state.json")  # a checkpoint: these three files, no other


def listed(folder):
    """The step_NNNNNNN folders in folder (a run's checkpoints/), oldest first."""
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return [os.path.join(folder, d) for d in sorted(names) if re.fullmatch(r"step_\d{7}", d)]


def save(run, m, opt, sched, step, position, rank, keep_last):
    """RUN/checkpoints/step_N: the three files of the module docstring (Adam's state keyed `NAME::KEY`), synced before
    the rename and the parent after; then the checkpoints before the last keep_last go (0: none)."""
    # Only the tensors kept are gathered, never the frozen base: a DTensor's full_tensor() is a collective, so every
    # rank gathers the same tensors in the same order; rank 0 keeps them (the others' go to "meta", freed at once).
    from torch.distributed.tensor import DTensor
    full = lambda t: (t.full_tensor() if isinstance(t, DTensor) else t).detach().to("cpu" if rank == 0 else "meta")
    weights = {n: full(p) for n, p in m.named_parameters() if p.requires_grad or n in m.new_tensors}
    names = {id(p): n for n, p in m.named_parameters()}
    sd, order = opt.state_dict(), [names[id(p)] for g in opt.param_groups for p in g["params"]]  # index -> name
    moments = {f"{order[i]}::{k}": full(v) for i in sorted(sd["state"]) for k, v in sd["state"][i].items()}
    groups = [dict(g, params=[order[i] for i in g["params"]]) for g in sd["param_groups"]]
    rngs = [None] * dist.get_world_size() if dist.is_initialized() else [rng_state()]
    if dist.is_initialized():
        dist.all_gather_object(rngs, rng_state())
    if rank == 0:
        final = os.path.join(run, "checkpoints", f"step_{step:07d}")
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(tmp, TRAINABLE))
        save_file({k: v.contiguous() for k, v in moments.items()}, os.path.join(tmp, "optimizer.safetensors"))
        write_atomic(os.path.join(tmp, "state.json"), json.dumps(dict(
            step=step, position=position, scheduler=sched.state_dict(), param_groups=groups, rng=rngs)))
        sync_folder(tmp)
        os.replace(tmp, final)  # a checkpoint exists whole or not at all
        fsync(os.path.dirname(final))
        # only folders as train.py writes them: a user's file added to one keeps it
        ours = [c for c in listed(os.path.dirname(final)) if sorted(os.listdir(c)) == sorted(FILES)]
        for old in ours[:-keep_last] if keep_last else []:
            shutil.rmtree(old)
    if dist.is_initialized():
        dist.barrier()


def latest(run):
    """The run's newest checkpoint folder, or None."""
    done = listed(os.path.join(run, "checkpoints"))
    return done[-1] if done else None


def fault(ckpt, names=FILES):
    """Why checkpoint folder ckpt does not load (the file and the cause), or None: each file of `names` is there and
    reads (a safetensors header covers its whole file: a truncated one does not)."""
    for name in names:
        path = os.path.join(ckpt, name)
        try:
            with open(path, "rb") as f:
                json.load(f) if name.endswith(".json") else safe_open(path, "pt")
        except (OSError, ValueError, SafetensorError) as e:
            pickle = os.path.exists(os.path.join(ckpt, "trainable.pt"))  # an older version's: train.py loads no pickle
            return f"{path}: {type(e).__name__}: {e}" + (" (a pickle checkpoint: train.py loads no pickle)" * pickle)


def read_state(ckpt):
    """state.json of checkpoint ckpt once every file of it reads; else stop, naming the file and the cause and the
    previous whole checkpoint to resume from (nothing is deleted or repaired: the run stops, the user decides)."""
    why = fault(ckpt)
    if why:
        whole = [c for c in listed(os.path.dirname(ckpt)) if os.path.basename(c) < os.path.basename(ckpt)
                 and not fault(c)]
        raise SystemExit(f"checkpoint {ckpt} is damaged: {why}; " + (
            f"to resume from the previous whole checkpoint {whole[-1]}, pass --resume={whole[-1]} (the later "
            "checkpoints then move to checkpoints/abandoned/)" if whole else "no earlier whole checkpoint"))
    with open(os.path.join(ckpt, "state.json")) as f:
        return json.load(f)


def load(path, m, opt, sched, rank):
    """Checkpoint folder path into the model, optimizer and scheduler, and this rank's RNG; (step, data position)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    state = read_state(path)  # every file there and whole, or stop naming it (an old pickle one: refused, not read)
    moments = {}
    for key, t in load_file(os.path.join(path, "optimizer.safetensors")).items():
        name, k = key.split("::")
        moments.setdefault(name, {})[k] = t
    set_state_dict(m, opt, model_state_dict=load_file(os.path.join(path, TRAINABLE)),
                   optim_state_dict=dict(state=moments, param_groups=state["param_groups"]),
                   options=StateDictOptions(full_state_dict=True, strict=False))
    sched.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"][rank])
    return state["step"], state["position"]
