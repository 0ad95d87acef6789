"""Icon grounding asked by colour alone, on the screens `world.py` already drew: the experiment behind the README's
table (CPU demo section): a fixed lookup ("the red icon") is learned in 300 steps, one steered by the question's
colour word only after some 1,500.

    python tools/lookup_world.py demo/data demo/lookup_all            # each colour one icon of a screen has
    python tools/lookup_world.py demo/data demo/lookup_red --only red  # the same questions, red ones only

Writes OUT/{train,eval}.jsonl and OUT/meta_{train,eval}.json (InternVL meta, images read from DATA), for train.py
(configs/graphical.json) and eval.py. The screens are redrawn from their seeds and must match DATA's images.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import world  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", help="a world.py data folder (holds images/)")
    ap.add_argument("out")
    ap.add_argument("--only", choices=sorted(world.COLORS), help="keep the questions about this colour only")
    ap.add_argument("--seed", type=int, default=0, help="the seed world.build used")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    for split in ("train", "eval"):
        base = world.first_seed(split, a.seed)
        n = sum(f.startswith(split + "_") for f in os.listdir(os.path.join(a.data, "images")))
        if n == 0:
            sys.exit(f"{a.data}/images holds no {split}_*.png: not a world.py data folder")
        rows = []
        for i in range(n):
            img, els = world.make_screen(base + i)
            rel = f"images/{split}_{i}.png"
            if img.tobytes() != world.Image.open(os.path.join(a.data, rel)).convert("RGB").tobytes():
                sys.exit(f"{a.data}/{rel}: not the screen seed {base + i} draws (made with another --seed?)")
            icons = [e for e in els if e["type"] == "icon"]
            for e in icons:
                if sum(x["color"] == e["color"] for x in icons) == 1 and a.only in (None, e["color"]):
                    q = f"Give the bounding box of the {e['color']} icon."
                    rows.append(dict(image=rel, width=img.width, height=img.height, id=len(rows),
                                     conversations=world.conv(q, world.box_text(e["box"]))))
        with open(os.path.join(a.out, f"{split}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        meta = {"icon_grounding": dict(root=os.path.abspath(a.data), annotation=os.path.abspath(
            os.path.join(a.out, f"{split}.jsonl")), data_augment=False, repeat_time=1, length=str(len(rows)))}
        json.dump(meta, open(os.path.join(a.out, f"meta_{split}.json"), "w"), indent=1)
        print(f"{split}: {len(rows)} questions on {n} screens")


if __name__ == "__main__":
    main()
