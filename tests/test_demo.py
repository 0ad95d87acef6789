"""The CPU demo, shortened: a small synthetic world, the random-init tiny model, one MP-GUI stage (spatial, on
relation prediction) trained through train.py, merged through merge.py and scored through eval.py. The loss must fall
and the relation accuracy on held-out screens must beat the majority answer by a stated margin. The full demo
(`bash demo.sh`, all five stages) is timed in the README."""
import json
import os
import re

import pytest

import eval as E
import merge
import train
from tools import world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARGIN = 0.45  # relation accuracy at least this far above the majority answer (~0.25, five balanced types); 0.89 seen
CPU = ["--mpgui=True", "--max_tiles=1", "--max_length=400", "--global_batch=32", "--micro_batch=32", "--bf16=False",
       "--num_workers=0", "--activation_checkpointing=False", "--drop_path=0", "--lora_dropout=0", "--lr=2e-3",
       "--betas=[0.9,0.95]", "--lora_llm_r=32", "--lora_llm_alpha=64", "--log_every=10"]  # demo.sh's, spatial stage


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("world"))
    metas = world.build(os.path.join(out, "data"), n_train=300, n_eval=40)
    world.write_tiny_model(os.path.join(out, "base"), world.corpus(os.path.join(out, "data")), vit=(96, 2, 3, 192),
                           llm=(192, 4, 4, 2, 512))
    return out, metas


def test_world_is_deterministic_and_exact(tmp_path):
    a, b = world.make_screen(7), world.make_screen(7)
    assert a[1] == b[1] and a[0].tobytes() == b[0].tobytes()
    metas = world.build(str(tmp_path), n_train=3, n_eval=2)
    assert set(metas) == set(world.STAGES) | {f"eval_{s}" for s in world.STAGES} | {"eval"}
    for line in open(os.path.join(str(tmp_path), "train_relation.jsonl")):
        r = json.loads(line)
        assert r["conversations"][1]["value"] in world.RELATIONS
    for e in world.make_screen(3)[1]:  # boxes on the 4 x 4 grid, identical numbers on phone and desktop
        assert all(0 <= v <= 1000 for v in e["box"]) and e["box"][0] < e["box"][2] and e["box"][1] < e["box"][3]


def test_spatial_stage_learns_relations(world_dir, capsys):
    out, metas = world_dir
    run, merged = os.path.join(out, "runs", "spatial"), os.path.join(out, "merged", "spatial")
    train.main([os.path.join(ROOT, "configs", "spatial.json"), f"--base={out}/base", f"--meta={metas['spatial']}",
                f"--out={run}", "--max_steps=120", *CPU])
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-3:]) / 3
    assert last < 0.5 * first, (first, last)
    merge.main([run, merged])
    E.main(["--model", merged, "--data", metas["eval_spatial"], "--out", os.path.join(out, "eval"), "--max-tiles", "1",
            "--batch-size", "40", "--mpgui-mode", "spatial"])  # the demo scores each perceiver stage this way
    summary = json.load(open(os.path.join(out, "eval", "summary.json")))
    got = summary["datasets"]["relation"]
    acc, chance = got["score"]["accuracy"], got["majority_baseline"]["accuracy"]
    assert summary["mpgui_mode"] == "spatial" and got["n"] == sum(1 for _ in open(f"{out}/data/eval_relation.jsonl"))
    assert acc >= chance + MARGIN, (acc, chance)


def test_icon_grounding_asks_by_colour_alone(tmp_path):
    """Icon questions name a colour only, only for a colour that one icon of the screen has; the answer is its box."""
    world.build(str(tmp_path), n_train=12, n_eval=4)
    for split, n_screens in (("train", 12), ("eval", 4)):
        screens = [world.make_screen(world.first_seed(split) + i)[1] for i in range(n_screens)]
        asked, n = set(), 0
        for line in open(tmp_path / f"{split}_icon_grounding.jsonl"):
            r = json.loads(line)
            q, a = (t["value"] for t in r["conversations"])
            colour = re.fullmatch(r"<image>\nGive the bounding box of the (\w+) icon\.", q)[1]
            i = int(re.fullmatch(rf"images/{split}_(\d+)\.png", r["image"])[1])
            icons = [e for e in screens[i] if e["type"] == "icon" and e["color"] == colour]
            assert len(icons) == 1 and a == world.box_text(icons[0]["box"])
            asked.add((i, colour))
            n += 1
        expect = {(i, e["color"]) for i, els in enumerate(screens) for e in els if e["type"] == "icon"
                  and sum(x["type"] == "icon" and x["color"] == e["color"] for x in els) == 1}
        assert asked == expect and n == len(expect) > 0
