"""The training loop under random readers, DataLoader workers and skipped samples: ShowUI grounding's random crop and
turns resume bit-exactly with 0 or 2 workers (each sample's draws depend on the seed, epoch and index alone), and a
global batch whose samples were all skipped is no step (an epoch's worth of them in a row stops the run).

The FSDP side (one rank's micro-batch all skipped) is in test_train.py, beside the other torchrun runs."""
import json
import os
import random

import pytest
from PIL import Image
from safetensors.torch import load_file

import checkpoints
import formats
import load
import train
from test_train import SHRINK, checkpoint, fixture, losses, rerun_from_step_2, train_args, trainable, write_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ["OK", "Cancel", "Save", "Open", "Close", "Help"]
RESUME_TOL = 0.0  # same process layout, same draws, same RNG states: bit-exact

pytestmark = pytest.mark.usefixtures("one_thread", "default_denormals")


def showui_data(folder, n=6):
    """$_DATA_DIR/ShowUI-desktop: n screenshots of 4 elements each, bboxes included (the crop needs them)."""
    root = os.path.join(folder, "ShowUI-desktop")
    os.makedirs(os.path.join(root, "images"))
    os.makedirs(os.path.join(root, "metadata"))
    records = []
    for i in range(n):
        img = Image.new("RGB", (280, 168), ((i * 40) % 256, (i * 90) % 256, (i * 150) % 256))
        for j in range(4):
            img.paste(((j * 60) % 256, 255 - 50 * j, 30 * i % 256), (28 + 56 * j, 67, 56 + 56 * j, 101))
        img.save(os.path.join(root, "images", f"{i}.png"))
        els = [dict(instruction=NAMES[(i + j) % 6], data_type="text", point=[0.15 + 0.2 * j, 0.5],
                    bbox=[0.1 + 0.2 * j, 0.4, 0.2 + 0.2 * j, 0.6]) for j in range(4)]
        records.append({"img_url": f"{i}.png", "img_size": [280, 168], "element": els, "element_size": 4})
    with open(os.path.join(root, "metadata", "hf_train.json"), "w") as f:
        json.dump(records, f)
    return folder


def showui_args(data_dir, out, workers):
    """The ShowUI grounding recipe (crop 0.5..1.5, 100 turns drawn with replacement, LoRA dropout) on qwen2_vl_tiny:
    global batch 2 of 6 samples, so 3 steps an epoch and the resumed half crosses an epoch boundary."""
    return [os.path.join(ROOT, "configs", "showui_grounding.json"), "--base=" + fixture("qwen2_vl_tiny"),
            f"--data_dir={data_dir}", f"--out={out}", "--max_steps=4", "--save_every=2", "--bf16=False", "--lr=1e-3",
            f"--num_workers={workers}", "--min_pixels=6272", "--max_pixels=75264"]


@pytest.fixture(scope="module")
def showui_runs(tmp_path_factory):
    """{workers: (4 steps in one go, the same stopped after step 2 and resumed)} for 0 and 2 DataLoader workers."""
    root = tmp_path_factory.mktemp("showui")
    data_dir = showui_data(str(root / "data"))
    runs = {}
    for w in (0, 2):
        a, b = str(root / f"straight_{w}"), str(root / f"resumed_{w}")
        train.main(showui_args(data_dir, a, w))
        runs[w] = (a, rerun_from_step_2(a, b, lambda out: showui_args(data_dir, out, w)))
    return runs


def test_showui_crop_and_turns_draw_per_read(tmp_path):
    """What the resume tests rest on: reading a sample again with other draws gives another sample."""
    data_dir = showui_data(str(tmp_path))
    tok = load.load_tokenizer(fixture("qwen2_vl_tiny"))
    ds = formats.ShowUIGrounding(data_dir, ["showui-desktop:hf_train"], tok, 6272, 75264, 8192, 100, 0.5, 1.5)

    def read(seed, i):
        random.seed(seed)
        return ds[i]["input_ids"].tolist()
    assert all(read(0, i) == read(0, i) for i in range(len(ds)))
    assert sum(read(0, i) != read(1, i) for i in range(len(ds))) >= len(ds) // 2


@pytest.mark.parametrize("workers", [0, 2])
def test_showui_resume_is_exact(showui_runs, workers):
    """Old: 2 workers drew from streams seeded per DataLoader (a fresh one on resume) and dealt out by worker, so the
    resumed steps read other crops and turns."""
    straight, resumed = showui_runs[workers]
    ref, got = losses(straight), losses(resumed)
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        assert abs(got[step] - ref[step]) / abs(ref[step]) <= RESUME_TOL, (step, got, ref)
    a, b = trainable(resumed, 4), trainable(straight, 4)
    assert set(a) == set(b) and all((a[k] - b[k]).abs().max() <= RESUME_TOL for k in a)


def test_showui_draws_do_not_depend_on_workers(showui_runs):
    """Each sample's draws are a function of (seed, epoch, index): 0 workers and 2 read the same samples."""
    assert losses(showui_runs[0][0]) == losses(showui_runs[2][0])


# ----------------------------------------------------------------------------------------------------------------------
# a global batch whose samples were all skipped at read time: no optimizer or schedule step, no step counted


@pytest.fixture(scope="module")
def meta(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("data")))  # 24 samples: 6 global batches of 4 an epoch


def skip_reads(monkeypatch, first):
    """The first `first` reads of InternVL samples come back skipped, as an unreadable image would."""
    real, reads = formats.InternVLDataset.__getitem__, []

    def get(self, i):
        reads.append(i)
        return dict(skip=("test", i, "skipped by the test")) if len(reads) <= first else real(self, i)
    monkeypatch.setattr(formats.InternVLDataset, "__getitem__", get)


def test_a_global_batch_all_skipped_is_no_step(meta, tmp_path, monkeypatch):
    """Old: logged as loss 0, and the optimizer and the schedule stepped on it."""
    skip_reads(monkeypatch, 4)  # the whole first global batch
    out = str(tmp_path / "run")
    args = train_args("fusion", fixture("mpgui_tiny"), meta, out, *SHRINK, "--max_steps=3")
    train.main(args)
    cfg = train.load_config(args[0], args[1:])
    with open(os.path.join(out, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    assert [r["step"] for r in recs] == [1, 2, 3] and all(r["loss"] > 1 for r in recs)  # ~ln(vocab): real losses
    assert [r["skipped"] for r in recs] == [4, 0, 0]  # the empty batch's skips counted in the next step's record
    f = train.lr_lambda(cfg, 3)
    assert [r["lr"] for r in recs] == [cfg.lr * f(k) for k in (1, 2, 3)]  # the schedule stepped 3 times
    with open(os.path.join(checkpoint(out, 3), "state.json")) as fh:
        state = json.load(fh)
    assert state["position"] == 16 and state["scheduler"]["last_epoch"] == 3  # 4 batches read, 3 steps
    adam = load_file(os.path.join(checkpoint(out, 3), "optimizer.safetensors"))
    assert {float(v) for k, v in adam.items() if k.endswith("::step")} == {3.0}


def test_every_sample_skipped_stops_the_run(meta, tmp_path, monkeypatch):
    """Old: every step logged as loss 0 with the optimizer stepping on nothing, to the end."""
    skip_reads(monkeypatch, 10 ** 9)
    out = str(tmp_path / "run")
    with pytest.raises(RuntimeError, match=r"^6 global batches in a row \(to sample 24\) had every sample skipped$"):
        train.main(train_args("fusion", fixture("mpgui_tiny"), meta, out, *SHRINK, "--max_steps=3"))
    assert checkpoints.latest(out) is None
    assert os.path.getsize(os.path.join(out, "metrics.jsonl")) == 0
